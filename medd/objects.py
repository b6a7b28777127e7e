"""Parsing received objects: DICOM Part 10 checks and key information.

Everything here is blocking and CPU-bound; callers run it on the parsing
thread pool. Wire data is never trusted: a file that is truncated, is not
DICOM, or carries invalid UIDs raises :class:`InvalidObject` with a reason an
operator (and the sender) can act on.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.uid import UID

PREAMBLE = b"\0" * 128
MAGIC = b"DICM"
# What a deflated dataset may inflate to when the caller names no limit; the
# ingest path passes the node's [limits] max_object_size.
DEFAULT_MAX_INFLATED_SIZE = 512 * 1024 * 1024
_INFLATE_CHUNK = 1024 * 1024

_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"

# SOP classes that are not "images" for routing: presentation states
# (overlays) and structured reports / encapsulated documents (reports).
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
ENCAPSULATED_PDF_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
STORAGE_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4."


class InvalidObject(ValueError):
    """Received data that medd refuses; ``reason`` says why in one sentence."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KeyInformation:
    """What medd indexes about a DICOM object (all strings, '' when absent)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    modality: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    series_number: str = ""
    series_description: str = ""
    instance_number: str = ""
    institution_name: str = ""
    priority: str = ""  # the request's: STAT, HIGH, ROUTINE, MEDIUM or LOW
    patient_age: str = ""  # Patient's Age (0010,1010), e.g. 045Y
    intended_recipients: tuple[str, ...] = ()
    referenced_image_uids: tuple[str, ...] = ()
    #: A DICOM SR whose document title is an Imaging Measurement Report (TID 1500, what OHIF saves): carried as an
    #: overlay of the images it measures (``referenced_image_uids``, from its evidence), not as a report.
    measurement_report: bool = False
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None


@dataclass(frozen=True)
class Content:
    """One object as carried in a package (or received bare).

    ``data`` is what medd stores: for DICOM, a Part 10 file with a zeroed
    preamble; otherwise the part's bytes.
    """

    media_type: str
    data: bytes
    keyinfo: KeyInformation | None = None
    params: dict = field(default_factory=dict)

    @property
    def is_dicom(self) -> bool:
        return self.keyinfo is not None


def check_uid(value, what: str) -> str:
    """``value`` as a str, or InvalidObject if it is missing or not a valid UID."""
    if value is None or value == "":
        raise InvalidObject(f"{what} is missing")
    uid = UID(str(value).strip("\0 "))
    if not uid.is_valid:
        raise InvalidObject(f"{what} {str(value)!r} is not a valid UID")
    return str(uid)


def is_valid_uid(value: str) -> bool:
    return bool(value) and UID(value).is_valid


def encode_part10(meta: FileMetaDataset, dataset_bytes: bytes) -> bytes:
    """A Part 10 file from file meta information and an encoded dataset.

    Used for data received over DIMSE, where the dataset arrives without meta.
    """
    buf = io.BytesIO()
    buf.write(PREAMBLE + MAGIC)
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(dataset_bytes)
    return buf.getvalue()


def parse_part10(data: bytes, *, max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE) -> Content:
    """Check a DICOM Part 10 file and extract its key information.

    Raises :class:`InvalidObject` for non-DICOM, truncated or invalid data,
    and for a deflated dataset that would inflate beyond
    ``max_inflated_size`` bytes (found without ever holding more than a
    megabyte of it). The returned content's ``data`` has its preamble zeroed
    (a non-zero preamble can make a file that is also a valid executable or
    archive).
    """
    if len(data) < 132 or data[128:132] != MAGIC:
        raise InvalidObject("not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)")
    if data[:128] != PREAMBLE:
        data = PREAMBLE + data[128:]
    fp = io.BytesIO(data)
    fp.seek(132)
    try:
        meta = _read_meta(fp)
        ts = check_uid(meta.get("TransferSyntaxUID"), "Transfer Syntax UID (0002,0010)")
        dataset = _read_dataset(data, fp, UID(ts), max_inflated_size)
    except InvalidObject:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise InvalidObject(f"malformed DICOM data: {e}") from e
    except Exception as e:  # pydicom raises assorted errors on hostile input
        raise InvalidObject(f"malformed DICOM data ({type(e).__name__}: {e})") from e
    keyinfo = extract_key_information(dataset, ts)
    # A Media Storage SOP Instance UID that differs from the dataset's is
    # common in the field (copied meta); the dataset is authoritative.
    return Content(media_type="application/dicom", data=data, keyinfo=keyinfo)


def _read_meta(fp) -> FileMetaDataset:
    from pydicom.filereader import _read_file_meta_info

    return _read_file_meta_info(fp)


def _inflated_size(stream: bytes, limit: int) -> int:
    """Bytes the raw deflate ``stream`` inflates to, counted a chunk at a time
    and discarded; refused as soon as the count passes ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = len(inflater.decompress(stream, _INFLATE_CHUNK))
    while total <= limit and inflater.unconsumed_tail:
        total += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_CHUNK))
    if total > limit:
        raise InvalidObject(f"the deflated dataset inflates to more than {limit} bytes")
    total += len(inflater.flush())
    if not inflater.eof:
        raise InvalidObject("truncated DICOM data: the deflated dataset ends before its deflate stream does")
    # Bytes after the end of the deflate stream are ignored, as pydicom does:
    # writers pad to an even length, and some (pydicom's own image_dfl.dcm)
    # leave more.
    return total


