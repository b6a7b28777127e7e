"""Results home to the centre's PACS ([gateway] results_to): an overlay (GSPS) and a report (Basic
Text SR) that come back from central are stored into a real pynetdicom Storage SCP on loopback by
C-STORE, in their own SOP class and transfer syntax; while the PACS is down they wait and are retried
with backoff on the gateway's clock; a failure status is recorded and not retried; a plain-text report
is skipped with the reason; `medd gateway status` shows the queue."""
from __future__ import annotations

import json
import socket

import pydicom
import pytest
import pytest_twisted
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from medd.config import ConfigError, load_config
from medd.gateway.settings import gateway_settings, parse_pacs_destination
from medd.storage.forwarding import REFUSED, SKIPPED, STORED, WAITING
from tests.conftest import write_config
from tests.test_gateway import _run_cli, pki, start_pair  # noqa: F401  (pki is a fixture)

CENTRAL = "central@central.test"


class Pacs:
    """A Storage SCP on loopback: what it stored, and the status it answers (0x0000 unless told)."""

    def __init__(self, port: int = 0):
        self.stored: list[tuple[str, str, str]] = []  # (SOP class, SOP instance, transfer syntax)
        self.status = 0x0000
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event):
        ds = event.dataset
        if self.status == 0x0000:
            self.stored.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(event.context.transfer_syntax)))
        return self.status

    def stop(self):
        self.server.shutdown()


ALL_SYNTAXES = [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian,
                pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian]


@pytest.fixture
def pacs():
    started = []

    def start(port: int = 0) -> Pacs:
        p = Pacs(port)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_bytes() -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    import io

    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), ds


def results_packages(gateway) -> dict[str, tuple[str, bytes]]:
    """An overlay, an SR report and a plain-text report about one image, as central's outbox carries
    them to the gateway: kind -> (uid, package)."""
    from medd.package import build_package, decode_content
    from medd.plugins.objecttypes import text_report_content
    from medd.viewer.annotations import check_annotations
    from medd.viewer.overlays import build_presentation_state
    from medd.viewer.reports import build_text_report

    image, ds = image_bytes()
    overlay_uid, report_uid, text_uid = generate_uid(), generate_uid(), generate_uid()
    gsps = build_presentation_state(image, check_annotations([{"type": "line", "points": [[0, 64], [100, 64]]}]),
                                    user="dr-lee", overlay_uid=overlay_uid, device="viewer.test")
    sr = build_text_report(image, [(ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID)],
                           text="No acute findings.", user="dr-lee", report_uid=report_uid, device="viewer.test")

    def package(content):
        for object_type in gateway.plugins.object_types:
            if object_type.recognise(content):
                return build_package(content, object_type.identifier(content), origin=CENTRAL,
                                     destination="gateway@centre-a.test")
        raise AssertionError("no object type")

    return {
        "overlay": (overlay_uid, package(decode_content("application/dicom", gsps))),
        "report": (report_uid, package(decode_content("application/dicom", sr))),
        "text": (text_uid, package(text_report_content("Normal.", text_uid, ds.StudyInstanceUID))),
    }


async def pulled(gateway, package: bytes):
    """The package taken in as the gateway's requestor takes what it pulls from central's outbox."""
    return await gateway.ingest.receive_package(package, transport="pull", peer=CENTRAL)


@pytest_twisted.ensureDeferred
async def test_overlay_and_report_from_central_reach_the_pacs(make_central, pki, pacs, tmp_path):  # noqa: F811
    """A GSPS and a Basic Text SR pulled from central are C-STOREd into the PACS in their own storage
    SOP class and transfer syntax; a plain-text report is skipped with the reason and not sent."""
    p = pacs()
    _, gateway, _ = await start_pair(make_central, pki, gateway_more=f"results_to = PACS@127.0.0.1:{p.port}\n")
    results = gateway.gateway.results
    packages = results_packages(gateway)
    for kind in ("overlay", "report", "text"):
        await pulled(gateway, packages[kind][1])
    await results.idle()
    await results.kick()
    uids = {kind: uid for kind, (uid, _) in packages.items()}
    assert [(c, u) for c, u, _ in p.stored] == [
        ("1.2.840.10008.5.1.4.1.1.11.1", uids["overlay"]),  # Grayscale Softcopy Presentation State
        ("1.2.840.10008.5.1.4.1.1.88.11", uids["report"]),  # Basic Text SR
    ]
    for kind in ("overlay", "report"):
        record = await gateway.index.object_by_uid(uids[kind])
        assert (await gateway.forwarding.result_of(uids[kind])).state == STORED
        assert p.stored[0 if kind == "overlay" else 1][2] == record.transfer_syntax_uid
    text = await gateway.forwarding.result_of(uids["text"])
    assert text.state == SKIPPED and "cannot be sent by C-STORE" in text.last_error
    # None of it goes back to central.
    assert (await gateway.forwarding.spooled())[0] == 0

    doc = json.loads(await deferToThread(_run_cli, ["gateway", "status", "--json", "--config",
                                                     str(tmp_path / "gateway" / "gateway.ini")]))
    assert doc["results_to_pacs"]["waiting"] == 0 and doc["results_to_pacs"]["skipped"] == 1
    assert doc["results_to_pacs"]["last_stored"]["uid"] == uids["report"]


