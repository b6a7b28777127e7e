"""The all-in-one demo site: a central node and a viewer on loopback, SQLite,
sample images from pydicom's test data that reach the reading room by
themselves."""
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


def _prepare(config_path: Path) -> None:
    """Create what the demo config refers to: the self-signed TLS certificate."""
    from medd.tlscert import make_self_signed

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config_path)
    base = config_path.resolve().parent
    if parser.has_option("tls", "certificate") and parser.has_option("tls", "private_key"):
        cert = base / parser.get("tls", "certificate")
        key = base / parser.get("tls", "private_key")
        if not (cert.exists() and key.exists()):
            make_self_signed(cert, key)


def _setup_directory(central_config, viewer_config):
    """Blocking, before the nodes start: who the demo centre, viewer and administrator are."""
    from medd.storage.database import WallClock, open_database, resolved
    from medd.storage.directory import Directory

    db = open_database(central_config)
    directory = Directory(db, WallClock())
    viewer_token = viewer_config.section("central")["token"]
    try:
        resolved(directory.add_centre(DEMO_CENTRE, aes=[DEMO_AE], addresses=[f"modality@{DEMO_CENTRE}.localhost"]))
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


def run_demo(config_path: Path, site: Path, viewer_config_path: Path | None = None) -> int:
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
    _prepare(config_path)
    config = load_config(config_path)
    viewer_config = load_config(viewer_config_path) if viewer_config_path else None
    admin_token = _setup_directory(config, viewer_config) if viewer_config else None
    if viewer_config:
        _add_user(viewer_config)

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    central = make_node(reactor, config)
    viewer = make_node(reactor, viewer_config) if viewer_config else None

    async def seed():
        import pydicom.data

        for name in SAMPLES:
            data = Path(pydicom.data.get_testdata_file(name)).read_bytes()
            # As if the demo centre's modality had sent them over DICOM.
            await central.ingest.receive_dicom(data, transport="dicom", origin=DEMO_AE)
        listen = config.listen
        print("\nmedd demo site is up (Ctrl-C stops it).", flush=True)
        print(f"  central           {config.name}; data under {config.storage_path.parent}")
        if viewer:
            print("  reading room      http://127.0.0.1:8081/   log in as demo / demo")
            print("                    (sample images arrive in the worklist within a few seconds)")
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
            print("  TLS packages      127.0.0.1:4443 (self-signed certificate under demo-site/tls)")
        print(f"  track an object   .venv/bin/medd track <SOP Instance UID> --config {config_path}")
        sys.stdout.flush()

    # Bind every listener before anything starts, as twistd does: a port
    # already taken ends the demo at once, in one line, with nothing to undo.
    try:
        for node in (central, viewer):
            if node is not None:
                node.privilegedStartService()
    except CannotListen as e:
        print(f"medd: {e}", file=sys.stderr)
        return 2

    def started():
        central.startService()
        if viewer:
            viewer.startService()
        d = ensureDeferred(seed())
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    def stop():
        from twisted.internet.defer import DeferredList, maybeDeferred

        return DeferredList([maybeDeferred(n.stopService) for n in (viewer, central) if n is not None])

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    return 0
