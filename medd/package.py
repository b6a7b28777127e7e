"""The package: one RFC 5322/MIME message per object, whatever the transport.

The ``Medd-Attachment`` header names the object type and its identifying
UIDs so that a node can route a package without opening it; the object type
plugin checks that the header tells the truth about the content.
"""
from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import json
import re
from dataclasses import dataclass
from email.message import Message

from medd.config import PartLimits
from medd.objects import DEFAULT_MAX_INFLATED_SIZE, Content, InvalidObject, parse_part10

HEADER = "Medd-Attachment"
# Who made a report, as the node that delivers it vouches: set by central on every report package it
# delivers (from what authenticated the sender, never from the sender's own header) and by a viewer on
# the reports its own radiologists sign; read by a viewer only from central or itself.
REPORT_SOURCE_HEADER = "Medd-Report-Source"
REPORT_SOURCES = ("viewer", "centre")

# How each object type's identifier is spelled, in order.
ATTACHMENT_PARAMS = {
    "image": ("uid",),
    "overlay": ("uid", "image-uid"),
    "report": ("uid", "study-uid"),
    "status": ("event", "uid"),
}


@dataclass(frozen=True)
class AttachmentId:
    """The value of a ``Medd-Attachment`` header: a type and its parameters."""

    type: str
    params: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, type_: str, **params: str) -> "AttachmentId":
        return cls(type_, tuple((k.replace("_", "-"), v) for k, v in params.items()))

    def get(self, key: str, default: str | None = None) -> str | None:
        return dict(self.params).get(key, default)

    @property
    def uid(self) -> str | None:
        return self.get("uid")

    def __str__(self) -> str:
        return "; ".join([self.type] + [f"{k}={v}" for k, v in self.params])

    @classmethod
    def parse(cls, value: str) -> "AttachmentId":
        msg = Message()
        msg[HEADER] = value
        params = msg.get_params(header=HEADER, unquote=True)
        if not params or not params[0][0] or params[0][1] != "":
            raise InvalidObject(f"{HEADER} header {value!r} does not start with an object type")
        type_ = params[0][0].strip().lower()
        rest = tuple((k.strip().lower(), v.strip()) for k, v in params[1:])
        if any(v == "" for _, v in rest):
            raise InvalidObject(f"{HEADER} header {value!r} has a parameter without a value")
        return cls(type_, rest)


def attachment_for(object_type: str, uid: str, *, study_uid: str | None = None,
                   image_uid: str | None = None) -> AttachmentId:
    """The Medd-Attachment of an indexed DICOM object, from its index row's fields."""
    if object_type == "overlay":
        return AttachmentId.of("overlay", uid=uid, image_uid=image_uid)
    if object_type == "report":
        return AttachmentId.of("report", uid=uid, study_uid=study_uid)
    return AttachmentId.of("image", uid=uid)


@dataclass(frozen=True)
class ReportSource:
    """The value of a ``Medd-Report-Source`` header: ``viewer`` (a registered viewer, authenticated, whose
    logged-in radiologist signed it) or ``centre`` (anyone else: an imaging centre's own report), and the
    node that sent it."""

    source: str
    node: str

    def __str__(self) -> str:
        return f'{self.source}; node="{self.node}"'

    @classmethod
    def parse(cls, value: str) -> "ReportSource | None":
        """The header's source, or None when it is absent or not one medd writes (then nothing is vouched)."""
        if not value.strip():
            return None
        msg = Message()
        msg[REPORT_SOURCE_HEADER] = value
        params = msg.get_params(header=REPORT_SOURCE_HEADER, unquote=True) or []
        source = params[0][0].strip().lower() if params and params[0][1] == "" else ""
        node = dict((k.strip().lower(), v.strip()) for k, v in params[1:]).get("node", "")
        if source not in REPORT_SOURCES or not node:
            return None
        return cls(source, node)


@dataclass(frozen=True)
class Package:
    """A parsed package: its envelope and the content it carries."""

    message_id: str
    origin: str
    destination: str
    attachment: AttachmentId
    content: Content
    date: str = ""
    report_source: ReportSource | None = None
    # What central says of an object it delivers to a viewer (None when the header is absent).
    centre: str | None = None
    study_images: int | None = None


#: Headers central adds to the packages it delivers to viewers: the registered centre the object
#: came from, and how many images of its study central routes to that viewer so far.
CENTRE_HEADER = "Medd-Centre"
STUDY_IMAGES_HEADER = "Medd-Study-Images"
_CENTRE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


# compat32 generates the header block an order of magnitude faster than the
# modern policy's header registry, which re-parses every value it is given.
_HEADER_POLICY = email.policy.compat32.clone(linesep="\r\n")


