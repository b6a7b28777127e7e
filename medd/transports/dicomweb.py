"""DICOMweb on the HTTP transport: STOW-RS, QIDO-RS and WADO-RS (PS3.18).

Stored instances enter through the same ingest path as every other
receiver; searches run on the index; retrieval streams the stored Part 10
bytes (and metadata), one blob at a time as the client takes them. Frames
are cut from one stored object at a time (:mod:`medd.frames`); thumbnails
are rendered by the node (:mod:`medd.rendering`). Sending an object's pixel
data (an instance or its frames) is told to the ``medd_pixel_data_retrieved``
hook with the claimant's name.
"""
from __future__ import annotations

import io
import re
import uuid
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from multipart import MultipartError, MultipartSegment, PushMultipartParser
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from medd.config import PartLimits
from medd.dicomjson import metadata_json, metadata_of  # noqa: F401 (metadata_of: the parsed form, for tests)
from medd.frames import FrameError, parse_accept, read_frames
from medd.ingest import Refused, StoreFailed
from medd.objects import is_valid_uid
from medd.rendering import RenderError, render_thumbnail
from medd.storage.index import STUDY_FILTERS, Match, ObjectRecord
from medd.webresource import (
    RETRY_AFTER,
    Problem,
    ProblemResource,
    Response,
    access_claim,
    access_refusal,
    client_ip,
    json_response,
    log_refusal,
    media_type_of,
    render_async,
)

log = Logger()

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"

# STOW-RS failure reasons (PS3.18 table 10.5.3-2, from the C-STORE statuses).
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CONFLICT = 0xA900  # as C-STORE answers an instance UID already held (medd/transports/dicom.py)

# QIDO-RS: results per request unless the client asks for fewer (or more, up to MAX_LIMIT).
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000
# Far beyond any index, well inside the databases' 64-bit OFFSET.
MAX_OFFSET = 2**31 - 1
QIDO_CONTROL_KEYS = ("limit", "offset", "includefield", "fuzzymatching")
QUERY_KEYWORDS = frozenset(STUDY_FILTERS)
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_DATE = re.compile(r"^\d{8}$")
_DIGITS = re.compile(r"^[0-9]+$")
_CHUNK = 64 * 1024
# The frame list of a WADO-RS frames request (".../frames/1,2,3") in a route's shape.
FRAME_LIST = "<frames>"
MAX_FRAMES_PER_REQUEST = 1000
# WADO-RS metadata: instances looked up in the metadata cache per query.
METADATA_BATCH = 100
# Thumbnails: the side of the square they fit in, unless the client asks (viewport=w,h) within these.
THUMBNAIL_SIZE = 128
THUMBNAIL_SIZES = (16, 1024)


# --- STOW-RS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part of a STOW-RS request, with what a quick look at it tells."""

    number: int
    media_type: str
    data: bytes
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


def _peek(data: bytes) -> tuple[str | None, str | None, str | None]:
    """Blocking: (SOP Class, SOP Instance, Study Instance UID) if pydicom can see them.

    Only to name the instance in the response and to check the target
    study; the ingest path does the real checking.
    """

    def text(ds, keyword):
        value = ds.get(keyword)
        return str(value).strip("\0 ") or None if value is not None else None

    # pydicom converts a value when it is read, not when the file is: a
    # hostile one (an unknown VR, say) raises there.
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
        return text(ds, "SOPClassUID"), text(ds, "SOPInstanceUID"), text(ds, "StudyInstanceUID")
    except Exception:
        return None, None, None


class RelatedParser(PushMultipartParser):
    """The multipart parser for multipart/related (RFC 2387) bodies.

    The library parses form-data by default; this hook is the one it offers
    for other multipart types. Related parts carry no Content-Disposition.
    """

    def _create_segment(self, headerlist):
        return MultipartSegment(headerlist)


