"""The contract between the reading room's web UI (:mod:`medd.viewer.web`) and
the viewer node's :class:`~medd.viewer.reading.ReadingRoom`: the interface
and the dataclasses that cross it. The web layer reads only these attributes.

The inbox's views (worklist rows and pages, a study with its series and
images) are the :class:`~medd.storage.inbox.Inbox` connector's dataclasses,
re-exported here; overlays and reports are read from the stored objects by the reading room.
"""
from __future__ import annotations

from dataclasses import dataclass

from zope.interface import Attribute, Interface

from medd.storage.inbox import (InstanceView, OpenedMark, SeriesView, StudyDetail, StudyRow, WorklistPage,
                                WorklistQuery)
from medd.viewer.annotations import Annotation, AnnotationError

__all__ = [
    "Annotation", "AnnotationError", "CannotAnnotate", "IReadingRoom", "InstanceView", "OpenedMark", "OverlayView",
    "ReportDesk", "ReportView", "SeriesView", "StudyDetail", "StudyRow", "UnknownObject", "WorklistPage", "WorklistQuery",
]


class UnknownObject(KeyError):
    """No such object (image, study) in the local inbox."""


class CannotAnnotate(Exception):
    """The image cannot carry an overlay: a presentation state must copy what its header lacks."""


@dataclass(frozen=True)
class OverlayView:
    """A stored overlay (a GSPS) of an image: who drew it, when, and its annotations."""

    uid: str
    author: str | None
    created: str | None  # ISO 8601, as the presentation state states it
    annotations: tuple[Annotation, ...]


@dataclass(frozen=True)
class ReportView:
    """A stored report of a study.

    ``kind``, ``signer``, ``signed_at`` and ``verified`` are what the report says of itself; ``vouched``
    is who vouched for who made it: ``viewer`` (a registered viewer's authenticated user signed it: this
    viewer's own, or one central says a registered viewer sent), ``centre`` (central says anyone else sent
    it: an imaging centre's own report), or None (no one). Show "signed by" only from :attr:`signed_by`.
    """

    uid: str
    author: str | None
    time: str | None  # ISO 8601, as the report states it
    text: str
    verified: bool
    origin: str
    kind: str = "final"  # preliminary | final | addendum
    signer: str | None = None
    signed_at: str | None = None
    predecessor: str | None = None  # the report this one replaces or adds to
    vouched: str | None = None
    node: str | None = None  # the node that sent it, as the voucher names it
    series_uid: str | None = None
    sop_class: str | None = None

    @property
    def signed_by(self) -> str | None:
        """The radiologist who signed it, when a registered viewer's authenticated user did; else None."""
        return self.signer if self.vouched == "viewer" else None


@dataclass(frozen=True)
class ReportDesk:
    """What the report panel of a study starts from: ``reports`` (oldest first); ``next_kinds``, what the
    user may sign next (preliminary and final, or addendum once the report is final); ``text``, the user's
    draft, else the template of the study's modality (``template`` names its file) for a new report."""

    reports: tuple[ReportView, ...]
    next_kinds: tuple[str, ...]
    text: str
    draft_saved_at: str | None
    template: str | None


class IReadingRoom(Interface):
    """What the reading room's web UI may ask of the viewer node. Each method is a coroutine."""

    room_settings = Attribute("The :class:`~medd.viewer.settings.ReadingRoomSettings` (complete_after, idle_lock, ...).")
    login_throttle = Attribute("The :class:`~medd.throttling.LoginThrottle` every login attempt goes through.")

    def record_access(event, **fields):
        """Record a login, logout, refused login or view in the node's audit trail (:meth:`medd.audit.AuditTrail.record`)."""

    def worklist(query):
        """The :class:`WorklistPage` for a :class:`WorklistQuery`."""

    def is_complete(row):
        """True when the :class:`StudyRow` has had no new image for ``complete_after`` seconds and holds every
        image central said it routes here (a plain method, not a coroutine)."""

    def being_read_by(study_uid, other_than=None):
        """The users reading the study now, but ``other_than`` (a plain method, not a coroutine)."""

    def open_study(study_uid, user, confirmed=False):
        """``user`` starts reading the study: the others reading it (a list of str); unless ``confirmed`` the
        study is claimed only when that list is empty. :class:`UnknownObject` if absent."""

    def next_unread(user):
        """The UID of the study ``user`` should read next (unread, unreported, not being read; STAT first,
        then the oldest), or None."""

    def modalities():
        """Every modality in the inbox (a list of str), for the worklist's filter."""

    def study(study_uid, user):
        """The :class:`StudyDetail` (with which images ``user`` opened); :class:`UnknownObject` if absent."""

    def instance_bytes(uid):
        """The stored Part 10 bytes of an image; :class:`UnknownObject` if absent."""

    def opened(uid, user, peer=None):
        """Record that ``user`` (at ``peer``) was shown image ``uid``, telling central the first time; an
        :class:`OpenedMark`."""

    def pixels_shown(uid, user, peer=None):
        """``user``'s browser (at ``peer``) fetched the pixel data of ``uid`` for display: :meth:`opened`, once
        per user and image; an image not in the inbox is ignored."""

    def save_overlay(image_uid, user, annotations):
        """Store the annotations (:class:`Annotation`) as an overlay of the image and send it; its UID.

        :class:`AnnotationError` for annotations that cannot be drawn on the image; :class:`CannotAnnotate`
        for an image that cannot carry an overlay at all.
        """

    def overlays(image_uid):
        """The image's overlays, oldest first: a list of :class:`OverlayView`."""

    def measurements_saved(report):
        """A measurement report (SR, TID 1500) the radiologist saved over STOW-RS was stored (``report``, its
        index record): send central one overlay version per image it draws on; the new overlays' UIDs."""

    def withdraw_measurements(study_uid, user):
        """``user`` deleted the study's measurements: an empty overlay version for each image whose newest
        overlay draws something; their UIDs. :class:`UnknownObject` for a study not in the inbox."""

    def save_report(study_uid, user, text, kind="final"):
        """Store the text as the study's report (``kind``: preliminary, final or addendum) signed by ``user``
        and send it; its UID. :class:`ReportError` when that kind cannot be signed now."""

    def reports(study_uid):
        """The study's reports, oldest first: a list of :class:`ReportView`."""

    def report_desk(study_uid, user):
        """The :class:`ReportDesk` of ``user`` on the study; :class:`UnknownObject` if absent."""

    def save_draft(study_uid, user, text, seen_reports=None):
        """Keep ``user``'s unsigned text for the study; the ISO 8601 time it was saved. :class:`ReportError`
        when the study no longer has ``seen_reports`` reports (the panel is out of date)."""

    def check_password(name, password):
        """True if ``name`` is a user and ``password`` is theirs."""

    def create_session(user):
        """A new session token for ``user``."""

    def user_for_session(token):
        """The user of a live session that is not locked, or None."""

    def session_state(token):
        """The :class:`~medd.storage.accounts.SessionState` of a live session (locked or not), or None."""

    def lock_session(token):
        """Lock the session (idle): it serves nothing until :meth:`unlock_session`."""

    def unlock_session(token, password):
        """Unlock the session with its user's password; False for a wrong one."""

    def end_session(token):
        """End the session, if any."""