def _read_dataset(data: bytes, fp, ts: UID, max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE) -> Dataset:
    """Read the dataset after the meta, refusing truncated data.

    pydicom reads a truncated file without complaint (it stops at EOF), so
    every top-level element is checked to end inside the file, undefined
    lengths to end with their delimiter, and the last element at EOF. A
    deflated dataset is measured before it is inflated (a small "deflate
    bomb" must not cost gigabytes), then inflated and held to the same
    checks as any other.
    """
    if ts.is_deflated:
        stream = data[fp.tell():]
        _inflated_size(stream, max_inflated_size)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(stream)
        return _read_dataset(inflated, io.BytesIO(inflated), UID(pydicom.uid.ExplicitVRLittleEndian))
    n = len(data)
    delimiter = _DELIMITER_LE if ts.is_little_endian else _DELIMITER_BE
    elements = {}
    end = fp.tell()
    for element in data_element_generator(fp, ts.is_implicit_VR, ts.is_little_endian):
        end = fp.tell()
        length = getattr(element, "length", None)
        if length == 0xFFFFFFFF or getattr(element, "is_undefined_length", False):
            if data[end - 8 : end] != delimiter:
                raise InvalidObject(f"truncated DICOM data: element {element.tag} has no end delimiter")
        elif length is not None and element.value_tell + length > n:
            raise InvalidObject(f"truncated DICOM data: element {element.tag} ends after the end of the file")
        elements[element.tag] = element
    if end != n:
        raise InvalidObject(f"truncated DICOM data: {n - end} stray bytes after the last element")
    ds = Dataset(elements)
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian, None)
    return ds