def split_multipart(content, boundary: str, max_parts: int = PartLimits().max_stow_parts) -> list[Part]:
    """Blocking: the parts of a multipart body read from the file ``content``.

    Raises :class:`Problem` (400) for a malformed body, 413 past
    ``max_parts`` parts (``[limits] max_stow_parts``; counted as they end,
    before any is looked into).
    """
    content.seek(0)
    parts: list[Part] = []
    media_type, chunks = None, []
    try:
        with RelatedParser(boundary) as parser:
            while not parser.closed:
                chunk = content.read(_CHUNK)
                for event in parser.parse(chunk):
                    if event is None:
                        if len(parts) == max_parts:
                            raise Problem(413, f"a STOW-RS request carries at most {max_parts} instances",
                                          kind="too-many-parts")
                        data = b"".join(chunks)
                        peek = _peek(data) if media_type == DICOM else (None, None, None)
                        parts.append(Part(len(parts) + 1, media_type, data, *peek))
                        media_type, chunks = None, []
                    elif isinstance(event, (bytes, bytearray)):
                        chunks.append(bytes(event))
                    else:
                        media_type = (event.content_type or "").lower()
                if not chunk:
                    break
    except MultipartError as e:
        raise Problem(400, f"malformed multipart body: {e}", kind="malformed-multipart") from e
    return parts


# What a viewer, or a radiologist saving measurements from the reading room, may store: the objects they
# make (a GSPS overlay, an SR report), never an image.
VIEWER_OBJECT_TYPES = ("overlay", "report")
RESULT_MAKERS = ("viewer", "radiologist")


def object_type_of(sop_class_uid: str | None) -> str:
    """The object type a part's SOP class is carried as (``image`` when unknown)."""
    from medd.objects import object_type_of_class

    return object_type_of_class(sop_class_uid or "")


