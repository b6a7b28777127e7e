"""Server-side rendering of stored DICOM images: the JPEG thumbnails of
DICOMweb (``.../thumbnail``). The reading room's images are shown by OHIF,
which decodes the frames in the browser; only thumbnails are rendered here.

Decoding goes through pydicom's pixel handlers (pylibjpeg and its plugins
for JPEG, JPEG 2000 and RLE); nothing here is a codec. Everything in this
module is blocking CPU work and runs on a thread pool, never on the reactor.
"""
from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array



class RenderError(Exception):
    """The image cannot be rendered as asked (bad frame, bad window, no pixels, unsupported)."""


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def number_of_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _read(data: bytes):
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except Exception as e:
        raise RenderError(f"the stored object cannot be read as DICOM: {e}") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise RenderError("the stored object has no pixel data")
    return ds


@dataclass(frozen=True)
class _Meta:
    """What rendering needs of the dataset once a frame is decoded (the cache keeps this, not the pixel data)."""

    photometric: str
    bits_stored: int
    window_center: float | None
    window_width: float | None

    @classmethod
    def of(cls, ds) -> "_Meta":
        return cls(str(ds.get("PhotometricInterpretation", "")).upper(), int(ds.get("BitsStored", 8) or 8),
                   _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth")))


def _decode(ds, frame: int) -> np.ndarray:
    """One frame as an array: grayscale after the modality LUT (float), or RGB."""
    frames = number_of_frames(ds)
    if not 0 <= frame < frames:
        raise RenderError(f"frame {frame + 1} does not exist; the image has {frames} frame(s)")
    try:
        # pydicom converts YBR to RGB; with index= only the asked frame is decoded.
        array = pixel_array(ds, index=frame) if frames > 1 else ds.pixel_array
    except Exception as e:
        raise RenderError(
            f"the pixel data ({ds.file_meta.get('TransferSyntaxUID', 'unknown transfer syntax')}) cannot be decoded: {e}"
        ) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return apply_color_lut(array, ds)
    if array.ndim == 3:  # RGB (rows, columns, 3)
        return array
    return apply_modality_lut(array, ds).astype(np.float32, copy=False)


def _minmax_window(array: np.ndarray) -> tuple[float, float]:
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    width = max(high - low, 1.0)
    return low + width / 2, width


def _window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2) onto 0..255."""
    if width < 1:
        raise RenderError(f"window width must be at least 1, not {width:g}")
    out = ((array.astype(np.float32) - (center - 0.5)) / max(width - 1, 1) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def render_thumbnail(data: bytes, max_size: int) -> bytes:
    """Blocking: the first frame of a stored Part 10 image as a JPEG no larger than ``max_size`` square."""
    out = BytesIO()
    image = render_image(data, max_size=max_size)
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def render_image(data: bytes, *, frame: int = 0, center: float | None = None, width: float | None = None,
                 max_size: int | None = None):
    """Blocking: frame ``frame`` (0-based) of a stored Part 10 image as a PIL image.

    Grayscale images use the given window, else the object's own
    WindowCenter/Width, else the frame's min/max; MONOCHROME1 is inverted
    so that it displays as the modality meant. Colour images are shown as
    they are unless a window is given. ``max_size`` scales the PNG down to
    fit a square of that many pixels (thumbnails).
    """
    from PIL import Image

    ds = _read(data)
    array = _decode(ds, frame)
    meta = _Meta.of(ds)
    if array.ndim == 3:
        if array.dtype != np.uint8:
            bits = meta.bits_stored
            array = (array.astype(np.float32) * (255.0 / max((1 << bits) - 1, 1)))
        if center is not None and width is not None:
            pixels = _window(array, center, width)
        else:
            pixels = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    else:
        if center is None or width is None:
            own_center, own_width = meta.window_center, meta.window_width
            if own_center is not None and own_width and own_width >= 1:
                center, width = (own_center if center is None else center), (own_width if width is None else width)
            else:
                auto_center, auto_width = _minmax_window(array)
                center, width = (auto_center if center is None else center), (auto_width if width is None else width)
        pixels = _window(array, center, width)
        if meta.photometric == "MONOCHROME1":
            pixels = 255 - pixels
        image = Image.fromarray(np.ascontiguousarray(pixels), "L")
    if max_size:
        image.thumbnail((max_size, max_size))
    return image
