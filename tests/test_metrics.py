"""Prometheus metrics: a real scrape of GET /metrics on the metrics listener after real C-STOREs."""
from __future__ import annotations

import pytest_twisted
import requests
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread

from tests.conftest import listener_port
from tests.test_cstore_sigkill import send_all
from tests.test_gateway import datasets
from tests.test_health import LISTEN as HEALTH_LISTEN

LISTEN = {**HEALTH_LISTEN, "metrics": "tcp:0:interface=127.0.0.1"}
PULL = "dr-pull@viewers.example"


def _samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return out


async def _scrape(port: int, path: str = "/metrics") -> requests.Response:
    return await deferToThread(requests.get, f"http://127.0.0.1:{port}{path}", timeout=30)


@pytest_twisted.ensureDeferred
async def test_scrape_after_cstores(make_central):
    """Five CTs from a registered centre (routed to a pull viewer), three from an unknown AE title
    (quarantined) and one sent twice: the scrape counts them by transport and outcome, their bytes and
    latencies, the routing decisions, the quarantine, the waiting deliveries by viewer and their age,
    the database transactions and the blob fsyncs; the metrics listener serves nothing but /metrics, and
    the HTTP listener does not serve it at all."""
    node = await make_central(LISTEN, "[dicom]\nae_title = MEDD\n")
    directory = node.central_storage.directory
    await directory.add_centre("centre-a", aes=["CT1"])
    await directory.add_viewer(PULL, None, ["centre-a:CT"])
    await directory.add_rule(PULL, centre="centre-a", modality="CT")
    dicom = listener_port(node, "dicom")
    routed, unknown = datasets(5), datasets(3)
    assert await deferToThread(send_all, dicom, routed + routed[:1], "CT1") == [0] * 6
    assert await deferToThread(send_all, dicom, unknown, "STRANGER") == [0] * 3
    await node.routing.kick()

    answer = await _scrape(listener_port(node, "metrics"))
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    got = _samples(answer.text)
    assert got[("medd_objects_received_total", ("outcome", "stored"), ("transport", "dicom"))] == 8
    assert got[("medd_objects_received_total", ("outcome", "duplicate"), ("transport", "dicom"))] == 1
    sizes = sum(len(ds.PixelData) for ds in routed + routed[:1] + unknown)
    assert got[("medd_received_bytes_total", ("transport", "dicom"))] > sizes
    assert got[("medd_ingest_seconds_count", ("transport", "dicom"))] == 9
    assert got[("medd_ingest_seconds_sum", ("transport", "dicom"))] > 0
    assert got[("medd_routing_decisions_total", ("outcome", "routed"))] == 5
    assert got[("medd_routing_decisions_total", ("outcome", "quarantined"))] == 3
    assert got[("medd_quarantine_held",)] == 3
    assert got[("medd_deliveries", ("state", "queued"), ("viewer", PULL))] == 5
    assert got[("medd_delivery_retries", ("viewer", PULL))] == 0
    assert got[("medd_oldest_waiting_delivery_age_seconds", ("viewer", PULL))] >= 0
    assert got[("medd_blob_fsync_seconds_count",)] == 8
    assert got[("medd_database_transaction_seconds_count",)] > 0

    assert (await _scrape(listener_port(node, "metrics"), "/")).status_code == 404
    assert (await _scrape(listener_port(node, "http"), "/metrics")).status_code in (401, 404)