def _failure(part: Part, reason_code: int, reason: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = part.sop_class_uid if part.sop_class_uid and is_valid_uid(part.sop_class_uid) else None
    item.ReferencedSOPInstanceUID = (
        part.sop_instance_uid if part.sop_instance_uid and is_valid_uid(part.sop_instance_uid) else None
    )
    item.FailureReason = reason_code
    # PS3.18 has no attribute for a readable reason; the C-STORE one is the nearest (LO, 64 characters).
    item.add_new(0x00000902, "LO", reason[:64])
    return item


# --- building dicom+json -------------------------------------------------------------------


def _set(ds: Dataset, keyword: str, value) -> None:
    """Set ``keyword``, empty (zero length) when the index has no usable value."""
    vr = dictionary_VR(keyword)
    if value in (None, ""):
        value = None
    elif vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            value = int(str(value).split("\\")[0])
        except ValueError:
            value = None
    setattr(ds, keyword, value)


def study_dataset(row: dict, base: str) -> Dataset:
    ds = Dataset()
    _set(ds, "StudyDate", row["study_date"])
    _set(ds, "StudyTime", row["study_time"])
    _set(ds, "AccessionNumber", row["accession_number"])
    ds.ModalitiesInStudy = row["modalities"] or None
    _set(ds, "ReferringPhysicianName", row["referring_physician_name"])
    _set(ds, "StudyDescription", row["study_description"])
    _set(ds, "PatientName", row["patient_name"])
    _set(ds, "PatientID", row["patient_id"])
    _set(ds, "PatientBirthDate", row["patient_birth_date"])
    _set(ds, "PatientSex", row["patient_sex"])
    ds.StudyInstanceUID = row["study_instance_uid"]
    _set(ds, "StudyID", row["study_id"])
    ds.NumberOfStudyRelatedSeries = row["series_count"]
    ds.NumberOfStudyRelatedInstances = row["instance_count"]
    ds.RetrieveURL = f"{base}/studies/{row['study_instance_uid']}"
    return ds


def series_dataset(row: dict, base: str) -> Dataset:
    ds = Dataset()
    _set(ds, "Modality", row["modality"])
    _set(ds, "SeriesDescription", row["series_description"])
    ds.StudyInstanceUID = row["study_instance_uid"]
    ds.SeriesInstanceUID = row["series_instance_uid"]
    _set(ds, "SeriesNumber", row["series_number"])
    ds.NumberOfSeriesRelatedInstances = row["instance_count"]
    ds.RetrieveURL = f"{base}/studies/{row['study_instance_uid']}/series/{row['series_instance_uid']}"
    return ds


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def instance_dataset(record: ObjectRecord, base: str) -> Dataset:
    ds = Dataset()
    _set(ds, "SOPClassUID", record.sop_class_uid)
    ds.SOPInstanceUID = record.sop_instance_uid
    _set(ds, "StudyDate", record.study_date)
    _set(ds, "AccessionNumber", record.accession_number)
    _set(ds, "Modality", record.modality)
    _set(ds, "PatientName", record.patient_name)
    _set(ds, "PatientID", record.patient_id)
    ds.StudyInstanceUID = record.study_instance_uid
    ds.SeriesInstanceUID = record.series_instance_uid
    _set(ds, "SeriesNumber", record.series_number)
    _set(ds, "InstanceNumber", record.instance_number)
    _set(ds, "NumberOfFrames", record.number_of_frames)
    _set(ds, "Rows", record.rows)
    _set(ds, "Columns", record.columns)
    _set(ds, "AvailableTransferSyntaxUID", record.transfer_syntax_uid)
    ds.RetrieveURL = instance_url(base, record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid)
    return ds


def dicom_json(datasets) -> list[dict]:
    return [ds.to_json_dict(suppress_invalid_tags=True) for ds in datasets]


# --- QIDO-RS query parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    matches: list[Match]
    limit: int
    offset: int


def _keyword(key: str) -> str:
    if _TAG.match(key):
        return keyword_for_tag(int(key, 16)) or key
    return key


def _check_value(keyword: str, value: str) -> None:
    if keyword.endswith("UID"):
        bad = [v for v in value.split("\\") if not is_valid_uid(v)]
        if bad:
            raise Problem(400, f"{keyword}={bad[0]!r} is not a valid UID", kind="bad-query")
    elif keyword == "StudyDate":
        low, dash, high = value.partition("-")
        if not all(_DATE.match(v) for v in (low, high) if v) or (not dash and not low) or (dash and not (low or high)):
            raise Problem(400, f"StudyDate={value!r} is not a date (YYYYMMDD) or a date range", kind="bad-query")


def _non_negative(name: str, text: str) -> int | None:
    """A count of results; None for one too large for any index. ASCII digits only: ``int`` would take
    ``+1``, ``1_0``, other scripts' digits, and refuse more than 4300 digits with an error of its own."""
    if not _DIGITS.match(text):
        raise Problem(400, f"{name}={text[:40]!r} is not a non-negative integer", kind="bad-query")
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_OFFSET)) and int(digits) <= MAX_OFFSET else None


def parse_query(request) -> Query:
    """The QIDO-RS query of a request; :class:`Problem` (400) for keys medd cannot match."""
    matches: list[Match] = []
    limit, offset = DEFAULT_LIMIT, 0
    for raw_key, raw_values in request.args.items():
        key = raw_key.decode("utf-8", "replace")
        for raw in raw_values:
            value = raw.decode("utf-8", "replace").strip()
            if key == "limit":
                count = _non_negative(key, value)
                # More than medd answers at once is the most it answers (PS3.18 8.3.4.4).
                limit = MAX_LIMIT if count is None else min(count, MAX_LIMIT)
            elif key == "offset":
                offset = _non_negative(key, value)
                if offset is None:
                    raise Problem(400, f"offset may be at most {MAX_OFFSET}", kind="bad-query")
            elif key in QIDO_CONTROL_KEYS:
                # includefield: medd returns every attribute it indexes;
                # fuzzymatching: matching is exact or by wildcard either way.
                continue
            else:
                keyword = _keyword(key)
                if keyword not in QUERY_KEYWORDS:
                    supported = ", ".join(sorted(QUERY_KEYWORDS))
                    raise Problem(400, f"unknown or unsupported query key {key!r}; supported: {supported}",
                                  kind="bad-query")
                if value == "":
                    continue  # universal matching
                _check_value(keyword, value)
                matches.append(Match(keyword, value))
    return Query(matches, limit, offset)


