"""Measurements the radiologist saves in OHIF: the graphic annotations of a
DICOM SR measurement report (TID 1500, as OHIF stores it over STOW-RS), image
by image, ready to become one presentation state per image
(:func:`medd.viewer.overlays.build_presentation_state`, highdicom).

Each spatial coordinate (SCOORD) content item of the report names the image
(and frame) it was drawn on in its IMAGE child, or its own Referenced SOP
Sequence. A POLYLINE is a line (a length, or a closed ROI outline), an
ELLIPSE or CIRCLE an ellipse, a POINT or MULTIPOINT a text mark at each point.
The numeric measurements of the same group (a mean, an area) become the
label, so that any PACS showing the GSPS shows the values too; a line's length
is written by the GSPS builder from the image's pixel spacing. 3D coordinates
(SCOORD3D) are in the patient's frame, not an image's, and are skipped (and
said so in the log). Blocking (pydicom); run on the parsing pool.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from twisted.logger import Logger

from medd.objects import MEASUREMENT_REPORT_TITLE
from medd.viewer.annotations import MAX_TEXT, Annotation, AnnotationError, check_annotation

log = Logger()

# OHIF saves measurements under this title (DCM 126000 "Imaging Measurement Report").
MEASUREMENT_REPORT = MEASUREMENT_REPORT_TITLE
MAX_DEPTH = 32  # content trees are shallow; a deeper one is hostile


@dataclass(frozen=True)
class MeasurementReport:
    """What a saved measurement report draws: ``annotations[image_uid]``, and how many 3D coordinates it had."""

    annotations: dict[str, list[Annotation]]
    skipped: int = 0


def _concept(item: Dataset) -> str:
    for code in item.get("ConceptNameCodeSequence") or []:
        return str(code.get("CodeMeaning") or "")
    return ""


def _number_text(item: Dataset) -> str | None:
    """"Mean: 12.3 HU" for a NUM content item."""
    for value in item.get("MeasuredValueSequence") or []:
        number = value.get("NumericValue")
        if number is None:
            continue
        unit = ""
        for code in value.get("MeasurementUnitsCodeSequence") or []:
            unit = str(code.get("CodeValue") or "")
        unit = "" if unit in ("1", "{ratio}") else unit
        try:
            shown = f"{float(number):.4g}"
        except (TypeError, ValueError):
            continue
        return f"{_concept(item) or 'value'}: {shown} {unit}".strip()
    return None


def _image_references(item: Dataset) -> list[tuple[str, int | None]]:
    """(SOP Instance UID, frame or None) of the images a SCOORD item was drawn on."""
    refs = list(item.get("ReferencedSOPSequence") or [])
    for child in item.get("ContentSequence") or []:
        if child.get("ValueType") == "IMAGE":
            refs.extend(child.get("ReferencedSOPSequence") or [])
    out = []
    for ref in refs:
        uid = ref.get("ReferencedSOPInstanceUID")
        if not uid:
            continue
        frame = ref.get("ReferencedFrameNumber")
        if isinstance(frame, (list, tuple, MultiValue)):
            frame = frame[0] if len(frame) else None
        out.append((str(uid), int(frame) if frame not in (None, "") else None))
    return out


def _points(item: Dataset) -> list[tuple[float, float]]:
    flat = [float(v) for v in (item.get("GraphicData") or [])]
    points = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
    return [p for p in points if all(math.isfinite(c) for c in p)]


def _drawn(kind: str, points: list[tuple[float, float]], label: str) -> list[dict]:
    """The annotations (as JSON) that show one SCOORD of ``kind`` with ``label``."""
    if kind == "POLYLINE" and len(points) >= 2:
        return [{"type": "line", "points": points, "text": label}]
    if kind == "ELLIPSE" and len(points) == 4:
        return [{"type": "ellipse", "points": points, "text": label}]
    if kind == "CIRCLE" and len(points) == 2:
        (cx, cy), (px, py) = points
        r = math.hypot(px - cx, py - cy)
        return [{"type": "ellipse", "points": [(cx - r, cy - r), (cx + r, cy + r)], "text": label}]
    if kind in ("POINT", "MULTIPOINT"):
        return [{"type": "text", "points": [p], "text": label or "+"} for p in points]
    return []


def _walk(items, depth: int, group_text: list[str], found: dict, counts: dict) -> None:
    if depth > MAX_DEPTH:
        raise AnnotationError("the report's content tree is too deep")
    # The numbers of a group label the graphics of the same group (or of their parent NUM).
    texts = [t for t in (_number_text(i) for i in items if i.get("ValueType") == "NUM") if t] or group_text
    for item in items:
        value_type = item.get("ValueType")
        if value_type == "SCOORD":
            kind = str(item.get("GraphicType") or "")
            label = "; ".join(texts)[:MAX_TEXT]
            for uid, frame in _image_references(item):
                for a in _drawn(kind, _points(item), label):
                    if frame is not None:
                        a["frame"] = frame
                    found.setdefault(uid, []).append(a)
        elif value_type == "SCOORD3D":
            counts["skipped"] += 1
        children = item.get("ContentSequence")
        if children:
            own = [_number_text(item)] if value_type == "NUM" else []
            _walk(children, depth + 1, [t for t in own if t] or texts, found, counts)


def read_measurement_report(data: bytes) -> MeasurementReport:
    """The annotations of an SR measurement report, by image; a graphic that cannot be drawn is skipped."""
    ds = dcmread(io.BytesIO(data), force=False)
    found: dict[str, list[dict]] = {}
    counts = {"skipped": 0}
    _walk(ds.get("ContentSequence") or [], 0, [], found, counts)
    annotations: dict[str, list[Annotation]] = {}
    for uid, items in found.items():
        checked = []
        for a in items:
            try:
                checked.append(check_annotation(a, len(checked) + 1))
            except AnnotationError as e:
                log.warn("a graphic of measurement report {uid} on {image} is not drawn: {why}",
                         uid=str(ds.get("SOPInstanceUID")), image=uid, why=str(e))
        if checked:
            annotations[uid] = checked
    return MeasurementReport(annotations, counts["skipped"])


def is_measurement_report(data: bytes) -> bool:
    """Whether an SR's document title is an Imaging Measurement Report (TID 1500)."""
    ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["ConceptNameCodeSequence"])
    return any((str(c.get("CodeValue")), str(c.get("CodingSchemeDesignator"))) == MEASUREMENT_REPORT
               for c in ds.get("ConceptNameCodeSequence") or [])
