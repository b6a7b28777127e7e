"""The all-in-one demo site: a gateway, a central node and a viewer on
loopback, SQLite; sample images from pydicom's test data (and a CT stack made
from one of them) are C-STOREd into the gateway, forwarded to central over
mutual TLS, and reach the reading room by themselves."""
from __future__ import annotations

import configparser
import shutil
import sys
from pathlib import Path

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver

from medd.config import load_config
from medd.plugins.api import CannotListen

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "693_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm")
DEMO_CENTRE = "demo-centre"
DEMO_AE = "DEMO_CT"
DEMO_USER, DEMO_PASSWORD = "demo", "demo"
STACK_SLICES = 40


def _prepare(config_path: Path, gateway_config_path: Path | None = None) -> None:
    """Create what the demo configs refer to: the self-signed TLS certificate (also the CA of
    client certificates), and the gateway's client certificate, whose CN is the centre's address."""
    from medd.tlscert import issue_client_certificate, make_self_signed

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config_path)
    base = config_path.resolve().parent
    if parser.has_option("tls", "certificate") and parser.has_option("tls", "private_key"):
        cert = base / parser.get("tls", "certificate")
        key = base / parser.get("tls", "private_key")
        if not (cert.exists() and key.exists()):
            make_self_signed(cert, key)
        if gateway_config_path is not None:
            gateway = configparser.ConfigParser(interpolation=None)
            gateway.read(gateway_config_path)
            client = gateway_config_path.resolve().parent / gateway.get("gateway", "client_cert")
            pem, _ = issue_client_certificate(cert.read_bytes(), key.read_bytes(), gateway.get("gateway", "address"))
            client.parent.mkdir(parents=True, exist_ok=True)
            client.write_bytes(pem)


def _setup_directory(central_config, viewer_config, gateway_config=None):
    """Blocking, before the nodes start: who the demo centre (its modality, its gateway), viewer and
    administrator are. The gateway is known by its address, which its client certificate's CN proves."""
    from medd.storage.database import WallClock, open_database, resolved
    from medd.storage.directory import Directory

    db = open_database(central_config)
    directory = Directory(db, WallClock())
    viewer_token = viewer_config.section("central")["token"]
    try:
        addresses = [f"modality@{DEMO_CENTRE}.localhost"]
        token: bool | str = False
        if gateway_config is not None:
            # The gateway's address first: central sends the centre's receipts and results there,
            # and the gateway pulls them with the centre's token.
            addresses.insert(0, gateway_config.section("gateway")["address"])
            token = gateway_config.section("gateway").get("token") or False
        resolved(directory.add_centre(DEMO_CENTRE, aes=[DEMO_AE], addresses=addresses, token=token))
        resolved(directory.add_viewer(viewer_config.name, None, [DEMO_CENTRE], token=viewer_token))
        resolved(directory.add_rule(viewer_config.name, centre=DEMO_CENTRE))
        return resolved(directory.add_admin("demo-admin"))
    finally:
        db.stop()


def _add_user(viewer_config) -> None:
    from medd.storage.accounts import Accounts
    from medd.storage.database import WallClock, open_database, resolved
    from medd.viewer.users import add_user

    db = open_database(viewer_config)
    try:
        resolved(add_user(Accounts(db, WallClock()), DEMO_USER, DEMO_PASSWORD))
    finally:
        db.stop()


def ct_stack(slices: int = STACK_SLICES):
    """Blocking: a CT series of ``slices`` axial slices made from pydicom's CT_small.dcm (new study, series and
    instance UIDs, slice positions 5 mm apart, a band that moves from slice to slice), so that the reading room
    has a stack to scroll."""
    import copy

    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    base = dcmread(get_testdata_file("CT_small.dcm"))
    pixels = base.pixel_array
    out = []
    for n in range(1, slices + 1):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n
        z = f"{-75.7 + 5.0 * (n - 1):.2f}"
        ds.ImagePositionPatient = ["-158.135803", "-179.035797", z]
        ds.SliceLocation = z
        ds.SeriesDescription = "AXIAL STACK"
        ds.PatientName, ds.PatientID = "STACK^TESSA", "P-STACK-1"
        ds.PatientBirthDate, ds.PatientSex = "19610412", "F"
        ds.StudyDate, ds.AccessionNumber = "20240305", "ACC-4711"
        band = pixels.copy()
        band[(n * 2) % 120:(n * 2) % 120 + 8, :] = pixels.max()
        ds.PixelData = band.tobytes()
        out.append(ds)
    return out


def _samples():
    """Blocking: the sample images (pydicom's test files, which it may fetch) and a CT stack."""
    import pydicom.data
    from pydicom import dcmread

    return [dcmread(pydicom.data.get_testdata_file(name)) for name in SAMPLES] + ct_stack()


