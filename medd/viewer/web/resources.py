"""What the reading room serves besides pages: its static files (CSS)."""
from __future__ import annotations

import re
from pathlib import Path

from twisted.web.static import File

from medd.webresource import NotFound

STATIC = Path(__file__).parent.parent / "static"


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
