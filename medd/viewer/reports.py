"""Reports: a study's text report as a DICOM Basic Text SR, and read back.

The SR belongs to the study it reports on (same Study Instance UID, patient
and study attributes copied from one of its images), lists the study's
images as evidence and names the radiologist as author. Its kind is in the
SR Document General module's own flags:

- **preliminary**: Preliminary Flag PRELIMINARY, Verification Flag UNVERIFIED
  (signed by its author, not verified);
- **final**: FINAL and VERIFIED, the radiologist also its verifying observer;
  a preliminary report it replaces is its predecessor document;
- **addendum**: FINAL and VERIFIED, holding only the added text (an
  "Addendum" item, DCM 121078), with the report it adds to as its
  predecessor document; never a copy of that report.

Blocking; run on the parsing pool.
"""
from __future__ import annotations

import io
from datetime import datetime, timezone

import highdicom as hd
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from medd import __version__
from medd.report_documents import read_report

__all__ = ["KINDS", "ReportError", "build_text_report", "read_report"]

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KINDS = ("preliminary", "final", "addendum")
REPORT_SERIES_NUMBER = 901
MAX_TEXT = 1024 * 1024  # UT allows more; a report longer than this is a mistake
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "SpecificCharacterSet",
)


class ReportError(ValueError):
    """A report that cannot be saved as asked."""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _person(user: str) -> PersonName:
    return PersonName(user if "^" in user else f"{user}^")


def _reference(study_uid: str, predecessor: tuple[str, str, str]) -> Dataset:
    """A Predecessor Documents Sequence item: the study, series and SOP of an earlier report."""
    series_uid, sop_class, sop_instance = predecessor
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_instance
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = Sequence([ref])
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = Sequence([series])
    return study


def build_text_report(study_image: bytes, evidence: list[tuple[str, str, str]], *, text: str, user: str,
                      report_uid: str, device: str, when: datetime | None = None, kind: str = "final",
                      predecessor: tuple[str, str, str] | None = None) -> bytes:
    """A Basic Text SR (Part 10 bytes) of ``text`` about the study of ``study_image``.

    ``evidence`` lists the study's images as (series UID, SOP class UID, SOP instance UID); ``kind`` is
    preliminary, final or addendum; ``predecessor`` is the (series UID, SOP class UID, SOP instance UID)
    of the report this one replaces (a final after a preliminary) or adds to (an addendum).
    """
    if kind not in KINDS:
        raise ReportError(f"a report is {', '.join(KINDS)}, not {kind!r}")
    if kind == "addendum" and predecessor is None:
        raise ReportError("an addendum needs the report it adds to")
    text = (text or "").strip()
    if not text:
        raise ReportError("the report is empty")
    if len(text) > MAX_TEXT:
        raise ReportError(f"the report is longer than {MAX_TEXT} characters")
    when = when or datetime.now(timezone.utc)
    image = dcmread(io.BytesIO(study_image), stop_before_pixels=True)
    ds = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in image:
            setattr(ds, keyword, image.data_element(keyword).value)
    ds.SpecificCharacterSet = "ISO_IR 192"  # the report text is UTF-8 whatever the image used
    for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2 in the General Study module
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = report_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = hd.UID()
    ds.SeriesNumber = REPORT_SERIES_NUMBER
    ds.SeriesDescription = "medd reports"
    ds.Manufacturer = "medd"
    ds.ManufacturerModelName = "medd viewer"
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = device[:64]
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.CompletionFlag = "COMPLETE"
    ds.PreliminaryFlag = "PRELIMINARY" if kind == "preliminary" else "FINAL"
    ds.VerificationFlag = "UNVERIFIED" if kind == "preliminary" else "VERIFIED"
    if kind != "preliminary":
        observer = Dataset()
        observer.VerifyingObserverName = _person(user)
        observer.VerifyingOrganization = device[:64]
        observer.VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
        observer.VerifyingObserverIdentificationCodeSequence = Sequence()
        ds.VerifyingObserverSequence = Sequence([observer])
    if predecessor is not None:
        ds.PredecessorDocumentsSequence = Sequence([_reference(ds.StudyInstanceUID, predecessor)])
    author = Dataset()
    author.ObserverType = "PSN"
    author.PersonName = _person(user)
    author.PersonIdentificationCodeSequence = Sequence()
    author.InstitutionName = device[:64]
    ds.AuthorObserverSequence = Sequence([author])
    series: dict[str, list] = {}
    for series_uid, sop_class, sop_instance in evidence:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = sop_instance
        series.setdefault(series_uid, []).append(ref)
    study_ref = Dataset()
    study_ref.StudyInstanceUID = ds.StudyInstanceUID
    study_ref.ReferencedSeriesSequence = Sequence()
    for series_uid, refs in series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = Sequence(refs)
        study_ref.ReferencedSeriesSequence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study_ref])
    ds.PerformedProcedureCodeSequence = Sequence()
    # The document: a container holding who observed and what they found.
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    name = Dataset()
    name.RelationshipType = "HAS OBS CONTEXT"
    name.ValueType = "PNAME"
    name.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    name.PersonName = _person(user)
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([_code("121078", "DCM", "Addendum") if kind == "addendum"
                                                else _code("121071", "DCM", "Finding")])
    finding.TextValue = text
    ds.ContentSequence = Sequence([name, finding])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
