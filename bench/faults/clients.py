"""The campaign's senders and their ledger. Each sender is a real client of one transport (pynetdicom
C-STORE, dicomweb-client STOW-RS, smtplib SMTP with STARTTLS and AUTH, medd's TLS socket client), runs
on its own thread, and writes to the ledger every acknowledgement it received: UID, digest of the
object's data set, transport, time. What was not acknowledged is sent again, with the same
Message-ID, until it is."""
from __future__ import annotations

import email.utils
import hashlib
import io
import json
import random
import smtplib
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.data
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.filereader import read_preamble, _read_file_meta_info
from pynetdicom import AE, _config

from medd.package import build_package, decode_content
from medd.plugins.host import load_plugins

from .nodes import CENTRAL, CENTRE_ADDRESS

# pynetdicom sends a file's data set as it is on disk (no decode and re-encode): the digest the
# ledger keeps is then the digest of the bytes on the wire.
_config.STORE_SEND_CHUNKED_DATASET = True
TEMPORARY_DICOM = {0xA700, 0xA701, 0xA702}


def dataset_digest(part10: bytes) -> str:
    """SHA-256 of a Part 10 file's data set (after the preamble and file meta information): what a
    C-STORE carries, and what every transport must store unchanged."""
    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return hashlib.sha256(part10[fp.tell():]).hexdigest()


@dataclass
class Item:
    """One object to send: its file, UID, data-set digest and its package's stable Message-ID."""
    path: Path
    uid: str
    digest: str
    message_id: str
    data: bytes = field(repr=False)


PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, as generate_uid uses


def _uid_like(old: str, rng: random.Random) -> str:
    """A new UID of ``old``'s length, so that it replaces it in the encoded file byte for byte."""
    digits = len(old) - len(PREFIX)
    return PREFIX + str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def corpus(folder: Path, n: int, tag: str) -> list[Item]:
    """``n`` copies of pydicom's CT_small.dcm as files in ``folder``, each with a new SOP Instance
    UID (a new study every 20). The UIDs are replaced in the encoded bytes (same lengths), so a
    large corpus costs no encoding."""
    folder.mkdir(parents=True, exist_ok=True)
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    template = Path(path).read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    old_sop, old_study = ds.SOPInstanceUID.encode(), ds.StudyInstanceUID.encode()
    assert template.count(old_sop) == 2 and template.count(old_study) == 1
    rng = random.Random(f"{tag}{n}{time.time_ns()}")
    items = []
    for i in range(n):
        if i % 20 == 0:
            study = _uid_like(ds.StudyInstanceUID, rng)
            with_study = template.replace(old_study, study.encode())
        uid = _uid_like(ds.SOPInstanceUID, rng)
        data = with_study.replace(old_sop, uid.encode())
        file = folder / f"{tag}-{i:06d}.dcm"
        file.write_bytes(data)
        items.append(Item(file, uid, dataset_digest(data),
                          email.utils.make_msgid(idstring=f"{tag}{i}", domain="centre-a.faults.test"), data))
    return items


class Ledger:
    """Every acknowledgement a client received, appended to a JSON-lines file as it arrives."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a")
        self.entries: list[dict] = []
        self.temporary: dict[str, int] = {}  # transport -> temporary refusals seen
        self.errors: dict[str, int] = {}  # transport -> connection failures seen

    def acknowledged(self, item: Item, transport: str, node: str = "central") -> None:
        entry = {"uid": item.uid, "digest": item.digest, "transport": transport, "node": node, "time": time.time()}
        with self._lock:
            self.entries.append(entry)
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def count(self, kind: str, transport: str) -> None:
        with self._lock:
            table = getattr(self, kind)
            table[transport] = table.get(transport, 0) + 1

    def close(self) -> None:
        self._file.close()


class Sender(threading.Thread):
    """Sends its items until each is acknowledged (or ``stop`` is set); failures are retried after a
    short pause. ``ports()`` gives the node's current ports (fixed after the first start)."""

    transport = "?"
    batch = 1

    def __init__(self, items: list[Item], ledger: Ledger, ports, **kw):
        super().__init__(name=f"sender-{self.transport}", daemon=True)
        self.pending = list(items)
        self.ledger, self.ports = ledger, ports
        self.kw = kw
        self.stop = threading.Event()
        self.rng = random.Random(hash(self.transport))
        self.sent_ok = 0

    def run(self) -> None:
        while self.pending and not self.stop.is_set():
            batch = self.pending[:self.batch]
            try:
                acked = self.send(batch)
            except Exception:
                self.ledger.count("errors", self.transport)
                acked = set()
                self.stop.wait(0.1 + self.rng.random() * 0.2)
            for item in batch:
                if item.uid in acked:
                    self.ledger.acknowledged(item, self.transport, self.kw.get("node", "central"))
                    self.pending.remove(item)
                    self.sent_ok += 1
            self.stop.wait(self.kw.get("pause", 0))

    def send(self, batch: list[Item]) -> set[str]:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return not self.pending


