"""The reading room's backend: everything the web UI asks of the viewer node,
as :class:`~medd.viewer.contract.IReadingRoom` describes it.

It holds the inbox and accounts connectors (no SQL of its own); blocking
work (DICOM parsing, highdicom, scrypt) runs on the node's parsing pool.
What the radiologist produces (status messages, overlays, reports) is stored
in the local inbox through the same ingest path as everything else and
queued, durably, for central.
"""
from __future__ import annotations

import email.utils
from datetime import datetime, timezone
from urllib.parse import urlsplit

import highdicom as hd
from twisted.logger import Logger
from zope.interface import implementer

from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import status_content
from medd.storage.inbox import OpenedMark, StudyDetail, WorklistPage, WorklistQuery
from medd.viewer.annotations import Annotation, AnnotationError
from medd.viewer.contract import IReadingRoom, OverlayView, ReportView, UnknownObject
from medd.viewer.overlays import build_presentation_state, read_presentation_state
from medd.viewer.reports import ReportError, build_text_report, read_report
from medd.throttling import LoginThrottle
from medd.viewer.users import check_hash

__all__ = ["ReadingRoom", "AnnotationError", "ReportError", "UnknownObject"]

# (user, image) pairs known to be recorded as opened, so that scrolling does not write to the database.
MAX_SHOWN_REMEMBERED = 100_000


