"""DICOM C-STORE and C-ECHO receiver (pynetdicom).

pynetdicom runs its own acceptor and association threads. Each received
object is handed to the reactor's ingest path and the association thread
waits for the outcome, so the C-STORE response reports what actually
happened: success only once the object is fsync'd and indexed.
"""
from __future__ import annotations

import copy
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter

from pydicom.dataset import Dataset
from pynetdicom import (AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
                        AllStoragePresentationContexts, evt)
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from twisted.application.service import Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from zope.interface import implementer

from medd.ingest import Refused, StoreFailed
from medd.plugins.api import CannotListen
from medd.plugins.hookspecs import AccessClaim, hookimpl
from medd.plugins.interfaces import ITransport
from medd.transports.handshakes import audit_certificate_refusal, certificate_refusal
from medd.transports.tlscontexts import stdlib_server_context
from medd.webresource import certificate_identity

# Transfer syntaxes accepted for every storage SOP class: the uncompressed
# ones plus the compressed syntaxes modalities actually send.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still seen)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

log = Logger()

# C-STORE failure statuses (PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
# "Data Set does not match SOP Class": the nearest failure PS3.4 B.2.3 has for
# a SOP Instance UID already held for another origin or with other content.
STATUS_CONFLICT = 0xA900


def readable(sockets: list, timeout: float) -> list:
    """The sockets among ``sockets`` with data (or a hang-up) to read, waiting at most ``timeout`` seconds.

    ``poll``, not ``select``: select refuses a descriptor numbered 1024 or
    more, and a node holding a thousand connections on its listeners gives
    new associations such numbers.
    """
    poller = select.poll()
    for sock in sockets:
        poller.register(sock, select.POLLIN | select.POLLPRI)
    ready = {fd for fd, _ in poller.poll(timeout * 1000)}
    return [sock for sock in sockets if sock.fileno() in ready]


class _PromptDUL(DULServiceProvider):
    """A DUL provider that wakes as soon as there is work, instead of polling.

    pynetdicom's DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever its
    loop finds nothing to do, so every PDU received and every response sent
    waits for the end of a sleep: about 1 ms per C-STORE, a quarter of what
    a small object costs in all. Here that sleep becomes a ``poll`` on the
    peer's socket and on a wake-up socket that :meth:`send_pdu` writes to, so
    incoming data and outgoing responses are handled at once. The wait is
    capped so that pynetdicom's timers (ARTIM, idle) still fire; an idle
    association wakes 100 times a second rather than 1000.

    pynetdicom calls ``time.sleep(self._run_loop_delay)`` only when idle,
    which is why the wait lives in that attribute's getter.
    """

    IDLE_WAIT = 0.01

    def __init__(self, assoc):
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        super().__init__(assoc)
        machine = self.state_machine
        act = machine.do_action

        def do_action(event: str) -> None:
            before = machine.current_state
            act(event)
            if before != "Sta1" and machine.current_state == "Sta1":
                # The connection is closed (a PDU past its deadline, a peer gone, ARTIM expired). An
                # acceptor still waiting for its A-ASSOCIATE-RQ waits on this queue for up to [dicom]
                # timeout, holding its threads and its place among the per-peer and total caps: None
                # is what it gets when that wait times out, so it ends now. An established one has
                # been handed its A-P-ABORT first and never reads this.
                self.to_user_queue.put(None)

        machine.do_action = do_action

    @property
    def _run_loop_delay(self) -> float:
        peer = getattr(self.socket, "socket", None)
        try:
            ready = readable([peer, self._wake_r] if peer is not None else [self._wake_r], self.IDLE_WAIT)
        except (OSError, ValueError):  # a socket closed under us: fall back to pynetdicom's pace
            time.sleep(0.001)
            return 0
        if self._wake_r in ready:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
        return 0

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        pass  # set by pynetdicom's __init__; the wait above replaces it

    def send_pdu(self, primitive) -> None:
        super().send_pdu(primitive)
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (already awake) or closed (thread done)
            pass

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()