def build_package(
    content: Content,
    attachment: AttachmentId,
    *,
    origin: str,
    destination: str,
    message_id: str | None = None,
    centre: str | None = None,
    study_images: int | None = None,
    report_source: ReportSource | None = None,
) -> bytes:
    """The package bytes (CRLF line endings, ready for SMTP or any transport).

    Blocking: base64 of the object. The header block is generated by
    :mod:`email`; the body is the object in base64 (RFC 2045 lines of 76
    characters), for every object, text included, so that the receiver gets
    the exact bytes (no line-ending or trailing-newline rewriting on the way).
    """
    msg = Message(policy=_HEADER_POLICY)
    domain = origin.rpartition("@")[2] or "medd.invalid"
    headers = (
        ("From", origin),
        ("To", destination),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Message-ID", message_id or email.utils.make_msgid(domain=domain)),
        (HEADER, str(attachment)),
        ("MIME-Version", "1.0"),
        ("Content-Type", content.media_type),
        ("Content-Transfer-Encoding", "base64"),
    ) + (((REPORT_SOURCE_HEADER, str(report_source)),) if report_source is not None else ())
    if centre is not None:
        headers += ((CENTRE_HEADER, centre),)
    if study_images is not None:
        headers += ((STUDY_IMAGES_HEADER, str(int(study_images))),)
    for name, value in headers:
        if _LINE_BREAK.search(value):
            raise ValueError(f"a package's {name} cannot hold a line break: {value!r}")
        msg[name] = value
    if content.media_type.startswith("text/"):
        msg.set_param("charset", "utf-8")
    body = base64.encodebytes(content.data).replace(b"\n", b"\r\n")
    return msg.as_bytes() + body


_LINE_BREAK = re.compile(r"[\r\n]")


def _single_part(msg: Message) -> Message:
    if not msg.is_multipart():
        return msg
    parts = [p for p in msg.walk() if not p.is_multipart()]
    # S/MIME signatures or a human-readable note may travel beside the object.
    objects = [p for p in parts if p.get_content_type() not in ("text/plain", "application/pkcs7-signature")]
    if len(objects) == 1:
        return objects[0]
    if not objects and len(parts) == 1:
        return parts[0]
    raise InvalidObject(f"a package carries exactly one object; this one has {len(objects) or len(parts)} parts")


_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)


def check_mime_structure(data: bytes, limits: PartLimits = PartLimits()) -> None:
    """Refuse a message with more multipart containers or parts than
    ``limits`` (``[limits] max_mime_containers``, ``max_mime_parts``) allow,
    before the MIME parser builds them (a million empty parts or a
    thousand-deep nesting costs seconds and hundreds of megabytes there).

    A boundary parameter in a body counts too: a package that merely
    mentions many is refused, which is permanent and harmless.
    """
    boundaries = [m.group(1) or m.group(2) for m in _BOUNDARY.finditer(data)]
    if len(boundaries) > limits.max_mime_containers:
        raise InvalidObject(f"the package has {len(boundaries)} multipart containers; "
                            f"a package has at most {limits.max_mime_containers}")
    delimiters = 0
    for boundary in set(boundaries):
        marker = b"\n--" + boundary
        delimiters += data.count(marker) + data.startswith(b"--" + boundary)
        if delimiters > limits.max_mime_parts:
            raise InvalidObject(f"the package has more than {limits.max_mime_parts} MIME parts")


_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")


def _single_part_message(data: bytes) -> Message | None:
    """The message when it is not multipart (as every package medd builds),
    or None for the full MIME parse.

    :mod:`email` parses the header block; the body, which the feed parser
    would split line by line to no purpose, is set as the payload whole.
    """
    end = _END_OF_HEADER.search(data)
    if end is None:
        return None
    msg = email.message_from_bytes(data[:end.end()], policy=email.policy.compat32)
    # decode=True: the undecoded payload would be decoded with the charset the header names.
    if msg.is_multipart() or msg.get_content_maintype() == "multipart" or msg.get_payload(decode=True):
        return None
    msg.set_payload(data[end.end():].decode("ascii", "surrogateescape"))
    return msg


def header(msg: Message, name: str) -> str:
    """A header's value ('' when absent); InvalidObject for one holding bytes
    that are not ASCII (the compat32 parser hands those back as a Header)."""
    value = msg.get(name, "")
    if not isinstance(value, str):
        raise InvalidObject(f"the {name} header holds bytes that are not ASCII")
    return value


