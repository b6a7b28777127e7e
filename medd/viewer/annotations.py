"""The radiologist's annotations and the one check of them.

An annotation is in image pixel coordinates (x = column, y = row, sub-pixel,
the top-left corner of the image at 0,0, as DICOM's PIXEL units). As JSON,
as the browser sends it::

    {"type": "arrow",   "points": [[x_tail, y_tail], [x_head, y_head]]}
    {"type": "line",    "points": [[x0, y0], [x1, y1], ...]}        # a polyline, two points or more
    {"type": "ellipse", "points": [[x_left, y_top], [x_right, y_bottom]]}   # its bounding box, or
                        "points": four points: major-axis ends, then minor-axis ends (DICOM ELLIPSE)
    {"type": "text",    "points": [[x, y]], "text": "..."}

Every type may carry a ``"text"`` (a label; required for ``text``) and, on a
multi-frame image, ``"frame": n`` (from 1), the frame it was drawn on.

:func:`check_annotations` is used by the overlay API on what the browser
sends and by the GSPS builder on what it is given, so both refuse the same
things with the same messages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TYPES = ("arrow", "line", "ellipse", "text")
MAX_ANNOTATIONS = 500
MAX_TEXT = 1024  # a GSPS Unformatted Text Value is ST
MAX_LINE_POINTS = 1000

# type -> the point counts it may have, and how to say so
POINT_COUNTS = {
    "arrow": (lambda n: n == 2, "2 points (tail, head)"),
    "line": (lambda n: 2 <= n <= MAX_LINE_POINTS, f"2 to {MAX_LINE_POINTS} points"),
    "ellipse": (lambda n: n in (2, 4), "2 points (bounding-box corners) or 4 (axis end points)"),
    "text": (lambda n: n == 1, "1 point"),
}


class AnnotationError(ValueError):
    """An annotation that cannot be drawn as asked; the message says which and why."""


@dataclass(frozen=True)
class Annotation:
    """One checked annotation (see the module docstring); build it with :func:`check_annotation`."""

    type: str
    points: tuple[tuple[float, float], ...]
    text: str = ""
    frame: int | None = None

    def as_json(self) -> dict:
        out = {"type": self.type, "points": [list(p) for p in self.points]}
        if self.text:
            out["text"] = self.text
        if self.frame is not None:
            out["frame"] = self.frame
        return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_annotation(value, number: int = 1) -> Annotation:
    """An :class:`Annotation` from its JSON form (or an Annotation, checked again); ``number`` names it in errors."""
    if isinstance(value, Annotation):
        value = value.as_json()
    if not isinstance(value, dict):
        raise AnnotationError(f"annotation {number} is not an object")
    kind = value.get("type")
    if kind not in TYPES:
        raise AnnotationError(f"annotation {number}: type must be one of {', '.join(TYPES)}, not {kind!r}")
    points = value.get("points")
    if not isinstance(points, (list, tuple)):
        raise AnnotationError(f"annotation {number}: points must be a list of [x, y]")
    allowed, counts = POINT_COUNTS[kind]
    if not allowed(len(points)):
        article = "an" if kind[0] in "aeiou" else "a"
        raise AnnotationError(f"annotation {number}: {article} {kind} has {counts}, not {len(points)}")
    clean = []
    for p in points:
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(_number(c) for c in p):
            raise AnnotationError(f"annotation {number}: a point is [x, y] in image pixels (finite numbers), not {p!r}")
        clean.append((round(float(p[0]), 2), round(float(p[1]), 2)))
    text = value.get("text", "")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise AnnotationError(f"annotation {number}: text must be a string")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise AnnotationError(f"annotation {number}: the text is longer than {MAX_TEXT} characters")
    if kind == "text" and not text:
        raise AnnotationError(f"annotation {number}: a text annotation needs its text")
    frame = value.get("frame")
    if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool) or frame < 1):
        raise AnnotationError(f"annotation {number}: frame is a frame number from 1, not {frame!r}")
    return Annotation(kind, tuple(clean), text, frame)


def check_annotations(value) -> list[Annotation]:
    """The annotations of one overlay, checked: a list of 1 to ``MAX_ANNOTATIONS`` annotations."""
    if not isinstance(value, (list, tuple)):
        raise AnnotationError("the annotations must be a list")
    if not value:
        raise AnnotationError("there is nothing to save: draw an annotation first")
    if len(value) > MAX_ANNOTATIONS:
        raise AnnotationError(f"at most {MAX_ANNOTATIONS} annotations per overlay, not {len(value)}")
    return [check_annotation(a, n) for n, a in enumerate(value, 1)]