def frame_numbers(text: str) -> list[int]:
    """The frame numbers of a frame list ("1,2,3"); :class:`Problem` (400) for anything else."""
    items = text.split(",")
    if len(items) > MAX_FRAMES_PER_REQUEST:
        raise Problem(400, f"ask for at most {MAX_FRAMES_PER_REQUEST} frames at once", kind="bad-frames")
    numbers = []
    for item in items:
        if not _DIGITS.match(item) or len(item) > 9 or int(item) < 1:
            raise Problem(400, f"{text[:40]!r} is not a list of frame numbers from 1 (e.g. 1,2,3)", kind="bad-frames")
        numbers.append(int(item))
    return numbers


def thumbnail_size(request) -> int:
    """The ``viewport=w,h`` a thumbnail should fit in (its larger side), within :data:`THUMBNAIL_SIZES`."""
    raw = (request.args.get(b"viewport") or [b""])[0].decode("ascii", "replace")
    if not raw:
        return THUMBNAIL_SIZE
    sides = raw.split(",")
    if len(sides) != 2 or not all(_DIGITS.match(v) and len(v) <= 5 for v in sides):
        raise Problem(400, f"viewport={raw[:40]!r} is not a width,height in pixels", kind="bad-query")
    low, high = THUMBNAIL_SIZES
    return min(max(max(int(v) for v in sides), low), high)


# --- WADO-RS flow control ------------------------------------------------------------------


@implementer(IPushProducer)
class _Flow:
    """Pause and resume signals from the client's connection, so that a large
    retrieval reads the next blob only when the previous one has drained."""

    def __init__(self):
        self._paused: Deferred | None = None
        self.stopped = False

    def pauseProducing(self):
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self):
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self):
        self.stopped = True
        self.resumeProducing()

    async def ready(self) -> None:
        if self._paused is not None:
            await self._paused


# --- the resource ----------------------------------------------------------------------------