DEFAULT_TIMEOUT = 60.0
# [dicom] max_pdu_size: the largest P-DATA-TF PDU the node advertises and accepts. Each PDU
# costs pynetdicom's two threads a round of work whatever its size: at 64 KiB rather than
# pynetdicom's 16 KiB a small object comes in one PDU instead of three, and a 0.5 MB one costs
# 20 % less CPU (bench/README.md). Each PDU is read whole into memory, one per association.
MAX_PDU_SIZE = 65536
MIN_PDU_SIZE, MAX_PDU_LIMIT = 4096, 4 * 1024 * 1024
# The A-ASSOCIATE-RQ of a modality proposing every storage SOP class is tens of
# kilobytes; P-DATA-TF PDUs are capped at the maximum length the node advertised.
MAX_NEGOTIATION_PDU = 1024 * 1024
P_DATA_TF = 0x04


class _DeadlineSocket(AssociationSocket):
    """An association socket on which each PDU must arrive within a deadline, and no longer than advertised.

    pynetdicom reads a PDU with blocking ``recv(6)`` then ``recv(length)`` on a
    socket without a timeout: a peer that sends 3 bytes holds the association
    thread for ever (its ARTIM and idle timers run on that thread), and a
    header claiming 2^31 bytes is read into memory as the bytes come. Here a
    PDU is due ``[limits] request_timeout`` (or ``[dicom] timeout`` if shorter)
    after its header is awaited, plus its length at ``min_rate``; a longer one
    than the node accepts ends the connection, and so does one past its
    deadline (its association ends with it: :class:`_PromptDUL`).
    """

    timeout: float = DEFAULT_TIMEOUT
    min_rate: int = 50_000
    max_pdu_length: int = 16382
    _due = 0.0
    _pdu_type = 0

    @property
    def ready(self) -> bool:
        """Whether data waits on the socket; pynetdicom's own check uses select
        and ends the association (Evt17) when the descriptor is 1024 or more."""
        if self.socket is None or self._is_connected is False:
            return False
        try:
            waiting = bool(readable([self.socket], 0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        # A TLS socket may hold decrypted bytes that poll cannot see.
        return waiting or bool(getattr(self.socket, "pending", lambda: 0)())

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6:  # the header of the next PDU (dul.DULServiceProvider._read_pdu_data)
            self._due = time.monotonic() + self.timeout
        else:
            limit = self.max_pdu_length if self._pdu_type == P_DATA_TF else MAX_NEGOTIATION_PDU
            if nr_bytes > limit:
                # pynetdicom turns this into Evt17 (connection closed) and ends the association.
                raise OSError(f"a PDU of type 0x{self._pdu_type:02X} claims {nr_bytes} bytes, over the {limit} accepted")
            self._due += nr_bytes / self.min_rate
        data = bytearray()
        while len(data) < nr_bytes:
            left = self._due - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"PDU not received within its deadline ({len(data)} of {nr_bytes} bytes)")
            self.socket.settimeout(left)
            chunk = self.socket.recv(min(65536, nr_bytes - len(data)))
            if not chunk:
                break
            data += chunk
        self.socket.settimeout(None)
        if nr_bytes == 6 and data:
            self._pdu_type = data[0]
        return data


class _SlotAssociation(Association):
    """An acceptor association that gives its peer's connection slot back when its thread ends.

    ``medd_certificate`` is the peer's verified client certificate (DICOM TLS), and
    ``medd_centre`` the access decision naming the centre it is registered to, if it is one's."""

    _medd_slot: tuple | None = None
    medd_certificate = None
    medd_centre = None

    def run(self) -> None:
        try:
            super().run()
        finally:
            server, host = self._medd_slot
            server.release_slot(host)


class _PromptRequestHandler(RequestHandler):
    """Gives each accepted association a :class:`_PromptDUL` and a :class:`_DeadlineSocket`.
    On the DICOM TLS listener the TLS handshake happens here, on the
    association's own thread and within the PDU deadline. The connection's
    slot among its peer's (taken at accept, :meth:`_NoDelayServer.verify_request`)
    is given back when its association ends, or here when none starts."""

    log = Logger()

    def handle(self) -> None:
        started = False
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._handshake():
                return
            super().handle()
            started = True
        finally:
            if not started:
                self.server.release_slot(self.client_address[0])

    def _handshake(self) -> bool:
        host = self.client_address[0]
        try:
            # A peer that connects and says nothing holds only this thread, and only until the timeout.
            self.request.settimeout(self.server.pdu_timeout)
            self.request.do_handshake()
            self.request.settimeout(None)
            der = self.request.getpeercert(binary_form=True) if self.server.identify_by_certificate else None
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; TimeoutError too
            self.log.warn("dicom tls handshake with {peer} failed: {reason}", peer=host, reason=str(e) or type(e).__name__)
            refused = certificate_refusal(e)
            if refused is not None:
                self.server.reactor.callFromThread(audit_certificate_refusal, self.server.api, "dicom_tls", host, refused)
            try:
                self.request.close()
            except OSError:
                pass
            return False
        if der:
            from cryptography import x509

            self.certificate = certificate_identity(x509.load_der_x509_certificate(der))
        return True

    #: The verified client certificate's CN and fingerprint (DICOM TLS with [tls] client_ca), if any.
    certificate = None

    def _create_association(self):
        assoc = super()._create_association()
        assoc.__class__ = _SlotAssociation
        assoc._medd_slot = (self.server, self.client_address[0])
        assoc.medd_certificate = self.certificate
        sock = assoc.dul.socket
        # The socket pynetdicom made has already queued its connection event;
        # it is given the deadline's recv rather than rebuilt.
        sock.__class__ = _DeadlineSocket
        sock.timeout = self.server.pdu_timeout
        sock.max_pdu_length = self.ae.maximum_pdu_size
        sock.min_rate = self.server.min_rate
        polling = assoc.dul
        prompt = _PromptDUL(assoc)
        # The association's timeouts live in these timers; its socket is set
        # and has already queued its connection event.
        prompt.artim_timer, prompt._idle_timer = polling.artim_timer, polling._idle_timer
        prompt.socket = polling.socket
        prompt.event_queue = polling.event_queue
        assoc.dul = prompt
        return assoc


class _AcceptorContexts(list):
    """The listener's presentation contexts, which pynetdicom deep-copies for
    every association it accepts: 70 ms of CPU for our 170 contexts of 16
    transfer syntaxes, most of it copying UID strings, which are immutable.
    A copy of each context with its own list of the same UIDs is as good, so
    a burst of connections (200 stalled ones reconnecting) does not keep a
    modality's association waiting for seconds."""

    def __deepcopy__(self, memo):
        copies = []
        for context in self:
            mine = copy.copy(context)
            mine._transfer_syntax = list(context._transfer_syntax)
            copies.append(mine)
        return copies


class _NoDelayServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every accepted socket: with Nagle's algorithm on,
    each C-STORE response waits for a delayed ACK (~40 ms).

    With an ``ssl_context`` (the DICOM TLS listener), the accepted socket is
    wrapped without its handshake: pynetdicom would do it here, on the one
    acceptor thread, where a peer that never completes it would stop every
    other connection; :class:`_PromptRequestHandler` does it on the
    association's thread instead.
    """

    # socketserver listens with a backlog of 5: a burst of connections (a
    # peer reconnecting 200 stalled ones) fills it, and a modality's SYN is
    # dropped and retried a second or more later. Twisted's listeners use 50.
    request_queue_size = 128
    max_per_peer = 32

    def __init__(self, *args, **kwargs):
        self._slots: Counter[str] = Counter()
        self._slots_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def verify_request(self, request, client_address) -> bool:
        """Take one of the peer's ``[limits] max_connections_per_peer`` slots, or close the connection.

        Counted here, on the one acceptor thread, as each connection is
        accepted: counting the running associations instead missed those whose
        thread had not started yet, so simultaneous connects overshot the cap.
        """
        host = client_address[0]
        with self._slots_lock:
            held = self._slots[host]
            if held < self.max_per_peer:
                self._slots[host] += 1
                return True
        log.warn("dicom connection from {peer} closed: it already has {count} open (the most per peer)",
                 peer=host, count=held)
        return False  # socketserver closes it

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.release_slot(client_address[0])  # no thread started to give it back
            raise

    def release_slot(self, host: str) -> None:
        with self._slots_lock:
            self._slots[host] -= 1
            if self._slots[host] <= 0:
                del self._slots[host]

    def slots(self, host: str) -> int:
        """The connections ``host`` holds on this listener."""
        with self._slots_lock:
            return self._slots[host]

    def get_request(self):
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


def endpoint_address(reactor, description: str) -> tuple[str, int]:
    """(interface, port) of a ``tcp:``/``tcp6:`` endpoint string.

    pynetdicom binds its own socket, so only plain TCP endpoints can be
    honoured; anything else is refused at start-up.
    """
    endpoint = serverFromString(reactor, description)
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise ValueError(f"the dicom listener needs a tcp: endpoint, not {description!r}")
    # Twisted keeps these as private attributes; they have been stable since 10.x.
    default = "::" if isinstance(endpoint, TCP6ServerEndpoint) else "0.0.0.0"
    return endpoint._interface or default, endpoint._port


def _ui(value: str) -> bytes:
    """A UI value as stored: ASCII, padded with NUL to an even length, at most 64 characters."""
    raw = str(value).encode("ascii")
    if not 0 < len(raw) <= 64:
        raise ValueError(f"not a UID: {value!r}")
    return raw + b"\0" if len(raw) % 2 else raw


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


_META_VERSION = _element(0x00020001, b"OB", b"\0\1")
_META_IMPLEMENTATION = (_element(0x00020012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID))
                        + _element(0x00020013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")))


def part10(event) -> bytes:
    """The C-STORE request's data set as received, behind a preamble and the file meta that
    ``event.encoded_dataset(include_meta=True)`` would give it (pynetdicom's implementation UID
    and version), without building the meta as a pydicom dataset to encode it: that took as
    long as everything else this thread does for a small object. A SOP class, instance or
    transfer syntax UID that is no UID raises ValueError."""
    request = event.request
    group = b"".join((
        _META_VERSION,
        _element(0x00020002, b"UI", _ui(request.AffectedSOPClassUID)),
        _element(0x00020003, b"UI", _ui(request.AffectedSOPInstanceUID)),
        _element(0x00020010, b"UI", _ui(event.context.transfer_syntax)),
        _META_IMPLEMENTATION,
    ))
    return b"".join((b"\0" * 128, b"DICM", _element(0x00020000, b"UL", struct.pack("<I", len(group))), group,
                     event.encoded_dataset(include_meta=False)))


def _failure(status: int, reason: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = reason[:64]  # LO: at most 64 characters
    return ds


DEFAULT_AE_TITLE = "MEDD"


class DicomListener(Service):
    """A pynetdicom Storage SCP feeding the node's ingest path; over DICOM TLS
    (PS3.15 B.1) when given an ``ssl_context``."""

    log = Logger()

    def __init__(self, reactor, description: str, api, ssl_context: ssl.SSLContext | None = None):
        self.reactor = reactor
        self.description = description
        self.api = api
        self.ssl_context = ssl_context
        self.label = "dicom_tls" if ssl_context is not None else "dicom"
        # [dicom] ae_title, validated with the rest of the config at start.
        self.ae_title = api.settings.get("ae_title") or DEFAULT_AE_TITLE
        self.timeout = float(api.settings.get("timeout") or DEFAULT_TIMEOUT)
        self.max_pdu_size = int(api.settings.get("max_pdu_size") or MAX_PDU_SIZE)
        self.server = None
        self.address = endpoint_address(reactor, description)

    def _handle_store(self, event) -> int | Dataset:
        # Runs on a pynetdicom association thread, never on the reactor.
        calling = event.assoc.requestor.ae_title.strip()
        centre = getattr(event.assoc, "medd_centre", None)
        # A centre's certificate names the sender by the centre's address, as a package's From
        # (transport dicom_tls: central files it by address, not by AE title and networks).
        origin, transport, user = (centre.address, "dicom_tls", centre.who) if centre else (calling, "dicom", None)
        try:
            try:
                data = part10(event)
            except ValueError as e:
                raise Refused(f"the C-STORE request's {e}") from e
            # This thread waits for the outcome anyway: it parses and writes the object itself.
            self.api.receive_dicom_waiting(data, transport=transport, origin=origin, peer=event.assoc.requestor.address,
                                           user=user)
        except Refused as e:
            self.log.warn("C-STORE from {ae} refused: {reason}", ae=calling, reason=e.reason)
            status = {"too-large": STATUS_OUT_OF_RESOURCES, "conflict": STATUS_CONFLICT}.get(
                e.kind, STATUS_CANNOT_UNDERSTAND)
            return _failure(status, e.reason)
        except StoreFailed as e:
            self.log.error("C-STORE from {ae} not stored: {reason}", ae=calling, reason=str(e))
            return _failure(STATUS_OUT_OF_RESOURCES, str(e))
        except Exception as e:
            self.log.failure("C-STORE from {ae} failed", ae=calling)
            return _failure(STATUS_OUT_OF_RESOURCES, f"internal error: {type(e).__name__}")
        return STATUS_SUCCESS

    def _handle_requested(self, event) -> None:
        # Runs on the association thread once the A-ASSOCIATE-RQ is read, before
        # negotiation: a peer the node does not accept is rejected right here.
        request = event.assoc.requestor.primitive
        calling = request.calling_ae_title.strip()
        called = request.called_ae_title.strip()
        peer = event.assoc.requestor.address
        if self._named_centre(event.assoc):
            return  # a registered centre's certificate: its AE title names nothing
        try:
            reason = blockingCallFromThread(self.reactor, self.api.accept_association, calling, called, peer)
        except Exception:
            self.log.failure("deciding on the association from {ae} at {peer} failed", ae=calling, peer=peer)
            reason = "the decision failed"
        if reason:
            self.log.warn("association from {ae} at {peer} rejected: {reason}", ae=calling, peer=peer, reason=reason)
            # rejected-permanent, by the service user, calling AE title not recognised (PS3.8 9.3.4)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # as pynetdicom does after its own rejections

    def _named_centre(self, assoc) -> bool:
        """Whether the association's verified client certificate is the one registered for a
        centre whose address is its CN (``medd centres add --client-cert``); the association is
        then that centre's, whatever its AE title or network."""
        certificate = getattr(assoc, "medd_certificate", None)
        if certificate is None:
            return False
        claim = AccessClaim(action="associate", transport=self.label, peer=certificate.common_name,
                            certificate=certificate.sha256)
        try:
            decision = blockingCallFromThread(self.reactor, self.api.check_access, claim)
        except Exception:
            self.log.failure("deciding whose certificate {cn} is failed", cn=certificate.common_name)
            return False
        if not decision.allowed:
            return False
        assoc.medd_centre = decision
        self.log.info("dicom_tls association from {peer} is centre {centre}'s by its client certificate",
                      peer=assoc.requestor.address, centre=decision.who)
        return True

    def privilegedStartService(self) -> None:
        # Bind before the reactor runs (twistd calls this first): a port
        # that cannot be had raises CannotListen and the node does not start.
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        # The per-peer cap (below) keeps one peer from taking them all; the
        # [dicom] timeout drops a half-open association and a stalled PDU.
        ae.maximum_associations = 256
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.maximum_pdu_size = self.max_pdu_size
        # Only associations called to [dicom] ae_title; others are rejected-permanent by the service user,
        # reason 7 "called AE title not recognised" (PS3.8 9.3.4).
        ae.require_called_aet = True
        self.ae = ae
        try:
            self.server = ae.make_server(
                self.address,
                ae_title=self.ae_title,
                evt_handlers=[(evt.EVT_C_STORE, self._handle_store), (evt.EVT_REQUESTED, self._handle_requested)],
                server_class=_NoDelayServer,
                request_handler=_PromptRequestHandler,
                ssl_context=self.ssl_context,
            )
        except OSError as e:
            raise CannotListen.from_error(self.label, self.description, e) from e
        self.server.contexts = _AcceptorContexts(self.server.contexts)
        # A PDU (and a DICOM TLS handshake) is a unit of work like an HTTP request on the other
        # listeners: due [limits] request_timeout after it begins, never later than [dicom] timeout.
        self.server.pdu_timeout = min(self.api.limits.request_timeout, self.timeout)
        self.server.max_per_peer = self.api.limits.max_connections_per_peer
        self.server.reactor, self.server.api = self.reactor, self.api
        # Only a certificate verified against [tls] client_ca names anyone.
        self.server.identify_by_certificate = (self.ssl_context is not None
                                               and self.ssl_context.verify_mode == ssl.CERT_REQUIRED)
        self.server.min_rate = self.api.limits.min_transfer_rate
        # What AE.start_server(block=False) does; its shutdown() expects it.
        ae._servers.append(self.server)

    def startService(self) -> None:
        super().startService()
        if self.server is None:
            self._bind()
        thread = threading.Thread(target=self.server.serve_forever, name="medd-dicom-acceptor", daemon=True)
        thread.start()
        self.log.info("{label} listening on {host}:{port} as {ae}", label=self.label, host=self.server.server_address[0],
                      port=self.server.server_address[1], ae=self.ae_title)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stopService(self):
        super().stopService()
        if self.server is not None:
            server, self.server = self.server, None
            # shutdown() waits for serve_forever to return; aborting open
            # associations happens on their own threads.
            from twisted.internet.threads import deferToThread

            def shut():
                server.shutdown()
                for assoc in list(server.active_associations):
                    assoc.abort()

            return deferToThread(shut)
        return None


@implementer(ITransport)
class DicomTransport:
    name = "dicom"
    description = "DICOM C-STORE/C-ECHO receiver (pynetdicom)"

    def listener(self, endpoint: str, api):
        return DicomListener(api.reactor, endpoint, api)


@implementer(ITransport)
class DicomTlsTransport:
    """The same receiver over TLS (``[listen] dicom_tls``), from the node's ``[tls]`` files: TLS 1.2+
    with the BCP 195 suites, and a client certificate required when ``[tls] client_ca`` is set. It
    answers to ``[dicom] ae_title`` and keeps ``[dicom] timeout``, like the plain listener."""

    name = "dicom_tls"
    description = "DICOM C-STORE/C-ECHO receiver over TLS (pynetdicom, PS3.15 B.1 secure transport)"
    #: The config section whose keys this listener reads (TransportAPI.settings).
    settings_section = "dicom"

    def listener(self, endpoint: str, api):
        return DicomListener(api.reactor, endpoint, api, ssl_context=stdlib_server_context(api.tls))


@hookimpl
def medd_register_transports(register) -> None:
    register(DicomTransport())
    register(DicomTlsTransport())


def check_dicom_section(section) -> None:
    ae = section.get("ae_title")
    if ae is not None and not (len(ae) <= 16 and ae.isascii() and "\\" not in ae):
        section.problem("ae_title", "must be 1 to 16 ASCII characters without backslash")
    size = section.get("max_pdu_size")
    if size is not None and not (size.isdigit() and MIN_PDU_SIZE <= int(size) <= MAX_PDU_LIMIT):
        section.problem("max_pdu_size", f"not a number of bytes from {MIN_PDU_SIZE} to {MAX_PDU_LIMIT}: {size!r}")
    timeout = section.get("timeout")
    if timeout is not None:
        try:
            if not 0 < float(timeout) <= 3600:
                raise ValueError(timeout)
        except ValueError:
            section.problem("timeout", f"not a number of seconds between 0 and 3600: {timeout!r}")


def check_dicom_endpoint(section) -> None:
    for key in ("dicom", "dicom_tls"):
        description = section.get(key)
        if description is None:
            continue
        try:
            endpoint_address(None, description)
        except ValueError as e:  # the endpoint string itself is checked by the core
            if "needs a tcp:" in str(e):
                section.problem(key, str(e).replace("the dicom listener", f"the {key} listener"))


@hookimpl
def medd_register_config(register) -> None:
    # [dicom] ae_title: the called AE title the listener answers to.
    # [dicom] timeout: seconds for association negotiation, a DIMSE message, an idle association and one PDU.
    # [dicom] max_pdu_size: the largest P-DATA-TF PDU advertised and accepted, in bytes.
    register("dicom", ["ae_title", "timeout", "max_pdu_size"], check_dicom_section)
    # pynetdicom binds its own socket: only tcp:/tcp6: endpoints will do (dicom_tls: TLS from [tls]).
    register("listen", ["dicom", "dicom_tls"], check_dicom_endpoint)
