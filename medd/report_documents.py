"""What a stored report says of itself: its text, its kind (preliminary,
final, addendum), who signed it and when, and the report it follows. Read
by the viewer to show a report and by central to list it; what a report says
is vouched for only by who delivered it (``Medd-Report-Source``). Blocking;
run on a thread pool.
"""
from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.dataset import Dataset


def _texts(items) -> list[str]:
    out = []
    for item in items or []:
        if item.get("ValueType") == "TEXT" and item.get("TextValue"):
            out.append(str(item.TextValue))
        out.extend(_texts(item.get("ContentSequence")))
    return out


def _kind(ds: Dataset) -> str:
    if ds.get("PreliminaryFlag") == "PRELIMINARY" or ds.get("VerificationFlag") != "VERIFIED":
        return "preliminary"
    for item in ds.get("ContentSequence") or []:
        for code in item.get("ConceptNameCodeSequence") or []:
            if (code.get("CodeValue"), code.get("CodingSchemeDesignator")) == ("121078", "DCM"):
                return "addendum"
    return "final"


def _predecessor(ds: Dataset) -> str | None:
    for study in ds.get("PredecessorDocumentsSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for sop in series.get("ReferencedSOPSequence") or []:
                return str(sop.ReferencedSOPInstanceUID)
    return None


def _datetime(value: str | None) -> str | None:
    d = str(value or "")
    if len(d) < 8:
        return None
    t = d[8:14].ljust(6, "0")
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}T{t[:2]}:{t[2:4]}:{t[4:6]}"


def read_report(data: bytes, media_type: str = "application/dicom") -> dict:
    """{uid, author, time, text, verified, kind, signer, signed_at, predecessor, series_uid, sop_class} of a
    stored report (DICOM SR, or plain text). ``signer`` is the verifying observer of a verified report, else
    its author; what the report says, which is vouched for only by who delivered it."""
    if media_type == "text/plain":
        return {"author": None, "time": None, "text": data.decode("utf-8", "replace"), "verified": False,
                "kind": "preliminary", "signer": None, "signed_at": None, "predecessor": None, "series_uid": None,
                "sop_class": None}
    ds = dcmread(io.BytesIO(data))
    author = None
    for seq, key in (("AuthorObserverSequence", "PersonName"), ("VerifyingObserverSequence", "VerifyingObserverName")):
        for item in ds.get(seq) or []:
            if item.get(key):
                author = str(item.get(key)).rstrip("^")
                break
        if author:
            break
    time = None
    if ds.get("ContentDate"):
        d = str(ds.ContentDate)
        t = str(ds.get("ContentTime") or "000000").split(".")[0].ljust(6, "0")
        time = f"{d[:4]}-{d[4:6]}-{d[6:8]}T{t[:2]}:{t[2:4]}:{t[4:6]}"
    if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1":
        text = "(Encapsulated PDF report)"
    else:
        text = "\n\n".join(_texts(ds.get("ContentSequence")))
    verified = ds.get("VerificationFlag") == "VERIFIED"
    signer, signed_at = author, time
    for item in (ds.get("VerifyingObserverSequence") or []) if verified else []:
        if item.get("VerifyingObserverName"):
            signer = str(item.VerifyingObserverName).rstrip("^")
            signed_at = _datetime(item.get("VerificationDateTime")) or time
            break
    return {"uid": str(ds.SOPInstanceUID), "author": author, "time": time, "text": text, "verified": verified,
            "kind": _kind(ds), "signer": signer, "signed_at": signed_at, "predecessor": _predecessor(ds),
            "series_uid": str(ds.get("SeriesInstanceUID") or "") or None, "sop_class": str(ds.SOPClassUID)}
