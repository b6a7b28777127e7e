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
    "ReportView", "SeriesView", "StudyDetail", "StudyRow", "UnknownObject", "WorklistPage", "WorklistQuery",
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
    """A stored report of a study."""

    uid: str
    author: str | None
    time: str | None  # ISO 8601, as the report states it
    text: str
    verified: bool
    origin: str


class IReadingRoom(Interface):
    """What the reading room's web UI may ask of the viewer node. Each method is a coroutine."""

    login_throttle = Attribute("The :class:`~medd.throttling.LoginThrottle` every login attempt goes through.")

    def record_access(event, **fields):
        """Record a login, logout, refused login or view in the node's audit trail (:meth:`medd.audit.AuditTrail.record`)."""

    def worklist(query):
        """The :class:`WorklistPage` for a :class:`WorklistQuery`."""

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

    def save_report(study_uid, user, text):
        """Store the text as the study's report signed by ``user`` and send it; its UID."""

    def reports(study_uid):
        """The study's reports, oldest first: a list of :class:`ReportView`."""

    def check_password(name, password):
        """True if ``name`` is a user and ``password`` is theirs."""

    def create_session(user):
        """A new session token for ``user``."""

    def user_for_session(token):
        """The user of a live session, or None."""

    def end_session(token):
        """End the session, if any."""
