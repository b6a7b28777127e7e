"""The reading room's facade: everything the web UI asks of the viewer node.

Async methods returning plain dicts and lists; blocking work (database,
DICOM parsing, highdicom) runs on the node's thread pools. What the
radiologist produces (status messages, overlays, reports) is stored in the
local inbox through the same ingest path as everything else and queued,
durably, for central.
"""
from __future__ import annotations

import email.utils
import io
from datetime import datetime, timezone
from urllib.parse import urlsplit

import highdicom as hd
from pydicom import dcmread
from twisted.logger import Logger

from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import status_content
from medd.storage.index import object_by_uid
from medd.viewer import inbox, users
from medd.viewer.overlays import AnnotationError, build_presentation_state, read_presentation_state
from medd.viewer.reports import ReportError, build_text_report, read_report

__all__ = ["ReadingRoom", "AnnotationError", "ReportError", "UnknownObject"]

MAX_HEADER_VALUE = 256


class UnknownObject(KeyError):
    """No such object (image, study) in the local inbox."""


def dicom_header(data: bytes) -> list[tuple[str, str, str, str]]:
    """(tag, keyword, VR, value) of every element, file meta first; nested items indented with '>'."""
    ds = dcmread(io.BytesIO(data))
    out: list[tuple[str, str, str, str]] = []

    def walk(dataset, depth: int) -> None:
        for elem in dataset:
            tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
            keyword = ">" * depth + (elem.keyword or elem.name)
            if elem.VR == "SQ":
                out.append((tag, keyword, "SQ", f"{len(elem.value)} item(s)"))
                for item in elem.value:
                    walk(item, depth + 1)
                continue
            if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.tag == 0x7FE00010:
                raw = elem.value
                value = f"<{len(raw)} bytes>" if isinstance(raw, (bytes, bytearray)) else "<binary>"
            else:
                try:
                    value = str(elem.value) if elem.value is not None else ""
                except Exception as e:  # a value pydicom cannot convert; show that rather than fail
                    value = f"<unreadable: {type(e).__name__}>"
            if len(value) > MAX_HEADER_VALUE:
                value = value[:MAX_HEADER_VALUE] + "…"
            out.append((tag, keyword, str(elem.VR), value))

    walk(ds.file_meta, 0)
    walk(ds, 0)
    return out