# Single-valued elements of these VRs are decoded here straight from their
# bytes: it gives what pydicom's conversion gives (trailing spaces and NULs
# stripped) at a fraction of its cost, which is most of the time it takes to
# extract key information. Anything else goes through pydicom.
_DEFAULT_REPERTOIRE_VRS = frozenset({"AE", "CS", "DA", "DT", "TM", "UI"})
_CHARSET_VRS = frozenset({"LO", "SH", "PN"})
_SIMPLE_CHARSETS = {None: "latin_1", "": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf-8"}
_SPECIFIC_CHARACTER_SET = 0x00080005


def _charset_codec(ds: Dataset) -> str | None:
    """The Python codec of a dataset's single-byte or UTF-8 character set, or None."""
    raw = ds.get_item(_SPECIFIC_CHARACTER_SET)
    if raw is None:
        return "latin_1"
    if not isinstance(raw, RawDataElement) or raw.value is None:
        return None
    return _SIMPLE_CHARSETS.get(raw.value.decode("latin_1").strip("\0 "))


def _direct_text(ds: Dataset, keyword: str, codec: str | None) -> str | None:
    """The element's value decoded from its bytes, or None when pydicom must do it."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    raw = ds.get_item(tag)
    if raw is None:
        return ""
    if not isinstance(raw, RawDataElement):
        return None
    vr = raw.VR or dictionary_VR(tag)
    value = raw.value
    if value is None:
        return ""
    if b"\\" in value:
        return None
    if vr in _DEFAULT_REPERTOIRE_VRS:
        return value.decode("latin_1").strip("\0 ")
    if vr in _CHARSET_VRS and codec is not None:
        try:
            return value.decode(codec).strip("\0 ")
        except UnicodeDecodeError:
            return None
    return None


def _text(ds: Dataset, keyword: str, codec: str | None = None) -> str:
    direct = _direct_text(ds, keyword, codec)
    if direct is not None:
        return direct
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip("\0 ")


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return tuple(str(v).strip("\0 ") for v in items if str(v).strip("\0 "))


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def extract_key_information(ds: Dataset, transfer_syntax: str) -> KeyInformation:
    """Key information of a dataset; InvalidObject if identifying UIDs are bad."""
    try:
        codec = _charset_codec(ds)
        sop_class = check_uid(_text(ds, "SOPClassUID"), "SOP Class UID (0008,0016)")
        if not sop_class.startswith(STORAGE_SOP_CLASS_PREFIX):
            raise InvalidObject(f"SOP Class UID {sop_class} is not a DICOM storage SOP class")
        # A measurement report is an overlay only with images to attach it to; without, it stays a report.
        evidence = _evidence_images(ds) if sop_class.startswith(SR_SOP_CLASS_PREFIX) and _is_measurement_report(ds) \
            else ()
        measurement = bool(evidence)
        keyinfo = KeyInformation(
            sop_instance_uid=check_uid(_text(ds, "SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
            sop_class_uid=sop_class,
            study_instance_uid=check_uid(_text(ds, "StudyInstanceUID"), "Study Instance UID (0020,000D)"),
            series_instance_uid=check_uid(_text(ds, "SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
            transfer_syntax_uid=transfer_syntax,
            patient_id=_text(ds, "PatientID", codec),
            patient_name=_text(ds, "PatientName", codec),
            patient_birth_date=_text(ds, "PatientBirthDate", codec),
            patient_sex=_text(ds, "PatientSex", codec),
            modality=_text(ds, "Modality", codec),
            study_date=_text(ds, "StudyDate", codec),
            study_time=_text(ds, "StudyTime", codec),
            study_description=_text(ds, "StudyDescription", codec),
            study_id=_text(ds, "StudyID", codec),
            accession_number=_text(ds, "AccessionNumber", codec),
            referring_physician_name=_text(ds, "ReferringPhysicianName", codec),
            series_number=_text(ds, "SeriesNumber", codec),
            series_description=_text(ds, "SeriesDescription", codec),
            instance_number=_text(ds, "InstanceNumber", codec),
            institution_name=_text(ds, "InstitutionName", codec),
            priority=_priority(ds),
            patient_age=_text(ds, "PatientAge", codec)[:4],
            intended_recipients=_values(ds, "NamesOfIntendedRecipientsOfResults"),
            referenced_image_uids=(_referenced_images(ds) if sop_class == GSPS_SOP_CLASS
                                   else evidence),
            measurement_report=measurement,
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            number_of_frames=_int(ds, "NumberOfFrames"),
        )
    except InvalidObject:
        raise
    except Exception as e:  # a value pydicom cannot convert is malformed input
        raise InvalidObject(f"malformed DICOM attribute ({type(e).__name__}: {e})") from e
    return keyinfo


PRIORITIES = ("STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW")


def _priority(ds: Dataset) -> str:
    """The request's priority: Requested Procedure Priority (0040,1003) at the top level or in the Request
    Attributes Sequence (0040,0275), else the retired Study Priority ID (0032,000C); '' when none is a known value."""
    candidates = [ds.get("RequestedProcedurePriority")]
    for item in ds.get("RequestAttributesSequence") or ():
        candidates.append(item.get("RequestedProcedurePriority"))
    candidates.append(ds.get("StudyPriorityID"))
    for value in candidates:
        text = str(value or "").strip().upper()
        if text in PRIORITIES:
            return text
    return ""


# The document title (concept name) of a TID 1500 Imaging Measurement Report.
MEASUREMENT_REPORT_TITLE = ("126000", "DCM")


def _is_measurement_report(ds: Dataset) -> bool:
    return any((str(c.get("CodeValue", "")), str(c.get("CodingSchemeDesignator", ""))) == MEASUREMENT_REPORT_TITLE
               for c in ds.get("ConceptNameCodeSequence") or [])


def _evidence_images(ds: Dataset) -> tuple[str, ...]:
    """The images an SR's evidence sequences (current requested procedure, then pertinent other) list."""
    uids = []
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword) or []:
            for series in study.get("ReferencedSeriesSequence") or []:
                for image in series.get("ReferencedSOPSequence") or []:
                    uid = str(image.get("ReferencedSOPInstanceUID", "")).strip("\0 ")
                    if uid and uid not in uids:
                        uids.append(uid)
    return tuple(uids)


def _referenced_images(ds: Dataset) -> tuple[str, ...]:
    uids = []
    for series in ds.get("ReferencedSeriesSequence") or []:
        for image in series.get("ReferencedImageSequence") or []:
            uid = str(image.get("ReferencedSOPInstanceUID", "")).strip("\0 ")
            if uid:
                uids.append(uid)
    return tuple(uids)


def classify(keyinfo: KeyInformation) -> str:
    """The object-type name a DICOM object is carried as by default: a measurement report is an overlay."""
    if keyinfo.measurement_report:
        return "overlay"
    return object_type_of_class(keyinfo.sop_class_uid)


def object_type_of_class(sop_class_uid: str) -> str:
    """The object-type name an object of this SOP class is carried as by default."""
    if sop_class_uid == GSPS_SOP_CLASS:
        return "overlay"
    if sop_class_uid.startswith(SR_SOP_CLASS_PREFIX) or sop_class_uid == ENCAPSULATED_PDF_SOP_CLASS:
        return "report"
    return "image"
