"""What the reading room serves besides pages: an image's frames rendered to
PNG (off the reactor, :mod:`medd.viewer.rendering`) and the static CSS and
JavaScript."""
from __future__ import annotations

import math
import re
from pathlib import Path

from twisted.web.static import File

from medd.rendering import RenderError, render_png
from medd.viewer.web.errors import WebError
from medd.viewer.web.serving import UidResource, serve
from medd.webresource import NotFound, Response

STATIC = Path(__file__).parent.parent / "static"


def query_float(request, name: str) -> float | None:
    raw = (request.args.get(name.encode()) or [b""])[0].decode("ascii", "replace").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise WebError(400, f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise WebError(400, f"{name} must be a finite number")
    return value


class RenderedImage(UidResource):
    """``/images/{uid}/render.png?frame=1&wc=&ww=&size=``: one frame as a PNG, rendered off the reactor."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        await self.room.session(request)
        frame = query_float(request, "frame")
        frame = 1 if frame is None else frame
        if frame != int(frame) or frame < 1:
            raise WebError(400, f"frame is a frame number from 1, not {frame:g}")
        center, width = query_float(request, "wc"), query_float(request, "ww")
        if (center is None) != (width is None):
            raise WebError(400, "give both wc and ww, or neither")
        size = query_float(request, "size")
        if size is not None and not 16 <= size <= 4096:
            raise WebError(400, "size must be between 16 and 4096")
        key = (self.uid, int(frame) - 1)
        data = None if key in self.room.frames else await self.room.instance_bytes(self.uid)
        try:
            png = await self.room.api.run_blocking(
                lambda: render_png(data, frame=int(frame) - 1, center=center, width=width,
                                   max_size=int(size) if size else None, cache=self.room.frames, cache_key=self.uid))
        except RenderError as e:
            raise WebError(422, f"image {self.uid} cannot be rendered: {e}") from e
        return Response(200, "image/png", png)


# The reading room's own asset names; anything else (a NUL byte, "..", bytes that are not UTF-8) names no file
# and never reaches the file system.
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StaticFiles(File):
    """The reading room's CSS and JavaScript, with their media types and no directory listings.

    A name that is no asset is a 404 problem document: the browser never shows it as a page.
    """

    contentTypes = {**File.contentTypes, ".js": "text/javascript; charset=utf-8",
                    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
    childNotFound = NotFound()

    def getChild(self, path, request):
        if path and not STATIC_NAME.match(path.decode("ascii", "replace")):
            return self.childNotFound
        return super().getChild(path, request)

    def directoryListing(self):
        return self.childNotFound

    def createSimilarFile(self, path):
        f = super().createSimilarFile(path)
        f.contentTypes = self.contentTypes
        return f

    def render_GET(self, request):
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.setHeader("Cache-Control", "no-cache")
        return super().render_GET(request)
