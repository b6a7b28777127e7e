"""Overlays: the radiologist's annotations as a DICOM Grayscale Softcopy
Presentation State (highdicom), and read back from one.

Annotations are :class:`~medd.viewer.annotations.Annotation` objects, checked
by :func:`~medd.viewer.annotations.check_annotations` here as in the overlay
API, and read back as such.

Each annotation is one Graphic Annotation item on a graphic layer named for
its type (ARROW, LINE, ELLIPSE, TEXT), which is how it is told apart when
read back (DICOM has no arrow graphic type: an arrow is a two-point
polyline). A line gets its length in mm as its text when the image's pixel
spacing is known. Blocking (numpy, pydicom); run on the parsing pool.
"""
from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from medd import __version__
from medd.viewer.annotations import MAX_TEXT, Annotation, AnnotationError, check_annotation, check_annotations
from medd.viewer.contract import CannotAnnotate, OverlayView

__all__ = ["AnnotationError", "CannotAnnotate", "build_presentation_state", "line_length_mm", "read_presentation_state"]

LAYER_OF = {"arrow": "ARROW", "line": "LINE", "ellipse": "ELLIPSE", "text": "TEXT"}
TYPE_OF_LAYER = {v: k for k, v in LAYER_OF.items()}
OVERLAY_SERIES_NUMBER = 900
# The image's Type 2 patient and study attributes that highdicom copies into a presentation state.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")


