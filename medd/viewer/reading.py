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
from medd.package import AttachmentId, ReportSource, build_package
from medd.plugins.objecttypes import status_content
from medd.throttling import LoginThrottle
from medd.storage.inbox import OpenedMark, StudyDetail, StudyRow, WorklistPage, WorklistQuery
from medd.storage.reporting import Reporting
from medd.viewer.annotations import Annotation, AnnotationError
from medd.viewer.contract import CannotAnnotate, IReadingRoom, OverlayView, ReportDesk, ReportView, UnknownObject
from medd.viewer.measurements import is_measurement_report, read_measurement_report
from medd.viewer.overlays import build_presentation_state, read_presentation_state
from medd.viewer.reports import ReportError, build_text_report, read_report
from medd.viewer.settings import ReadingRoomSettings, default_templates
from medd.viewer.templates import template_for
from medd.viewer.users import check_hash

__all__ = ["ReadingRoom", "AnnotationError", "ReportError", "UnknownObject"]

# (user, image) pairs known to be recorded as opened, so that scrolling does not write to the database.
MAX_SHOWN_REMEMBERED = 100_000
# How a radiologist's measurement report reaches the inbox: OHIF's STOW-RS.
MEASUREMENT_TRANSPORTS = ("http", "https")


@implementer(IReadingRoom)
class ReadingRoom:
    """What the UI may do; created by the viewer node as ``node.reading_room``.

    ``inbox`` and ``accounts`` are the :class:`~medd.storage.inbox.Inbox` and
    :class:`~medd.storage.accounts.Accounts` connectors; ``ingest`` is the
    node's :class:`~medd.ingest.Ingest` (``read_blob``, ``receive_package``,
    ``run_blocking``); ``outgoing`` queues packages for central; ``reporting`` is the
    :class:`~medd.storage.reporting.Reporting` connector (drafts, report sources) and ``templates`` the
    folder of report templates.
    """

    log = Logger()

    def __init__(self, inbox, accounts, ingest, outgoing, node_name: str, settings, clock, audit=None,
                 room_settings: ReadingRoomSettings | None = None, reporting=None, templates=None):
        self.inbox = inbox
        self.reporting = reporting or Reporting(inbox.db, clock)
        self.templates = templates or default_templates()
        self.accounts = accounts
        self.ingest = ingest
        self.outgoing = outgoing
        self.node_name = node_name
        self.settings = settings
        self.clock = clock
        self.login_throttle = LoginThrottle(clock)
        self._shown: set[tuple[str, str]] = set()
        self.audit = audit
        self.room_settings = room_settings or ReadingRoomSettings()
        # Who is reading which study: study UID -> {user: when they last opened it or fetched its pixels}.
        # In memory: a claim lasts minutes, and a restart of the node ends every reading anyway.
        self._reading: dict[str, dict[str, float]] = {}
        self._study_of: dict[str, str] = {}  # image UID -> study UID, for the images in _shown

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    # -- the inbox -------------------------------------------------------------------------------------

    async def worklist(self, query: WorklistQuery) -> WorklistPage:
        return await self.inbox.worklist(query)

    async def modalities(self) -> list[str]:
        return await self.inbox.modalities()

    def is_complete(self, row: StudyRow) -> bool:
        """True when the study has had no new image for ``complete_after`` seconds and holds every image
        central said it routes here (when it said)."""
        if row.received_at is None or row.images < (row.expected_images or 0):
            return False
        return self.clock.seconds() - row.received_at.timestamp() >= self.room_settings.complete_after

    def _touch_reading(self, study_uid: str, user: str) -> None:
        self._reading.setdefault(study_uid, {})[user] = self.clock.seconds()

    def being_read_by(self, study_uid: str, other_than: str | None = None) -> list[str]:
        """The users reading the study now (they opened it, or their browser fetched its pixels, within
        ``being_read_for`` seconds), but ``other_than``."""
        readers = self._reading.get(study_uid)
        if not readers:
            return []
        since = self.clock.seconds() - self.room_settings.being_read_for
        for user in [u for u, at in readers.items() if at < since]:
            del readers[user]
        if not readers:
            del self._reading[study_uid]
        return sorted(u for u in readers if u != other_than)

    async def open_study(self, study_uid: str, user: str, confirmed: bool = False) -> list[str]:
        """``user`` starts reading the study: the others reading it now; unless ``confirmed``, the study is
        claimed only when nobody else reads it (the caller asks the user before reading it twice)."""
        if await self.inbox.first_image_of_study(study_uid) is None:
            raise UnknownObject(study_uid)
        others = self.being_read_by(study_uid, other_than=user)
        if confirmed or not others:
            self._touch_reading(study_uid, user)
            self.log.info("{user} opens study {study}{also}", user=user, study=study_uid,
                          also=f" (also read by {', '.join(others)})" if others else "")
        return others

    async def next_unread(self, user: str) -> str | None:
        """The study ``user`` should read next: nobody opened it, it has no report and nobody else is reading it;
        STAT first, then the one waiting longest."""
        for study_uid in await self.inbox.unread_studies(limit=200):
            if not self.being_read_by(study_uid, other_than=user):
                return study_uid
        return None

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

    async def _send(self, content, attachment: AttachmentId, record, *, store_locally: bool,
                    report_source: ReportSource | None = None) -> None:
        message_id = self._message_id()
        package = build_package(content, attachment, origin=self.node_name,
                                destination=await self._central_address(record), message_id=message_id,
                                report_source=report_source)
        if store_locally:
            # The same package central gets: the local copy and central's share one Message-ID.
            await self.ingest.receive_package(package, transport="local", peer=None)
        await self.outgoing.queue(package, message_id=message_id, attachment=str(attachment), uid=attachment.uid)

    async def opened(self, uid: str, user: str, peer: str | None = None) -> OpenedMark:
        """Record that ``user`` (at ``peer``) was shown image ``uid``; the first time, tell central (status
        ``opened``)."""
        record = await self._record(uid)
        if record.object_type == "image":
            self._study_of[uid] = record.study_instance_uid
            self._touch_reading(record.study_instance_uid, user)
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
            if uid in self._study_of:
                self._touch_reading(self._study_of[uid], user)
            return
        if len(self._shown) >= MAX_SHOWN_REMEMBERED:
            self._shown.clear()
            self._study_of.clear()
        self._shown.add(key)  # before awaiting: concurrent fetches of one image's frames record it once
        try:
            await self.opened(uid, user, peer)
        except UnknownObject:
            pass  # not an object of the inbox (nothing to tell central about)
        except Exception:
            self._shown.discard(key)  # recorded at the next fetch
            raise

    async def _image_record(self, image_uid: str):
        """The index record of an image this viewer holds (:class:`AnnotationError` for anything else)."""
        record = await self._record(image_uid)
        if record.object_type != "image" or record.media_type != "application/dicom":
            raise AnnotationError(f"{image_uid} is not an image")
        return record

    async def _presentation_state(self, record, user: str, annotations: list[Annotation], *,
                                  withdrawal: bool = False):
        """A new GSPS of ``annotations`` on the image of ``record``, built off the reactor: (its UID, its content)."""
        image = await self.ingest.read_blob(record.digest)
        overlay_uid = str(hd.UID())
        at = self.now()

        def build():
            return parse_part10(build_presentation_state(image, annotations, user=user, overlay_uid=overlay_uid,
                                                         device=self.node_name, when=at, withdrawal=withdrawal))

        return overlay_uid, await self.ingest.run_blocking(build)

    async def save_overlay(self, image_uid: str, user: str, annotations: list[Annotation]) -> str:
        """Save annotations as a GSPS on the image; returns the overlay's UID.

        Raises :class:`AnnotationError` for annotations that cannot be drawn.
        """
        record = await self._image_record(image_uid)
        overlay_uid, content = await self._presentation_state(record, user, annotations)
        attachment = AttachmentId.of("overlay", uid=overlay_uid, image_uid=image_uid)
        await self._send(content, attachment, record, store_locally=True)
        self.log.info("{user} saved overlay {uid} on {image}", user=user, uid=overlay_uid, image=image_uid)
        return overlay_uid

    async def measurements_saved(self, report) -> list[str]:
        """A radiologist saved a measurement report (OHIF's SR, stored over STOW-RS as ``report``, an index
        record, filed as an overlay): send central the SR itself, as an overlay of the first image it measures
        (superseding the study's previous measurement report), then one GSPS per image it draws on, each
        superseding the image's previous overlay, and an empty one (a withdrawal) for each image that the study's
        previous measurement report drew on and this one no longer does. Returns the new GSPS' UIDs.

        Nothing is lost: every version stays stored here and on central, which marks the newest current."""
        data = await self.ingest.read_blob(report.digest)
        if not await self.ingest.run_blocking(is_measurement_report, data):
            return []
        drawn = await self.ingest.run_blocking(read_measurement_report, data)
        if drawn.skipped:
            self.log.warn("measurement report {uid}: {n} 3D coordinates not sent as overlays", uid=report.sop_instance_uid,
                          n=drawn.skipped)
        withdrawn = []
        previous = await self._previous_measurements(report)
        await self._send_measurement_report(report, data, previous)
        if previous is not None:
            before = await self.ingest.run_blocking(read_measurement_report,
                                                    await self.ingest.read_blob(previous.digest))
            withdrawn = [uid for uid in before.annotations if uid not in drawn.annotations]
        user = report.origin
        out = []
        for image_uid, drawing in [*drawn.annotations.items(), *((uid, []) for uid in withdrawn)]:
            try:
                out.append(await self._overlay_version(image_uid, user, drawing, report.sop_instance_uid))
            except (UnknownObject, AnnotationError, CannotAnnotate) as e:
                self.log.warn("measurement report {uid}: no overlay on {image}: {why}", uid=report.sop_instance_uid,
                              image=image_uid, why=str(e))
        return out

    async def withdraw_measurements(self, study_uid: str, user: str) -> list[str]:
        """``user`` deleted the study's measurements: each image whose newest overlay still draws something gets
        an empty new version (a withdrawal) on central. Returns the withdrawals' UIDs (none if nothing was drawn)."""
        study = await self.study(study_uid)
        out = []
        for series in study.series:
            for instance in series.instances:
                if await self._newest_overlay_draws(instance.uid):
                    out.append(await self._overlay_version(instance.uid, user, [], "(deleted in the reading room)"))
        return out

    async def _newest_overlay_draws(self, image_uid: str) -> bool:
        """Whether the image's newest overlay has annotations (it is not a withdrawal), False without one."""
        earlier = await self.inbox.overlays_of(image_uid)
        if not earlier:
            return False
        data = await self.ingest.read_blob(earlier[-1].digest)
        return bool((await self.ingest.run_blocking(read_presentation_state, data)).annotations)

    async def _send_measurement_report(self, report, data: bytes, previous) -> None:
        """Queue the measurement report for central as an overlay of its first image (stored here already; filed as
        an overlay, so its evidence lists images)."""
        content = await self.ingest.run_blocking(parse_part10, data)
        params = {"uid": report.sop_instance_uid, "image_uid": content.keyinfo.referenced_image_uids[0]}
        if previous is not None:
            params["supersedes"] = previous.sop_instance_uid
        image = await self.inbox.record(params["image_uid"])
        await self._send(content, AttachmentId.of("overlay", **params), image or report, store_locally=False)
        self.log.info("measurement report {uid} queued for central", uid=report.sop_instance_uid)

    async def _previous_measurements(self, report):
        """The study's newest measurement report saved before ``report`` from the reading room, or None."""
        reports = [r.uid for r in await self.inbox.measurements_of(report.study_instance_uid)]  # in the order stored
        earlier = reports[: reports.index(report.sop_instance_uid)] if report.sop_instance_uid in reports else reports
        for uid in reversed(earlier):
            record = await self.inbox.record(uid)
            if record is not None and record.transport in MEASUREMENT_TRANSPORTS:
                data = await self.ingest.read_blob(record.digest)
                if await self.ingest.run_blocking(is_measurement_report, data):
                    return record
        return None

    async def _overlay_version(self, image_uid: str, user: str, annotations: list[Annotation], source: str) -> str:
        """A GSPS of ``annotations`` on the image (none: a withdrawal), stored here and queued for central as the
        next version of the image's newest overlay (``supersedes=`` in its Medd-Attachment)."""
        record = await self._image_record(image_uid)
        if not annotations and not await self._newest_overlay_draws(image_uid):
            raise AnnotationError("there is no overlay to withdraw (none, or already withdrawn)")
        earlier = await self.inbox.overlays_of(image_uid)
        overlay_uid, content = await self._presentation_state(record, user, annotations, withdrawal=not annotations)
        params = {"uid": overlay_uid, "image_uid": image_uid}
        if earlier:
            params["supersedes"] = earlier[-1].uid
        await self._send(content, AttachmentId.of("overlay", **params), record, store_locally=True)
        self.log.info("{user} saved overlay {uid} on {image} from measurement report {source} ({what})", user=user,
                      uid=overlay_uid, image=image_uid, source=source,
                      what=f"{len(annotations)} annotations" if annotations else "withdrawal")
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

    async def save_report(self, study_uid: str, user: str, text: str, kind: str = "final") -> str:
        """Sign ``text`` as the study's ``kind`` of report (preliminary, final, addendum) by ``user``: a Basic
        Text SR, stored here and sent to central; returns its UID. A final report replaces the latest
        preliminary; an addendum adds to the final report. :class:`ReportError` when ``kind`` cannot be
        signed now (a second final, an addendum before the final)."""
        image_uid = await self.inbox.first_image_of_study(study_uid)
        if image_uid is None:
            raise UnknownObject(study_uid)
        reports = await self.reports(study_uid)
        allowed = next_kinds(reports)
        if kind not in allowed:
            raise ReportError(f"a {kind} report cannot be signed now: this study's report "
                              + ("is final; add an addendum" if "addendum" in allowed else "is not final yet"))
        follows = predecessor(kind, reports)
        record = await self._record(image_uid)
        evidence = await self.inbox.study_evidence(study_uid)
        image = await self.ingest.read_blob(record.digest)
        report_uid = str(hd.UID())
        at = self.now()

        def build():
            data = build_text_report(image, evidence, text=text, user=user, report_uid=report_uid,
                                     device=self.node_name, when=at, kind=kind,
                                     predecessor=(follows.series_uid, follows.sop_class, follows.uid) if follows else None)
            return parse_part10(data)

        content = await self.ingest.run_blocking(build)
        attachment = AttachmentId.of("report", uid=report_uid, study_uid=study_uid)
        # This viewer vouches for what its own logged-in radiologist signed.
        await self._send(content, attachment, record, store_locally=True,
                         report_source=ReportSource("viewer", self.node_name))
        if kind == "preliminary":
            await self.reporting.save_draft(study_uid, user, text)
        else:
            await self.reporting.discard_draft(study_uid, user)
        self.log.info("{user} signed {kind} report {uid} on study {study}", user=user, kind=kind, uid=report_uid,
                      study=study_uid)
        return report_uid

    async def reports(self, study_uid: str) -> list[ReportView]:
        """The study's reports, oldest first, with who vouched for each."""
        found = await self.inbox.reports_of(study_uid)
        sources = await self.reporting.sources([f.uid for f in found])
        out = []
        for f in found:
            data = await self.ingest.read_blob(f.digest)
            try:
                said = await self.ingest.run_blocking(read_report, data, f.media_type)
            except Exception:
                self.log.failure("cannot read report {uid}", uid=f.uid)
                continue
            source = sources.get(f.uid)
            out.append(ReportView(
                uid=f.uid, author=said["author"], time=said["time"], text=said["text"],
                verified=bool(said["verified"]), origin=f.origin, kind=said["kind"], signer=said["signer"],
                signed_at=said["signed_at"], predecessor=said["predecessor"],
                vouched=source.source if source else None, node=source.node if source else None,
                series_uid=said["series_uid"], sop_class=said["sop_class"]))
        return out

    async def report_desk(self, study_uid: str, user: str) -> ReportDesk:
        """What ``user``'s report panel on the study starts from (:class:`ReportDesk`)."""
        study = await self.study(study_uid)
        reports = await self.reports(study_uid)
        allowed = next_kinds(reports)
        draft = await self.reporting.draft(study_uid, user)
        template = None
        if draft is not None:
            text = draft.text
        elif "addendum" in allowed:
            text = ""
        elif (earlier := predecessor("final", reports)) is not None:
            text = earlier.text
        else:
            found = await self.ingest.run_blocking(template_for, self.templates, study.modalities)
            text, template = (found.text, found.name) if found else ("", None)
        return ReportDesk(tuple(reports), allowed, text, draft.updated_at.isoformat() if draft else None, template)

    async def save_draft(self, study_uid: str, user: str, text: str, seen_reports: int | None = None) -> str:
        """Keep ``user``'s unsigned text for the study (a study of this inbox); when, in ISO 8601.

        ``seen_reports`` is how many reports the study had when the panel was shown: a save from a panel
        that has not seen the latest signature (a save still on its way as the report was signed, another
        tab, a colleague's report) is refused with :class:`ReportError`, so it cannot bring back a draft
        that signing cleared."""
        if await self.inbox.first_image_of_study(study_uid) is None:
            raise UnknownObject(study_uid)
        if seen_reports is not None and len(await self.inbox.reports_of(study_uid)) != seen_reports:
            raise ReportError("this study's report changed since the page was opened; reload it (your text is "
                              "still in the text box)")
        saved = await self.reporting.save_draft(study_uid, user, text)
        return saved.updated_at.isoformat()

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

    async def session_state(self, token: str | None):
        return await self.accounts.session_state(token)

    async def lock_session(self, token: str) -> None:
        await self.accounts.lock_session(token)

    async def unlock_session(self, token: str, password: str) -> bool:
        """Unlock a locked session with its user's password; False (still locked) for a wrong one."""
        state = await self.accounts.session_state(token)
        if state is None or not await self.check_password(state.user, password):
            return False
        await self.accounts.lock_session(token, locked=False)
        return True

    async def end_session(self, token: str | None) -> None:
        await self.accounts.end_session(token)


def _signed(reports: list[ReportView]) -> list[ReportView]:
    """The reports a registered viewer's authenticated user signed (what the report workflow builds on)."""
    return [r for r in reports if r.signed_by is not None]


def next_kinds(reports: list[ReportView]) -> tuple[str, ...]:
    """What may be signed next on a study with ``reports``: an addendum once a final report is signed,
    else a preliminary or the final report."""
    if any(r.kind in ("final", "addendum") for r in _signed(reports)):
        return ("addendum",)
    return ("preliminary", "final")


def predecessor(kind: str, reports: list[ReportView]) -> ReportView | None:
    """The report a new ``kind`` follows: an addendum adds to the first final report, a final or a
    preliminary replaces the latest preliminary."""
    signed = [r for r in _signed(reports) if r.sop_class and r.series_uid]  # an SR can name only a DICOM report
    if kind == "addendum":
        return next((r for r in signed if r.kind == "final"), None)
    return next((r for r in reversed(signed) if r.kind == "preliminary"), None)