def _cstore(port: int, called_ae: str, datasets) -> list[int]:
    """Blocking: the demo centre's modality sends ``datasets`` in one association; the statuses."""
    from pynetdicom import AE

    ae = AE(ae_title=DEMO_AE)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the demo gateway did not accept an association on port {port}")
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def run_demo(config_path: Path, site: Path, viewer_config_path: Path | None = None,
             gateway_config_path: Path | None = None) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from medd.service import make_node

    # The demo starts empty every time (no migrations between versions yet);
    # only a folder the demo itself made is wiped.
    marker = site / ".medd-demo"
    if marker.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True, exist_ok=True)
    marker.touch()
    _prepare(config_path, gateway_config_path)
    config = load_config(config_path)
    viewer_config = load_config(viewer_config_path) if viewer_config_path else None
    gateway_config = load_config(gateway_config_path) if gateway_config_path else None
    admin_token = _setup_directory(config, viewer_config, gateway_config) if viewer_config else None
    if viewer_config:
        _add_user(viewer_config)

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    central = make_node(reactor, config)
    viewer = make_node(reactor, viewer_config) if viewer_config else None
    gateway = make_node(reactor, gateway_config) if gateway_config else None

    async def seed():
        from io import BytesIO

        from twisted.internet.threads import deferToThread

        # pydicom may fetch a sample it has not cached: off the reactor, like the encoding below.
        datasets = await deferToThread(_samples)
        if gateway is not None:
            # The demo centre's modality C-STOREs them into its gateway, which forwards them to central.
            port = int(gateway_config.listen["dicom"].split(":")[1])
            called = gateway_config.section("dicom").get("ae_title") or "MEDD"
            await deferToThread(_cstore, port, called, datasets)
        else:
            for ds in datasets:
                # As if the demo centre's modality had sent them over DICOM.
                def encode(ds=ds):
                    out = BytesIO()
                    ds.save_as(out, enforce_file_format=True)
                    return out.getvalue()

                data = await central.ingest.run_blocking(encode)
                await central.ingest.receive_dicom(data, transport="dicom", origin=DEMO_AE)
        listen = config.listen
        print("\nmedd demo site is up (Ctrl-C stops it).", flush=True)
        print(f"  central           {config.name}; data under {config.storage_path.parent}")
        if gateway:
            gw_port = gateway_config.listen["dicom"].split(":")[1]
            print(f"  gateway           {gateway_config.name}: C-STORE to 127.0.0.1:{gw_port}, called AE GATEWAY,"
                  f" calling AE {DEMO_AE};\n                    forwards to central over mutual TLS"
                  f"  (.venv/bin/medd gateway status --config {gateway_config_path})")
        if viewer:
            print("  reading room      http://127.0.0.1:8081/   log in as demo / demo")
            print(f"                    (sample images and a {STACK_SLICES}-slice CT arrive in the worklist within a few"
                  " seconds;\n                    each study's Images button opens it in OHIF)")
            print(f"  admin API token   {admin_token}")
            print("                    e.g. curl -H 'Authorization: Bearer <token>' http://127.0.0.1:8080/api/quarantine")
        if "http" in listen:
            print("  DICOMweb (QIDO)   http://127.0.0.1:8080/dicomweb/studies")
            print("  packages          POST http://127.0.0.1:8080/packages  (Content-Type: message/rfc822)")
        if "dicom" in listen:
            ae_title = config.section("dicom").get("ae_title") or "MEDD"
            print(f"  DICOM C-STORE     127.0.0.1:11112, called AE {ae_title}; calling AE {DEMO_AE} is the demo centre"
                  f"\n                    e.g. TCP_NODELAY=1 storescu -aet {DEMO_AE} -aec MEDD 127.0.0.1 11112 file.dcm")
        if "smtp" in listen:
            print("  SMTP              127.0.0.1:2525   e.g. .venv/bin/medd package file.dcm --to central.demo.localhost"
                  f" --from modality@{DEMO_CENTRE}.localhost | curl smtp://127.0.0.1:2525"
                  f" --mail-from modality@{DEMO_CENTRE}.localhost --mail-rcpt central@central.demo.localhost -T -")
        if "tls" in listen:
            print("  TLS packages      127.0.0.1:4443 (self-signed certificate under demo-site/tls;"
                  " client certificates from the same CA)")
        print(f"  track an object   .venv/bin/medd track <SOP Instance UID> --config {config_path}")
        sys.stdout.flush()

    # Bind every listener before anything starts, as twistd does: a port
    # already taken ends the demo at once, in one line, with nothing to undo.
    try:
        for node in (central, viewer, gateway):
            if node is not None:
                node.privilegedStartService()
    except CannotListen as e:
        print(f"medd: {e}", file=sys.stderr)
        return 2

    def started():
        central.startService()
        if viewer:
            viewer.startService()
        if gateway:
            gateway.startService()
        d = ensureDeferred(seed())
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    def stop():
        from twisted.internet.defer import DeferredList, maybeDeferred

        return DeferredList([maybeDeferred(n.stopService) for n in (gateway, viewer, central) if n is not None])

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    return 0