class DicomWebResource(ProblemResource):
    """Everything under ``/dicomweb``; routes by path segments."""

    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self.api = api

    # Routing: the path after /dicomweb, as a tuple of segments with UIDs
    # replaced by None, selects a handler; the UIDs are passed in order.
    GET_ROUTES = {
        ("studies",): "_search_studies",
        ("studies", None, "series"): "_search_series",
        ("series",): "_search_series",
        ("studies", None, "series", None, "instances"): "_search_instances",
        ("studies", None, "instances"): "_search_instances",
        ("instances",): "_search_instances",
        ("studies", None): "_retrieve",
        ("studies", None, "series", None): "_retrieve",
        ("studies", None, "series", None, "instances", None): "_retrieve",
        ("studies", None, "metadata"): "_metadata",
        ("studies", None, "series", None, "metadata"): "_metadata",
        ("studies", None, "series", None, "instances", None, "metadata"): "_metadata",
        ("studies", None, "series", None, "instances", None, "frames", FRAME_LIST): "_frames",
        ("studies", None, "thumbnail"): "_thumbnail",
        ("studies", None, "series", None, "thumbnail"): "_thumbnail",
        ("studies", None, "series", None, "instances", None, "thumbnail"): "_thumbnail",
    }
    POST_ROUTES = {
        ("studies",): "_store",
        ("studies", None): "_store",
    }

    def _route(self, request, routes):
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        while segments and segments[-1] == "":
            segments.pop()
        uids = []
        shape = []
        for i, segment in enumerate(segments):
            # Odd positions after a collection name hold UIDs.
            if i % 2 == 1 and segments[i - 1] in ("studies", "series", "instances"):
                uids.append(segment)
                shape.append(None)
            elif i % 2 == 1 and segments[i - 1] == "frames":
                uids.append(segment)
                shape.append(FRAME_LIST)
            else:
                shape.append(segment)
        name = routes.get(tuple(shape))
        if name is None:
            return None
        if shape[-1] == FRAME_LIST:
            uids[-1] = frame_numbers(uids[-1])
        for uid in uids:
            if isinstance(uid, str) and not is_valid_uid(uid):
                raise Problem(400, f"{uid!r} is not a valid UID", kind="bad-uid")
        return getattr(self, name), uids

    ACTIONS = {
        "_search_studies": "query", "_search_series": "query", "_search_instances": "query",
        "_retrieve": "retrieve", "_metadata": "retrieve", "_frames": "retrieve", "_thumbnail": "retrieve",
        "_store": "store",
    }

    async def _authorise(self, request, action: str):
        """The node's access decision for ``action``; a 401/403 problem when it refuses.

        A store was decided from its headers, before its body was read (see
        :mod:`medd.transports.http`); a read, which has no body, is decided here.
        """
        if action == "store":
            from medd.transports.http import admitted

            return admitted(request)
        claim = access_claim(request, action, self.api.transport)
        decision = await self.api.check_access(claim)
        if not decision.allowed:
            raise access_refusal(claim, decision)
        return decision

    def _dispatch(self, request, routes):
        async def handle(request):
            routed = self._route(request, routes)
            if routed is None:
                raise Problem(404, f"no DICOMweb resource at {request.path.decode('latin-1', 'replace')}")
            handler, uids = routed
            action = self.ACTIONS[handler.__name__]
            decision = await self._authorise(request, action)
            request.medd_access = decision
            if action == "store":  # each stored instance is recorded by the ingest
                return await handler(request, *uids)
            return await handler(request, *uids, who=decision.who)

        return render_async(request, handle)

    def render_GET(self, request):
        return self._dispatch(request, self.GET_ROUTES)

    def render_POST(self, request):
        return self._dispatch(request, self.POST_ROUTES)

    def _base(self, request) -> str:
        return request.prePathURL().decode("ascii", "replace").rstrip("/")

    # -- QIDO-RS --

    async def _search_studies(self, request, *, who: str) -> Response:
        query = parse_query(request)
        rows = await self.api.queries.search_studies(query.matches, query.limit + 1, query.offset)
        return await self._results(request, query, study_dataset, rows, who)

    async def _search_series(self, request, study: str | None = None, *, who: str) -> Response:
        query = parse_query(request)
        rows = await self.api.queries.search_series(study, query.matches, query.limit + 1, query.offset)
        return await self._results(request, query, series_dataset, rows, who, study)

    async def _search_instances(self, request, study: str | None = None, series: str | None = None, *,
                                who: str) -> Response:
        query = parse_query(request)
        records = await self.api.queries.search_instances(study, series, query.matches, query.limit + 1, query.offset)
        return await self._results(request, query, instance_dataset, records, who, study, series)

    async def _results(self, request, query: Query, to_dataset, rows: list, who: str, study: str | None = None,
                       series: str | None = None) -> Response:
        patients = {row.get("patient_id") if isinstance(row, dict) else row.patient_id for row in rows[: query.limit]}
        patients.discard(None)
        await self.api.audit(
            "query", user=who, peer=client_ip(request), study_instance_uid=study, series_instance_uid=series,
            patient_id=patients.pop() if len(patients) == 1 else None,
            detail=f"QIDO-RS {request.uri.decode('latin-1', 'replace')[:512]}: {min(len(rows), query.limit)} found")
        headers = {}
        if len(rows) > query.limit:
            rows = rows[: query.limit]
            # PS3.18 8.3.4.4: say that there are more results than returned.
            headers["Warning"] = '299 medd "There are additional results that can be requested"'
        base = self._base(request)
        # Thousands of datasets take long enough to encode to stall the reactor.
        body = await self.api.run_blocking(lambda: dicom_json(to_dataset(row, base) for row in rows))
        return json_response(200, body, DICOM_JSON, **headers)

    # -- WADO-RS --

    async def _instances(self, study: str, series: str | None, sop: str | None) -> list[ObjectRecord]:
        if sop is not None:
            record = await self.api.queries.object_by_uid(sop)
            found = (
                [record]
                if record is not None and record.media_type == DICOM
                and record.study_instance_uid == study and record.series_instance_uid == series
                else []
            )
        else:
            found = await self.api.queries.search_instances(study, series, [], None)
        if not found:
            what = "instance" if sop else "series" if series else "study"
            raise Problem(404, f"no such {what} is stored here", kind="not-found")
        return found

    async def _audit_retrieve(self, request, who: str, records: list[ObjectRecord], what: str) -> None:
        patients = {r.patient_id for r in records} - {None}
        first = records[0]
        await self.api.audit(
            "retrieve", user=who, peer=client_ip(request), patient_id=patients.pop() if len(patients) == 1 else None,
            study_instance_uid=first.study_instance_uid,
            series_instance_uid=first.series_instance_uid if len({r.series_instance_uid for r in records}) == 1 else None,
            sop_instance_uid=first.sop_instance_uid if len(records) == 1 else None,
            detail=f"WADO-RS {what} of {len(records)} instance{'s' if len(records) != 1 else ''}")

    async def _retrieve(self, request, study: str, series: str | None = None, sop: str | None = None, *, who: str):
        accept = (request.getHeader("accept") or "*/*").lower()
        if not any(m in accept for m in ("multipart/related", "*/*", "multipart/*", DICOM)):
            raise Problem(406, f"instances are served as multipart/related; type=\"{DICOM}\", not {accept}")
        records = await self._instances(study, series, sop)
        await self._audit_retrieve(request, who, records, "instances")
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        boundary = uuid.uuid4().hex
        request.setResponseCode(200)
        request.setHeader("Content-Type", f'multipart/related; type="{DICOM}"; boundary={boundary}')
        flow = _Flow()
        request.registerProducer(flow, True)
        try:
            for record in records:
                await flow.ready()
                if gone or flow.stopped:
                    return None
                data = await self.api.queries.read_blob(record.digest)
                if gone:
                    return None
                head = (
                    f"--{boundary}\r\n"
                    f"Content-Type: {DICOM}; transfer-syntax={record.transfer_syntax_uid}\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode("ascii")
                request.write(head + data + b"\r\n")
            request.write(f"--{boundary}--\r\n".encode("ascii"))
        except Exception:
            # The status line is sent: all that is left is to cut the
            # response short so that the client cannot take it as complete.
            log.failure("WADO-RS retrieval of {uid} failed midway", uid=sop or series or study)
            if not gone:
                request.unregisterProducer()
                request.loseConnection()
            return None
        request.unregisterProducer()
        request.finish()
        for record in records:
            await self.api.pixel_data_retrieved(record.sop_instance_uid, who, client_ip(request))
        return None

    async def _metadata(self, request, study: str, series: str | None = None, sop: str | None = None, *,
                        who: str):
        """The dicom+json of each instance without its pixel data, streamed a batch at a time: from the node's
        metadata cache where it keeps one, else parsed from the stored object (and then cached)."""
        records = await self._instances(study, series, sop)
        await self._audit_retrieve(request, who, records, "metadata")
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        request.setResponseCode(200)
        request.setHeader("Content-Type", DICOM_JSON)
        flow = _Flow()
        request.registerProducer(flow, True)
        try:
            first = True
            for start in range(0, len(records), METADATA_BATCH):
                batch = records[start:start + METADATA_BATCH]
                cached = await self.api.queries.cached_metadata([r.digest for r in batch])
                made = {}
                for record in batch:
                    await flow.ready()
                    if gone or flow.stopped:
                        return None
                    document = cached.get(record.digest) or made.get(record.digest)
                    if document is None:
                        data = await self.api.queries.read_blob(record.digest)
                        document = made[record.digest] = await self.api.run_blocking(metadata_json, data)
                    if gone:
                        return None
                    request.write((b"[" if first else b",") + document)
                    first = False
                await self.api.queries.cache_metadata(made)
            request.write(b"[]" if first else b"]")
        except Exception:
            log.failure("WADO-RS metadata of {uid} failed midway", uid=sop or series or study)
            if not gone:
                request.unregisterProducer()
                request.loseConnection()
            return None
        request.unregisterProducer()
        request.finish()
        return None

    async def _frames(self, request, study: str, series: str, sop: str, numbers: list[int], *,
                      who: str) -> Response:
        """Frames of one instance as multipart/related, in the stored transfer syntax when the client
        accepts it, else Explicit VR Little Endian (PS3.18 8.7.3)."""
        accepted = parse_accept(request.getHeader("accept"))
        if not accepted:
            raise Problem(406, "frames are served as multipart/related; type=\"application/octet-stream\" (or the "
                               "stored image media type), not " + (request.getHeader("accept") or ""))
        (record,) = await self._instances(study, series, sop)
        await self._audit_retrieve(request, who, [record], f"frames {','.join(map(str, numbers))[:64]}")
        data = await self.api.queries.read_blob(record.digest)
        try:
            frames = await self.api.run_blocking(read_frames, data, numbers, accepted)
        except FrameError as e:
            raise Problem(e.status, str(e), kind="frames") from e
        del data
        boundary = uuid.uuid4().hex
        body = b"".join(
            (f"--{boundary}\r\nContent-Type: {frame.media_type}; transfer-syntax={frame.transfer_syntax}\r\n"
             f"Content-Location: {self._base(request)}/studies/{study}/series/{series}/instances/{sop}/frames/"
             f"{frame.number}\r\nContent-Length: {len(frame.data)}\r\n\r\n").encode("ascii") + frame.data + b"\r\n"
            for frame in frames
        ) + f"--{boundary}--\r\n".encode("ascii")
        first = frames[0]
        response = Response(200, f'multipart/related; type="{first.media_type}"; boundary={boundary}', body)
        await self.api.pixel_data_retrieved(sop, who, client_ip(request))
        return response

    async def _thumbnail(self, request, study: str, series: str | None = None, sop: str | None = None, *,
                         who: str) -> Response:
        """A JPEG of the instance (of the middle instance of a series, of the first series of a study),
        rendered by the node: a thumbnail, not the image (its pixel data is not "retrieved")."""
        accept = (request.getHeader("accept") or "*/*").lower()
        if not any(m in accept for m in ("image/jpeg", "image/*", "*/*")):
            raise Problem(406, f"thumbnails are served as image/jpeg, not {accept}")
        size = thumbnail_size(request)
        records = [r for r in await self._instances(study, series, sop) if r.rows]
        if not records:
            raise Problem(404, "there is no image to make a thumbnail of", kind="not-found")
        first_series = records[0].series_instance_uid
        records = [r for r in records if r.series_instance_uid == first_series]
        record = records[len(records) // 2]
        await self._audit_retrieve(request, who, [record], "thumbnail")
        data = await self.api.queries.read_blob(record.digest)
        try:
            jpeg = await self.api.run_blocking(render_thumbnail, data, size)
        except RenderError as e:
            raise Problem(404, f"instance {record.sop_instance_uid} has no thumbnail: {e}", kind="not-found") from e
        return Response(200, "image/jpeg", jpeg)

    # -- STOW-RS --

    async def _store(self, request, study: str | None = None) -> Response:
        media_type, params = media_type_of(request)
        if media_type != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
            shown = media_type + (f'; type="{params["type"]}"' if "type" in params else "")
            raise Problem(415, f'STOW-RS takes multipart/related; type="{DICOM}", not {shown or "no media type"}',
                          headers={"Accept-Post": f'multipart/related; type="{DICOM}"'})
        boundary = params.get("boundary")
        if not boundary:
            raise Problem(400, "the multipart/related media type has no boundary", kind="malformed-multipart")
        parts = await self.api.run_blocking(split_multipart, request.content, boundary,
                                             self.api.part_limits.max_stow_parts)
        if not parts:
            raise Problem(400, "the request carries no instances", kind="malformed-multipart")
        sender = request.medd_access
        if sender.role in RESULT_MAKERS:
            # A viewer or a radiologist stores only what they make; an image in their name is refused whole.
            others = [p for p in parts if object_type_of(p.sop_class_uid) not in VIEWER_OBJECT_TYPES]
            if others:
                raise Problem(403, f"{sender.role} {sender.who} may store only overlays and reports, and part "
                                   f"{others[0].number} is {object_type_of(others[0].sop_class_uid)}", kind="forbidden")
        peer = client_ip(request)
        # A registered sender stores in its own name (its package address), as its packages are; a radiologist
        # in their user name.
        origin = sender.address or (sender.who if sender.role == "radiologist" else None) or peer
        base = self._base(request)
        stored, failed, transient = [], [], 0
        for part in parts:
            failure = None
            if part.media_type != DICOM:
                failure = (FAILURE_CANNOT_UNDERSTAND, f"part {part.number} is {part.media_type or 'untyped'}, not {DICOM}")
            elif study is not None and part.study_instance_uid is None:
                failure = (FAILURE_CANNOT_UNDERSTAND, f"part {part.number} has no readable Study Instance UID")
            elif study is not None and part.study_instance_uid != study:
                failure = (FAILURE_CANNOT_UNDERSTAND,
                           f"part {part.number} belongs to study {part.study_instance_uid}, not {study}")
            else:
                try:
                    result = await self.api.receive_dicom(part.data, origin=origin, peer=peer, user=sender.who or None)
                except Refused as e:
                    code = {"too-large": FAILURE_OUT_OF_RESOURCES, "conflict": FAILURE_CONFLICT}.get(
                        e.kind, FAILURE_CANNOT_UNDERSTAND)
                    failure = (code, e.reason)
                except StoreFailed as e:
                    transient += 1
                    failure = (FAILURE_OUT_OF_RESOURCES, str(e))
            if failure is not None:
                code, reason = failure
                log.warn("STOW-RS part {number} from {peer} refused: {reason}", number=part.number, peer=peer,
                         reason=reason)
                failed.append(_failure(part, code, reason))
                continue
            item = Dataset()
            item.ReferencedSOPClassUID = result.sop_class_uid
            item.ReferencedSOPInstanceUID = result.uid
            item.RetrieveURL = instance_url(base, result.study_instance_uid, result.series_instance_uid, result.uid)
            stored.append(item)
        answer = Dataset()
        if study is not None:
            answer.RetrieveURL = f"{base}/studies/{study}"
        if failed:
            answer.FailedSOPSequence = failed
        if stored:
            answer.ReferencedSOPSequence = stored
        headers = {}
        if not failed:
            status = 200
        elif stored:
            status = 202
        elif transient == len(failed):
            status = 503
            headers["Retry-After"] = str(RETRY_AFTER)
        else:
            status = 409
        if failed:
            log_refusal(request, Problem(status, f"{len(failed)} of {len(parts)} instances not stored"))
        return json_response(status, answer.to_json_dict(), DICOM_JSON, **headers)