def _pixel_spacing(image: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm, from the image or its shared functional groups."""
    spacing = image.get("PixelSpacing")
    if spacing is None:
        for group in image.get("SharedFunctionalGroupsSequence") or []:
            for measures in group.get("PixelMeasuresSequence") or []:
                spacing = measures.get("PixelSpacing")
    try:
        if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
            return float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError):
        pass
    return None


def line_length_mm(points, spacing: tuple[float, float]) -> float:
    dy, dx = spacing
    return sum(math.hypot((x1 - x0) * dx, (y1 - y0) * dy) for (x0, y0), (x1, y1) in zip(points, points[1:]))


def _ellipse_axes(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) == 4:
        return points
    (x0, y0), (x1, y1) = points
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2, abs(y1 - y0) / 2
    if a >= b:
        return [(cx - a, cy), (cx + a, cy), (cx, cy - b), (cx, cy + b)]
    return [(cx, cy - b), (cx, cy + b), (cx - a, cy), (cx + a, cy)]


def _graphic(kind: str, points) -> hd.pr.GraphicObject:
    return hd.pr.GraphicObject(graphic_type=kind, graphic_data=np.array(points, dtype=float), units="PIXEL")


def _label(text: str, anchor: tuple[float, float]) -> hd.pr.TextObject:
    return hd.pr.TextObject(text_value=text[:MAX_TEXT], units="PIXEL", anchor_point=anchor, anchor_point_visible=False)


def _annotation_content(annotation: Annotation, spacing) -> tuple[str, list, list]:
    """(layer, graphic objects, text objects) of one checked annotation."""
    kind, points, text = annotation.type, list(annotation.points), annotation.text
    graphics, texts = [], []
    if kind in ("arrow", "line"):
        graphics.append(_graphic("POLYLINE", points))
        if kind == "line" and spacing is not None:
            length = f"{line_length_mm(points, spacing):.1f} mm"
            text = f"{text} {length}" if text else length
        if text:
            texts.append(_label(text, points[-1] if kind == "line" else points[0]))
    elif kind == "ellipse":
        graphics.append(_graphic("ELLIPSE", _ellipse_axes(points)))
        if text:
            texts.append(_label(text, points[0]))
    else:
        texts.append(_label(text, points[0]))
    return LAYER_OF[kind], graphics, texts


def _reference_header(image: Dataset) -> Dataset:
    """A copy of the image's header that highdicom can build a grayscale presentation state from.

    The presentation state copies the image's patient and study attributes. Those highdicom reads
    unconditionally are Type 2 (present, empty when unknown, PS3.3 C.7.1.1 and C.7.2.1); many images
    simply leave them out, so they are added empty. The UIDs it must reference cannot be made up.
    """
    missing = [k for k in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID") if not image.get(k)]
    if missing:
        raise CannotAnnotate(f"the image has no {', '.join(missing)}, which an overlay must reference")
    reference = Dataset(image)
    for keyword in TYPE2_COPIED:
        if keyword not in reference:
            setattr(reference, keyword, None)
    if int(image.get("SamplesPerPixel", 1) or 1) != 1:
        # highdicom builds a *grayscale* presentation state only for grayscale
        # images; the annotations reference a colour image just as well (by
        # UID), so it is handed a grayscale-looking copy of the header.
        reference.SamplesPerPixel = 1
        reference.PhotometricInterpretation = "MONOCHROME2"
    return reference


def build_presentation_state(image_bytes: bytes, annotations: list[Annotation], *, user: str, overlay_uid: str,
                             device: str, when: datetime | None = None, withdrawal: bool = False) -> bytes:
    """A GSPS (Part 10 bytes) annotating the image in ``image_bytes``; :class:`AnnotationError` for
    annotations that :func:`check_annotations` refuses or that name a frame the image does not have,
    :class:`CannotAnnotate` for an image whose header a presentation state cannot be made from.

    A ``withdrawal`` has no annotations: the new version of an overlay whose annotations were all deleted."""
    annotations = [] if withdrawal else check_annotations(annotations)
    image = dcmread(io.BytesIO(image_bytes), stop_before_pixels=True)
    reference = _reference_header(image)
    frames = int(image.get("NumberOfFrames", 1) or 1)
    spacing = _pixel_spacing(image)
    layers: dict[str, hd.pr.GraphicLayer] = {}
    items = []
    for i, annotation in enumerate(annotations, 1):
        layer_name, graphics, texts = _annotation_content(annotation, spacing)
        if layer_name not in layers:
            layers[layer_name] = hd.pr.GraphicLayer(layer_name=layer_name, order=len(layers) + 1,
                                                    description=f"{TYPE_OF_LAYER[layer_name]} annotations")
        frame = annotation.frame
        if frame is not None:
            if frame > frames:
                raise AnnotationError(f"annotation {i}: frame {frame} is outside 1..{frames}")
        elif frames > 1:
            frame = 1
        try:
            items.append(hd.pr.GraphicAnnotation(
                referenced_images=[reference], graphic_layer=layers[layer_name],
                referenced_frame_number=frame if frames > 1 else None,
                graphic_objects=graphics or None, text_objects=texts or None,
            ))
        except (ValueError, TypeError) as e:
            raise AnnotationError(f"annotation {i}: {e}") from e
    creator = PersonName(user if "^" in user else f"{user}^")
    with warnings.catch_warnings(), _header_cannot_carry_it():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's advice on person-name components
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[reference],
            series_instance_uid=hd.UID(),
            series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=overlay_uid,
            instance_number=1,
            manufacturer="medd",
            manufacturer_model_name="medd viewer",
            software_versions=__version__,
            device_serial_number=device[:64],
            content_label="MEDD_OVERLAY",
            content_description=(f"annotations withdrawn by {user}" if withdrawal else f"annotations by {user}")[:64],
            graphic_annotations=items or None,
            graphic_layers=list(layers.values()) or None,
            content_creator_name=creator,
        )
    if when is not None:
        gsps.PresentationCreationDate = when.strftime("%Y%m%d")
        gsps.PresentationCreationTime = when.strftime("%H%M%S")
    buf = io.BytesIO()
    gsps.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@contextmanager
def _header_cannot_carry_it():
    """What highdicom refuses in the image's header (a value it cannot copy) is the image's, not medd's."""
    try:
        yield
    except (AttributeError, ValueError, TypeError) as e:
        raise CannotAnnotate(f"the image's header cannot be copied into an overlay: {e}") from e


def _pairs(flat) -> list[list[float]]:
    values = [float(v) for v in flat]
    return [[values[i], values[i + 1]] for i in range(0, len(values) - 1, 2)]


def _ellipse_points(axes: list[list[float]]) -> list[list[float]]:
    """Bounding-box corners of an axis-aligned ellipse (as drawn); else its four axis end points."""
    (ax0, ay0), (ax1, ay1), (bx0, by0), (bx1, by1) = axes
    aligned = (ay0 == ay1 and bx0 == bx1) or (ax0 == ax1 and by0 == by1)
    if not aligned:
        return axes
    xs = [ax0, ax1, bx0, bx1]
    ys = [ay0, ay1, by0, by1]
    return [[min(xs), min(ys)], [max(xs), max(ys)]]


def read_presentation_state(data: bytes) -> OverlayView:
    """A stored presentation state's author, creation time and the annotations this viewer can draw."""
    ds = dcmread(io.BytesIO(data))
    author = str(ds.get("ContentCreatorName") or "").rstrip("^") or None
    created = None
    if ds.get("PresentationCreationDate"):
        t = str(ds.get("PresentationCreationTime") or "000000").split(".")[0].ljust(6, "0")
        d = str(ds.PresentationCreationDate)
        created = f"{d[:4]}-{d[4:6]}-{d[6:8]}T{t[:2]}:{t[2:4]}:{t[4:6]}"
    annotations = []
    for item in ds.get("GraphicAnnotationSequence") or []:
        layer = str(item.get("GraphicLayer") or "")
        frame = None
        for ref in item.get("ReferencedImageSequence") or []:
            if ref.get("ReferencedFrameNumber") is not None:
                value = ref.ReferencedFrameNumber
                frame = int(value[0]) if isinstance(value, (list, tuple, MultiValue)) else int(value)
        texts = [str(t.get("UnformattedTextValue") or "") for t in item.get("TextObjectSequence") or []]
        anchors = [
            _pairs(t.AnchorPoint)[0] if t.get("AnchorPoint") is not None else
            _pairs(t.BoundingBoxTopLeftHandCorner)[0] if t.get("BoundingBoxTopLeftHandCorner") is not None else None
            for t in item.get("TextObjectSequence") or []
        ]
        graphics = list(item.get("GraphicObjectSequence") or [])
        kind = TYPE_OF_LAYER.get(layer)
        found = []
        for g in graphics:
            points = _pairs(g.GraphicData)
            gtype = str(g.get("GraphicType") or "")
            if kind in ("arrow", "line", "ellipse"):
                t = kind
            elif gtype in ("ELLIPSE", "CIRCLE"):
                t = "ellipse"
            elif gtype == "POINT":
                t = "point"
            else:
                t = "line"
            if t == "ellipse" and gtype == "ELLIPSE" and len(points) == 4:
                points = _ellipse_points(points)
            found.append({"type": t, "points": points})
        if found:
            # The item's text labels its graphic (a line's length, an arrow's note).
            if texts:
                found[0]["text"] = " ".join(t for t in texts if t)
        else:
            found = [{"type": "text", "points": [a] if a else [], "text": t} for t, a in zip(texts, anchors)]
        for a in found:
            a["text"] = a.get("text", "")[:MAX_TEXT]
            if frame is not None:
                a["frame"] = frame
            try:
                annotations.append(check_annotation(a, len(annotations) + 1))
            except AnnotationError:
                # Another system's graphic (a point, a polyline of many points) that this viewer cannot draw.
                continue
    return OverlayView(str(ds.SOPInstanceUID), author, created, tuple(annotations))