class ReadingRoom:
    """What the UI may do; created by the viewer node as ``node.reading_room``."""

    log = Logger()

    def __init__(self, database, api, outgoing, config, settings, clock):
        self.db = database
        self.api = api  # the node's Ingest: read_blob, receive_package, run_blocking
        self.outgoing = outgoing
        self.node_name = config.name
        self.settings = settings
        self.clock = clock

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    # -- the inbox -------------------------------------------------------------------------------------

    async def worklist(self, filters: dict | None = None) -> list[dict]:
        """Studies in the inbox; see :func:`medd.viewer.inbox.worklist` for the filters (``user`` among them)."""
        filters = dict(filters or {})
        return await self.db.run(lambda c: inbox.worklist(c, filters))

    async def study(self, study_uid: str, user: str | None = None) -> dict:
        found = await self.db.run(lambda c: inbox.study(c, study_uid, user))
        if found is None:
            raise UnknownObject(study_uid)
        return found

    async def _record(self, uid: str):
        record = await self.db.run(lambda c: object_by_uid(c, uid))
        if record is None:
            raise UnknownObject(uid)
        return record

    async def instance_bytes(self, uid: str) -> bytes:
        """The stored Part 10 file of an object."""
        record = await self._record(uid)
        return await self.api.read_blob(record.digest)

    async def header(self, uid: str) -> list[tuple[str, str, str, str]]:
        data = await self.instance_bytes(uid)
        return await self.api.run_blocking(dicom_header, data)

    # -- what the radiologist does -----------------------------------------------------------------

    async def _central_address(self, record=None) -> str:
        """The To of packages for central: configured, else the sender of what central sent us."""
        if self.settings.address:
            return self.settings.address
        if record is not None and "@" in (record.origin or "") and record.transport != "local":
            return record.origin
        seen = await self.db.run(inbox.central_address_seen)
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
            await self.api.receive_package(package, transport="local", peer=None)
        await self.outgoing.queue(package, message_id=message_id, attachment=str(attachment), uid=attachment.uid)

    async def opened(self, uid: str, user: str) -> dict:
        """Record that ``user`` opened image ``uid`` and tell central (status ``opened``)."""
        record = await self._record(uid)
        at = self.now()
        first = await self.db.run(lambda c: inbox.mark_opened(c, uid, user, at))
        content = status_content("opened", uid, user, at)
        await self._send(content, AttachmentId.of("status", event="opened", uid=uid), record, store_locally=False)
        self.log.info("{user} opened {uid}", user=user, uid=uid)
        return {"uid": uid, "user": user, "time": at.isoformat(), "first": first}

    async def save_overlay(self, image_uid: str, user: str, annotations: list[dict]) -> str:
        """Save annotations as a GSPS on the image; returns the overlay's UID.

        Raises :class:`AnnotationError` for annotations that cannot be drawn.
        """
        record = await self._record(image_uid)
        if record.object_type != "image" or record.media_type != "application/dicom":
            raise AnnotationError(f"{image_uid} is not an image")
        image = await self.api.read_blob(record.digest)
        overlay_uid = str(hd.UID())
        at = self.now()

        def build():
            data = build_presentation_state(image, annotations, user=user, overlay_uid=overlay_uid,
                                            device=self.node_name, when=at)
            return parse_part10(data)

        content = await self.api.run_blocking(build)
        attachment = AttachmentId.of("overlay", uid=overlay_uid, image_uid=image_uid)
        await self._send(content, attachment, record, store_locally=True)
        self.log.info("{user} saved overlay {uid} on {image}", user=user, uid=overlay_uid, image=image_uid)
        return overlay_uid

    async def overlays(self, image_uid: str) -> list[dict]:
        """The annotations of every overlay stored for the image, oldest overlay first.

        Each annotation dict is as given to :meth:`save_overlay` (``type``,
        ``points``, ``text``, maybe ``frame``) plus ``overlay_uid``,
        ``author`` and ``created``.
        """
        found = await self.db.run(lambda c: inbox.attached(c, "overlay", image_uid=image_uid))
        out = []
        for uid, digest, _media_type, _origin in found:
            data = await self.api.read_blob(digest)
            try:
                ps = await self.api.run_blocking(read_presentation_state, data)
            except Exception:
                self.log.failure("cannot read overlay {uid}", uid=uid)
                continue
            for a in ps["annotations"]:
                out.append({**a, "overlay_uid": uid, "author": ps["author"], "created": ps["created"]})
        return out

    async def save_report(self, study_uid: str, user: str, text: str) -> str:
        """Save (and sign) a text report on the study as a Basic Text SR; returns its UID."""
        first = await self.db.run(lambda c: inbox.first_image_of_study(c, study_uid))
        if first is None:
            raise UnknownObject(study_uid)
        image_uid, digest = first
        record = await self._record(image_uid)
        evidence = await self.db.run(lambda c: inbox.study_evidence(c, study_uid))
        image = await self.api.read_blob(digest)
        report_uid = str(hd.UID())
        at = self.now()

        def build():
            data = build_text_report(image, evidence, text=text, user=user, report_uid=report_uid,
                                     device=self.node_name, when=at)
            return parse_part10(data)

        content = await self.api.run_blocking(build)
        attachment = AttachmentId.of("report", uid=report_uid, study_uid=study_uid)
        await self._send(content, attachment, record, store_locally=True)
        self.log.info("{user} saved report {uid} on study {study}", user=user, uid=report_uid, study=study_uid)
        return report_uid

    async def reports(self, study_uid: str) -> list[dict]:
        """The study's reports, oldest first: {uid, author, time, text, verified, origin}."""
        found = await self.db.run(lambda c: inbox.attached(c, "report", study_uid=study_uid))
        out = []
        for uid, digest, media_type, origin in found:
            data = await self.api.read_blob(digest)
            try:
                report = await self.api.run_blocking(read_report, data, media_type)
            except Exception:
                self.log.failure("cannot read report {uid}", uid=uid)
                continue
            out.append({**report, "uid": uid, "origin": origin})
        return out

    # -- users and sessions ------------------------------------------------------------------------

    async def check_password(self, name: str, password: str) -> bool:
        stored = await self.db.run(lambda c: users.password_hash(c, name))
        # scrypt is deliberately slow: it runs on the parsing pool, not the database's.
        return await self.api.run_blocking(users.check_hash, stored, password)

    async def create_session(self, user: str) -> str:
        return await self.db.run(lambda c: users.create_session(c, user))

    async def user_for_session(self, token: str | None) -> str | None:
        return await self.db.run(lambda c: users.user_for_session(c, token))

    async def end_session(self, token: str | None) -> None:
        await self.db.run(lambda c: users.end_session(c, token))
