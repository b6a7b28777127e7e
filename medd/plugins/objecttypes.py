"""The built-in object types: image, overlay, report and status.

Each knows how to recognise its content, build its ``Medd-Attachment``
identifier from the content itself, and check a claimed identifier.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from zope.interface import implementer

from medd.objects import GSPS_SOP_CLASS, Content, InvalidObject, check_uid, classify
from medd.package import AttachmentId
from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import IObjectType

# "opened"/"viewed" come from a viewer to central; the others go from central to the imaging
# centre an object came from (its receipts), and "opened" too.
STATUS_EVENTS = ("opened", "viewed", "received", "routed", "quarantined", "delivered", "reported")


def _require(claimed: AttachmentId, key: str, actual: str, what: str) -> None:
    value = claimed.get(key)
    if value is None:
        raise InvalidObject(f"Medd-Attachment has no {key}= parameter")
    if value != actual:
        raise InvalidObject(f"Medd-Attachment {key}={value} does not match the {what} {actual}")


@implementer(IObjectType)
class ImageType:
    """Any DICOM storage object; keyed by its SOP Instance UID."""

    name = "image"
    rank = 100

    def recognise(self, content: Content) -> bool:
        return content.is_dicom

    def identifier(self, content: Content) -> AttachmentId:
        return AttachmentId.of("image", uid=content.keyinfo.sop_instance_uid)

    def validate(self, claimed: AttachmentId, content: Content) -> None:
        if not content.is_dicom:
            raise InvalidObject("an image must be application/dicom")
        _require(claimed, "uid", content.keyinfo.sop_instance_uid, "object's SOP Instance UID")


@implementer(IObjectType)
class OverlayType:
    """A Grayscale Softcopy Presentation State, or a measurement report (a TID 1500 SR, as OHIF saves); keyed by
    its own UID and the (first) image's it draws on or measures."""

    name = "overlay"
    rank = 10

    def recognise(self, content: Content) -> bool:
        return content.is_dicom and (content.keyinfo.sop_class_uid == GSPS_SOP_CLASS
                                     or content.keyinfo.measurement_report)

    def identifier(self, content: Content) -> AttachmentId:
        refs = content.keyinfo.referenced_image_uids
        if not refs:
            raise InvalidObject("the overlay references no image")
        return AttachmentId.of("overlay", uid=content.keyinfo.sop_instance_uid, image_uid=refs[0])

    def validate(self, claimed: AttachmentId, content: Content) -> None:
        if not self.recognise(content):
            raise InvalidObject("an overlay must be a Grayscale Softcopy Presentation State or a measurement report")
        _require(claimed, "uid", content.keyinfo.sop_instance_uid, "presentation state's SOP Instance UID")
        image_uid = claimed.get("image-uid")
        if image_uid is None:
            raise InvalidObject("Medd-Attachment has no image-uid= parameter")
        if image_uid not in content.keyinfo.referenced_image_uids:
            raise InvalidObject(f"Medd-Attachment image-uid={image_uid} is not referenced by the overlay")


@implementer(IObjectType)
class ReportType:
    """A DICOM SR, an Encapsulated PDF, or plain text with an explicit study UID."""

    name = "report"
    rank = 20

    def recognise(self, content: Content) -> bool:
        if content.is_dicom:
            return classify(content.keyinfo) == "report"
        return content.media_type == "text/plain"

    def identifier(self, content: Content) -> AttachmentId:
        if content.is_dicom:
            return AttachmentId.of(
                "report", uid=content.keyinfo.sop_instance_uid, study_uid=content.keyinfo.study_instance_uid
            )
        return AttachmentId.of(
            "report",
            uid=check_uid(content.params.get("uid"), "report UID"),
            study_uid=check_uid(content.params.get("study-uid"), "Study Instance UID"),
        )

    def validate(self, claimed: AttachmentId, content: Content) -> None:
        if content.is_dicom:
            if not self.recognise(content):
                raise InvalidObject("a DICOM report must be a Structured Report or an Encapsulated PDF")
            _require(claimed, "uid", content.keyinfo.sop_instance_uid, "report's SOP Instance UID")
            _require(claimed, "study-uid", content.keyinfo.study_instance_uid, "report's Study Instance UID")
        elif content.media_type == "text/plain":
            # Plain text carries no UIDs: the header is the explicit source.
            check_uid(claimed.get("uid"), "Medd-Attachment uid")
            check_uid(claimed.get("study-uid"), "Medd-Attachment study-uid")
        else:
            raise InvalidObject("a report must be DICOM SR, Encapsulated PDF or text/plain")


@implementer(IObjectType)
class StatusType:
    """A status message: an event (opened, viewed) about one image."""

    name = "status"
    rank = 30

    def recognise(self, content: Content) -> bool:
        return content.media_type == "application/json" and content.params.get("event") in STATUS_EVENTS

    def identifier(self, content: Content) -> AttachmentId:
        return AttachmentId.of("status", event=content.params["event"], uid=content.params["uid"])

    def validate(self, claimed: AttachmentId, content: Content) -> None:
        if content.media_type != "application/json":
            raise InvalidObject("a status message must be application/json")
        event = content.params.get("event")
        if event not in STATUS_EVENTS:
            raise InvalidObject(f"status event must be one of {', '.join(STATUS_EVENTS)}")
        check_uid(content.params.get("uid"), "status uid")
        _require(claimed, "event", event, "status part's event")
        _require(claimed, "uid", content.params["uid"], "status part's uid")


def status_content(event: str, uid: str, user: str, when: datetime | None = None) -> Content:
    """The content of a status message (for senders, e.g. the viewer)."""
    when = when or datetime.now(timezone.utc)
    return status_part({"event": event, "uid": uid, "user": user, "time": when.isoformat()})


def status_part(params: dict) -> Content:
    """The JSON status part of ``params``: ``event``, ``uid`` and, as applicable, ``viewer``,
    ``user``, ``time``, ``reason`` (central's receipts to a centre)."""
    return Content(media_type="application/json", data=json.dumps(params).encode(), params=dict(params))


def text_report_content(text: str, uid: str, study_uid: str) -> Content:
    """The content of a plain-text report (the UIDs travel in the header)."""
    return Content(media_type="text/plain", data=text.encode("utf-8"), params={"uid": uid, "study-uid": study_uid})


BUILTIN_OBJECT_TYPES = (ImageType(), OverlayType(), ReportType(), StatusType())


@hookimpl
def medd_register_object_types(register) -> None:
    for object_type in BUILTIN_OBJECT_TYPES:
        register(object_type)