class CStoreSender(Sender):
    """pynetdicom C-STORE on one association, kept while it lasts."""

    transport = "cstore"
    batch = 5

    def __init__(self, *a, called: str = "MEDD", key: str = "dicom", **kw):
        super().__init__(*a, **kw)
        self.called, self.key = called, key
        self.assoc = None
        if called == "GATEWAY":
            self.transport = "gateway-cstore"

    def send(self, batch):
        if self.assoc is None or not self.assoc.is_established:
            meta = pydicom.dcmread(batch[0].path, stop_before_pixels=True)
            ae = AE(ae_title="CT1")
            ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            self.assoc = ae.associate("127.0.0.1", self.ports()[self.key], ae_title=self.called)
            if not self.assoc.is_established:
                self.assoc = None
                raise ConnectionError("association refused")
        acked = set()
        for item in batch:
            rsp = self.assoc.send_c_store(item.path)
            status = rsp.get("Status") if rsp else None
            if status == 0:
                acked.add(item.uid)
            elif status in TEMPORARY_DICOM:
                self.ledger.count("temporary", self.transport)
            elif status is None:
                self.assoc.abort()
                self.assoc = None
                break
            else:
                raise RuntimeError(f"C-STORE {item.uid}: permanent status 0x{status:04X}")
        return acked


class StowSender(Sender):
    """dicomweb-client STOW-RS with the centre's bearer token."""

    transport = "stow"
    batch = 4

    def send(self, batch):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.kw['token']}"
        client = DICOMwebClient(url=f"http://127.0.0.1:{self.ports()['http']}/dicomweb", session=session)
        try:
            answer = client.store_instances([pydicom.dcmread(io.BytesIO(i.data)) for i in batch])
        except requests.HTTPError as e:
            if e.response is not None and e.response.status_code in (503, 500, 502, 504):
                self.ledger.count("temporary", self.transport)
                return set()
            raise
        finally:
            session.close()
        failed = {str(x.ReferencedSOPInstanceUID) for x in answer.get("FailedSOPSequence", [])}
        return {str(x.ReferencedSOPInstanceUID) for x in answer.get("ReferencedSOPSequence", [])} - failed


def package_of(item: Item, plugins) -> bytes:
    content = decode_content("application/dicom", item.data)
    attachment = next(t for t in plugins.object_types if t.recognise(content)).identifier(content)
    return build_package(content, attachment, origin=CENTRE_ADDRESS, destination=CENTRAL, message_id=item.message_id)


class SmtpSender(Sender):
    """smtplib: STARTTLS (central's certificate checked), AUTH as the centre, one message per object."""

    transport = "smtp"
    batch = 4

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.plugins = load_plugins()

    def send(self, batch):
        context = ssl.create_default_context(cafile=str(self.kw["ca"]))
        acked = set()
        with smtplib.SMTP("127.0.0.1", self.ports()["smtp"], timeout=10) as smtp:
            smtp.starttls(context=context)
            smtp.login(CENTRE_ADDRESS, self.kw["token"])
            for item in batch:
                try:
                    smtp.sendmail(CENTRE_ADDRESS, [CENTRAL], package_of(item, self.plugins))
                    acked.add(item.uid)
                except smtplib.SMTPResponseException as e:
                    if 400 <= e.smtp_code < 500:
                        self.ledger.count("temporary", self.transport)
                    else:
                        raise
        return acked


class TlsSocketSender(Sender):
    """medd's own TLS socket client (``send_packages``), pipelined, run on a reactor thread."""

    transport = "tls"
    batch = 6

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.plugins = load_plugins()

    def send(self, batch):
        from twisted.internet import reactor
        from twisted.internet.defer import ensureDeferred
        from twisted.internet.threads import blockingCallFromThread

        from medd.transports.tls import TransferIncomplete, send_packages

        packages = [package_of(i, self.plugins) for i in batch]
        try:
            replies = blockingCallFromThread(reactor, lambda: ensureDeferred(send_packages(
                reactor, "127.0.0.1", self.ports()["tls"], packages, ca_pem=self.kw["ca"].read_bytes(),
                client_cert=self.kw["client_cert"].read_bytes())))
        except TransferIncomplete as e:
            replies = e.replies
        acked = set()
        for item, reply in zip(batch, replies):
            if reply.get("status") == "ok":
                acked.add(item.uid)
            elif reply.get("status") == "retry":
                self.ledger.count("temporary", self.transport)
            else:
                raise RuntimeError(f"TLS {item.uid}: {reply}")
        return acked


def start_reactor_thread() -> None:
    """The TLS socket client is Twisted's: run the reactor on a thread of its own."""
    from twisted.internet import reactor

    if not reactor.running:
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True,
                         name="reactor").start()
        while not reactor.running:
            time.sleep(0.01)