def parse_package(data: bytes, max_size: int | None = None,
                  limits: PartLimits = PartLimits()) -> tuple[Message, Message]:
    """Parse the MIME structure only; return (message, object part).

    Blocking (CPU-bound on large packages).
    """
    if max_size is not None and len(data) > max_size:
        raise InvalidObject(f"package of {len(data)} bytes exceeds the limit of {max_size} bytes")
    if not data.strip():
        raise InvalidObject("empty package")
    check_mime_structure(data, limits)
    try:
        msg = _single_part_message(data) or email.message_from_bytes(data, policy=email.policy.compat32)
    except RecursionError as e:
        # Permanent: the same message fails the same way every time.
        raise InvalidObject("the package's MIME structure is nested too deeply") from e
    if msg.defects:
        raise InvalidObject(f"malformed MIME message: {msg.defects[0].__class__.__name__}")
    for name in ("From", "To", "Message-ID", HEADER):
        if not header(msg, name).strip():
            raise InvalidObject(f"package has no {name} header")
    part = _single_part(msg)
    if part.defects:
        raise InvalidObject(f"malformed MIME part: {part.defects[0].__class__.__name__}")
    return msg, part


def read_package(data: bytes, object_types, max_size: int | None = None,
                 limits: PartLimits = PartLimits()) -> Package:
    """Parse, decode and validate a package against its object type.

    ``object_types`` is the plugin host's ``object_type(name)`` lookup.
    Raises :class:`InvalidObject` (envelope problems) or
    :class:`InvalidObject` (content problems). Blocking.
    """
    msg, part = parse_package(data, max_size, limits)
    attachment = AttachmentId.parse(header(msg, HEADER))
    object_type = object_types(attachment.type)
    if object_type is None:
        raise InvalidObject(f"unknown object type {attachment.type!r} in {HEADER}")
    cte = (header(part, "Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte not in ("base64", "quoted-printable", "7bit", "8bit", "binary"):
        raise InvalidObject(f"unsupported Content-Transfer-Encoding {cte!r}")
    payload = part.get_payload(decode=True)
    if payload is None:
        raise InvalidObject("the object part has no body")
    if part.defects:
        raise InvalidObject(f"malformed object part: {part.defects[0].__class__.__name__}")
    content = decode_content(part.get_content_type(), payload, max_size)
    object_type.validate(attachment, content)
    _, origin = email.utils.parseaddr(header(msg, "From"))
    _, destination = email.utils.parseaddr(header(msg, "To"))
    if not origin or not destination:
        raise InvalidObject("From and To must each hold one address")
    return Package(
        message_id=header(msg, "Message-ID").strip(),
        origin=origin,
        destination=destination,
        attachment=attachment,
        content=content,
        date=header(msg, "Date").strip(),
        **_delivery_facts(msg),
        report_source=ReportSource.parse(header(msg, REPORT_SOURCE_HEADER)) if attachment.type == "report" else None,
    )


def is_centre_name(name: str | None) -> bool:
    """True for a centre name a Medd-Centre header can carry (central leaves the header out otherwise)."""
    return bool(name and _CENTRE_NAME.match(name))


def _delivery_facts(msg: Message) -> dict:
    """Medd-Centre and Medd-Study-Images, checked (InvalidObject for a malformed one)."""
    facts: dict = {}
    centre = header(msg, CENTRE_HEADER).strip()
    if centre:
        if not is_centre_name(centre):
            raise InvalidObject(f"{CENTRE_HEADER} {centre[:80]!r} is not a centre name")
        facts["centre"] = centre
    images = header(msg, STUDY_IMAGES_HEADER).strip()
    if images:
        if not re.fullmatch(r"[0-9]{1,9}", images):
            raise InvalidObject(f"{STUDY_IMAGES_HEADER} {images[:40]!r} is not a number of images")
        facts["study_images"] = int(images)
    return facts


def decode_content(media_type: str, payload: bytes, max_size: int | None = None) -> Content:
    """Content from a part's media type and decoded bytes (blocking); a
    deflated DICOM object may inflate to at most ``max_size`` bytes."""
    if media_type == "application/dicom":
        return parse_part10(payload, max_inflated_size=max_size or DEFAULT_MAX_INFLATED_SIZE)
    if media_type == "text/plain":
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidObject("a text report must be UTF-8") from e
        return Content(media_type="text/plain", data=payload)
    if media_type == "application/json":
        try:
            params = json.loads(payload)
        except ValueError as e:
            raise InvalidObject(f"status part is not JSON: {e}") from e
        if not isinstance(params, dict):
            raise InvalidObject("status part must be a JSON object")
        return Content(media_type="application/json", data=payload, params=params)
    raise InvalidObject(f"unsupported object media type {media_type!r}")
