"""The all-in-one demo site: a central node on loopback, SQLite, sample data."""
from __future__ import annotations

import configparser
import sys
from pathlib import Path

from twisted.logger import globalLogBeginner, textFileLogObserver

from medd.config import load_config

SAMPLES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm")


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


def run_demo(config_path: Path, site: Path) -> int:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from medd.service import make_node

    # The demo starts empty every time (no migrations between versions yet);
    # only a folder the demo itself made is wiped.
    marker = site / ".medd-demo"
    if marker.exists():
        import shutil

        shutil.rmtree(site)
    site.mkdir(parents=True, exist_ok=True)
    marker.touch()
    _prepare(config_path)
    config = load_config(config_path)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    node = make_node(reactor, config)

    async def seed():
        import pydicom.data

        for name in SAMPLES:
            data = Path(pydicom.data.get_testdata_file(name)).read_bytes()
            await node.api.receive_dicom(data, transport="demo", origin="DEMO")
        listen = config.listen
        print("\nmedd demo site is up (Ctrl-C stops it). Sample images are indexed.", flush=True)
        print(f"  node              {config.name} ({config.role}); data under {config.storage_path.parent}")
        if "http" in listen:
            print("  DICOMweb (QIDO)   http://127.0.0.1:8080/dicomweb/studies")
            print("  packages          POST http://127.0.0.1:8080/packages  (Content-Type: message/rfc822)")
        if "dicom" in listen:
            print(f"  DICOM C-STORE     127.0.0.1:11112, called AE {config.dicom_ae_title}"
                  "   e.g. TCP_NODELAY=1 storescu -aec MEDD 127.0.0.1 11112 file.dcm")
        if "smtp" in listen:
            print("  SMTP              127.0.0.1:2525   e.g. .venv/bin/medd package file.dcm --to central.demo.localhost"
                  " | curl smtp://127.0.0.1:2525 --mail-from a@b --mail-rcpt central@demo.localhost -T -")
        if "tls" in listen:
            print("  TLS packages      127.0.0.1:4443 (self-signed certificate under demo-site/tls)")
        sys.stdout.flush()

    def started():
        node.startService()
        d = ensureDeferred(seed())
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", node.stopService)
    reactor.run()
    return 0