@pytest_twisted.ensureDeferred
async def test_pacs_down_then_back(make_central, pki, pacs, tmp_path):  # noqa: F811
    """With the PACS down the overlay waits and is retried with backoff on the gateway's clock (nothing
    before the delay is up); once the PACS listens again it arrives, once."""
    clock = Clock()
    clock.advance(1_000_000)
    port = free_port()
    _, gateway, _ = await start_pair(make_central, pki, clock=clock,
                                     gateway_more=f"results_to = PACS@127.0.0.1:{port}\n")
    results = gateway.gateway.results
    uid, package = results_packages(gateway)["overlay"]
    await pulled(gateway, package)
    await results.idle()
    item = await gateway.forwarding.result_of(uid)
    assert item.state == WAITING and item.attempts == 1 and "association" in item.last_error
    clock.advance(0.5)
    await results.idle()
    assert (await gateway.forwarding.result_of(uid)).attempts == 1
    clock.advance(1)
    await results.idle()
    assert (await gateway.forwarding.result_of(uid)).attempts == 2
    status = json.loads(await deferToThread(_run_cli, ["gateway", "status", "--json", "--config",
                                                        str(tmp_path / "gateway" / "gateway.ini")]))
    assert status["results_to_pacs"]["waiting"] == 1 and status["results_to_pacs"]["oldest_waiting"]["uid"] == uid

    p = pacs(port)
    clock.advance(8)
    await results.idle()
    assert [u for _, u, _ in p.stored] == [uid]
    item = await gateway.forwarding.result_of(uid)
    assert item.state == STORED and item.attempts == 3


@pytest_twisted.ensureDeferred
async def test_a_failure_status_is_recorded_and_not_retried(make_central, pki, pacs):  # noqa: F811
    """A C-STORE failure status from the PACS (0xA900, dataset does not match SOP class) is recorded
    as refused with the status and never retried; the next result goes on."""
    clock = Clock()
    p = pacs()
    p.status = 0xA900
    _, gateway, _ = await start_pair(make_central, pki, clock=clock,
                                     gateway_more=f"results_to = PACS@127.0.0.1:{p.port}\n")
    results = gateway.gateway.results
    packages = results_packages(gateway)
    await pulled(gateway, packages["overlay"][1])
    await results.idle()
    item = await gateway.forwarding.result_of(packages["overlay"][0])
    assert item.state == REFUSED and "0xA900" in item.last_error
    p.status = 0x0000
    clock.advance(3600)
    await pulled(gateway, packages["report"][1])
    await results.idle()
    assert [u for _, u, _ in p.stored] == [packages["report"][0]]
    assert (await gateway.forwarding.result_of(packages["overlay"][0])).attempts == 1


@pytest.mark.parametrize("value, message", [
    ("PACS@host", "must be AE@host:port"),
    ("127.0.0.1:104", "must be AE@host:port"),
    ("A_VERY_LONG_AE_TITLE_X@pacs:104", "is not an AE title"),
    ("PACS@pacs:0", "is not a port number"),
    ("PACS@pacs:http", "is not a port number"),
])
def test_results_to_is_validated(tmp_path, value, message):
    """[gateway] results_to must be AE@host:port; a problem names the file, section and key."""
    path = write_config(tmp_path, {"dicom": "tcp:0"}, "[gateway]\naddress = gw@centre.test\n"
                        "central = https://central.test/packages\ntoken = t\n"
                        f"results_to = {value}\n", None, name="gw.test", role="gateway")
    with pytest.raises(ConfigError) as e:
        gateway_settings(load_config(path))
    (problem,) = e.value.problems
    assert (problem.section, problem.key) == ("gateway", "results_to") and message in problem.message


def test_results_to_parsed():
    """AE@host:port, an IPv6 host in brackets; the gateway's own AE title calls."""
    d = parse_pacs_destination("PACS@[::1]:11112", "GATEWAY")
    assert (d.ae_title, d.host, d.port, d.calling_ae, str(d)) == ("PACS", "::1", 11112, "GATEWAY", "PACS@::1:11112")


@pytest_twisted.ensureDeferred
async def test_a_result_is_queued_for_the_pacs_with_its_index_row(make_central, pki, pacs):  # noqa: F811
    """The overlay's place in the PACS queue is written in the transaction that indexes it, before the
    gateway acknowledges the package to central: no notification needs to run after the commit."""
    from tests.test_gateway import _without_gateway_hooks

    p = pacs()
    _, gateway, _ = await start_pair(make_central, pki, gateway_more=f"results_to = PACS@127.0.0.1:{p.port}\n")
    uid, package = results_packages(gateway)["overlay"]
    restore = _without_gateway_hooks(gateway)
    try:
        assert (await pulled(gateway, package)).created
    finally:
        restore()
    item = await gateway.forwarding.result_of(uid)
    assert item is not None and item.state == WAITING
    await gateway.gateway.results.kick()
    assert [u for _, u, _ in p.stored] == [uid]