@implementer(IReadingRoom)
class ReadingRoom:
    """What the UI may do; created by the viewer node as ``node.reading_room``.

    ``inbox`` and ``accounts`` are the :class:`~medd.storage.inbox.Inbox` and
    :class:`~medd.storage.accounts.Accounts` connectors; ``ingest`` is the
    node's :class:`~medd.ingest.Ingest` (``read_blob``, ``receive_package``,
    ``run_blocking``); ``outgoing`` queues packages for central.
    """

    log = Logger()

    def __init__(self, inbox, accounts, ingest, outgoing, node_name: str, settings, clock, audit=None):
        self.inbox = inbox
        self.accounts = accounts
        self.ingest = ingest
        self.outgoing = outgoing
        self.node_name = node_name
        self.settings = settings
        self.clock = clock
        self.login_throttle = LoginThrottle(clock)
        self._shown: set[tuple[str, str]] = set()
        self.audit = audit

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    # -- the inbox -------------------------------------------------------------------------------------

    async def worklist(self, query: WorklistQuery) -> WorklistPage:
        return await self.inbox.worklist(query)

    async def modalities(self) -> list[str]:
        return await self.inbox.modalities()

    async def study(self, study_uid: str, user: str | None = None) -> StudyDetail:
        found = await self.inbox.study(study_uid, user)
        if found is None:
            raise UnknownObject(study_uid)
        return found

    async def _record(self, uid: str):
        record = await self.inbox.record(uid)
        if record is None:
            raise UnknownObject(uid)
        return record

    async def instance_bytes(self, uid: str) -> bytes:
        """The stored Part 10 file of an object."""
        record = await self._record(uid)
        return await self.ingest.read_blob(record.digest)

    # -- what the radiologist does -----------------------------------------------------------------

    async def _central_address(self, record=None) -> str:
        """The To of packages for central: configured, else the sender of what central sent us."""
        if self.settings.address:
            return self.settings.address
        if record is not None and "@" in (record.origin or "") and record.transport != "local":
            return record.origin
        seen = await self.inbox.central_address_seen()
        return seen or f"central@{urlsplit(self.settings.url).hostname}"

    def _message_id(self) -> str:
        domain = self.node_name.rpartition("@")[2] or "medd.invalid"
        return email.utils.make_msgid(idstring="viewer", domain=domain)

    async def _send(self, content, attachment: AttachmentId, record, *, store_locally: bool) -> None:
        message_id = self._message_id()
        package = build_package(content, attachment, origin=self.node_name,
                                destination=await self._central_address(record), message_id=message_id)
        if store_locally:
            # The same package central gets: the local copy and central's share one Message-ID.
            await self.ingest.receive_package(package, transport="local", peer=None)
        await self.outgoing.queue(package, message_id=message_id, attachment=str(attachment), uid=attachment.uid)

    async def opened(self, uid: str, user: str, peer: str | None = None) -> OpenedMark:
        """Record that ``user`` (at ``peer``) was shown image ``uid``; the first time, tell central (status
        ``opened``)."""
        record = await self._record(uid)
        mark = await self.inbox.mark_opened(uid, user)
        await self.record_access("view", user=user, credential="session", peer=peer,
                                 patient_id=record.patient_id, study_instance_uid=record.study_instance_uid,
                                 series_instance_uid=getattr(record, "series_instance_uid", None),
                                 sop_instance_uid=uid, detail="opened in the reading room")
        if mark.first:
            content = status_content("opened", uid, user, mark.at)
            await self._send(content, AttachmentId.of("status", event="opened", uid=uid), record, store_locally=False)
            self.log.info("{user} opened {uid}", user=user, uid=uid)
        return mark

    async def pixels_shown(self, uid: str, user: str, peer: str | None = None) -> None:
        """``user``'s browser (at ``peer``) fetched the pixel data of ``uid`` to display it: :meth:`opened`,
        once per user and image (a viewer fetches a frame again as the radiologist scrolls back)."""
        key = (user, uid)
        if key in self._shown:
            return
        if len(self._shown) >= MAX_SHOWN_REMEMBERED:
            self._shown.clear()
        self._shown.add(key)  # before awaiting: concurrent fetches of one image's frames record it once
        try:
            await self.opened(uid, user, peer)
        except UnknownObject:
            pass  # not an object of the inbox (nothing to tell central about)
        except Exception:
            self._shown.discard(key)  # recorded at the next fetch
            raise

    async def save_overlay(self, image_uid: str, user: str, annotations: list[Annotation]) -> str:
        """Save annotations as a GSPS on the image; returns the overlay's UID.

        Raises :class:`AnnotationError` for annotations that cannot be drawn.
        """
        record = await self._record(image_uid)
        if record.object_type != "image" or record.media_type != "application/dicom":
            raise AnnotationError(f"{image_uid} is not an image")
        image = await self.ingest.read_blob(record.digest)
        overlay_uid = str(hd.UID())
        at = self.now()

        def build():
            data = build_presentation_state(image, annotations, user=user, overlay_uid=overlay_uid,
                                            device=self.node_name, when=at)
            return parse_part10(data)

        content = await self.ingest.run_blocking(build)
        attachment = AttachmentId.of("overlay", uid=overlay_uid, image_uid=image_uid)
        await self._send(content, attachment, record, store_locally=True)
        self.log.info("{user} saved overlay {uid} on {image}", user=user, uid=overlay_uid, image=image_uid)
        return overlay_uid

    async def overlays(self, image_uid: str) -> list[OverlayView]:
        """Every overlay stored for the image, oldest first."""
        out = []
        for found in await self.inbox.overlays_of(image_uid):
            data = await self.ingest.read_blob(found.digest)
            try:
                out.append(await self.ingest.run_blocking(read_presentation_state, data))
            except Exception:
                self.log.failure("cannot read overlay {uid}", uid=found.uid)
        return out

    async def save_report(self, study_uid: str, user: str, text: str) -> str:
        """Save (and sign) a text report on the study as a Basic Text SR; returns its UID."""
        image_uid = await self.inbox.first_image_of_study(study_uid)
        if image_uid is None:
            raise UnknownObject(study_uid)
        record = await self._record(image_uid)
        evidence = await self.inbox.study_evidence(study_uid)
        image = await self.ingest.read_blob(record.digest)
        report_uid = str(hd.UID())
        at = self.now()

        def build():
            data = build_text_report(image, evidence, text=text, user=user, report_uid=report_uid,
                                     device=self.node_name, when=at)
            return parse_part10(data)

        content = await self.ingest.run_blocking(build)
        attachment = AttachmentId.of("report", uid=report_uid, study_uid=study_uid)
        await self._send(content, attachment, record, store_locally=True)
        self.log.info("{user} saved report {uid} on study {study}", user=user, uid=report_uid, study=study_uid)
        return report_uid

    async def reports(self, study_uid: str) -> list[ReportView]:
        """The study's reports, oldest first."""
        out = []
        for found in await self.inbox.reports_of(study_uid):
            data = await self.ingest.read_blob(found.digest)
            try:
                report = await self.ingest.run_blocking(read_report, data, found.media_type)
            except Exception:
                self.log.failure("cannot read report {uid}", uid=found.uid)
                continue
            out.append(ReportView(uid=found.uid, author=report["author"], time=report["time"], text=report["text"],
                                  verified=bool(report["verified"]), origin=found.origin))
        return out

    # -- users and sessions ------------------------------------------------------------------------

    async def record_access(self, event: str, **fields) -> None:
        """Record ``event`` (login, logout, a refused login, a view) in the node's audit trail."""
        if self.audit is not None:
            await self.audit.record(event, transport="http", **fields)

    async def check_password(self, name: str, password: str) -> bool:
        stored = await self.accounts.password_hash(name)
        # scrypt is deliberately slow: it runs on the parsing pool, not the database's.
        return await self.ingest.run_blocking(check_hash, stored, password)

    async def create_session(self, user: str) -> str:
        return await self.accounts.create_session(user)

    async def user_for_session(self, token: str | None) -> str | None:
        return await self.accounts.user_for_session(token)

    async def end_session(self, token: str | None) -> None:
        await self.accounts.end_session(token)
