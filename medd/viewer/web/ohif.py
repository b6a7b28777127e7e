"""OHIF Viewer 3 as the reading room's image viewer: its prebuilt app (npm
``@ohif/app``'s ``dist/``, installed by ``make ohif``) served as static files,
with the configuration medd writes.

The prebuilt bundle loads its chunks, workers, WebAssembly and assets from the
site's root (its webpack public path is ``/``), so they are served at their
own root names; the app's pages are under ``/ohif/`` (``routerBasename``),
behind the reading-room login. Its one data source is this viewer's own
DICOMweb (``/dicomweb``, same origin), which the browser reaches with the
session cookie.
"""
from __future__ import annotations

import base64
import hashlib
import html
import re
from pathlib import Path

from twisted.logger import Logger
from twisted.web.resource import Resource

from medd.viewer.web.errors import WebError
from medd.viewer.web.resources import StaticFiles
from medd.viewer.web.serving import RoomResource, serve
from medd.webresource import Response

log = Logger()

BASE = "/ohif"
# What the dist holds that the reading room serves itself (the page and the
# configuration) or not at all: the service worker would cache patient data
# and import Workbox from a CDN.
OWN_NAMES = frozenset({"index.html", "app-config.js", "sw.js", "init-service-worker.js", "serve.json", "_headers",
                       "_redirects", "silent-refresh.html", "oidc-client.min.js", "google.js"})
SERVICE_WORKER_TAG = re.compile(r'<script[^>]*src="/init-service-worker\.js"[^>]*></script>')
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)

# The data source: this viewer's DICOMweb, same origin (the browser sends the
# session cookie); thumbnails are rendered by the node, so that showing one is
# not "opening" an image; a patient banner in every viewport's corners.
APP_CONFIG = r"""/* Written by medd's viewer node: OHIF's configuration for this reading room. */
window.config = {
  name: 'medd',
  routerBasename: '/ohif',
  showStudyList: false,
  extensions: [],
  modes: [],
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'production',
  defaultDataSourceName: 'medd',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'medd',
      configuration: {
        friendlyName: 'medd viewer node',
        name: 'medd',
        wadoUriRoot: window.location.origin + '/dicomweb',
        qidoRoot: window.location.origin + '/dicomweb',
        wadoRoot: window.location.origin + '/dicomweb',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'thumbnail',
        thumbnailRequestStrategy: 'fetch',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
  customizationService: [
    {
      'viewportOverlay.topLeft': {
        $set: [
          { id: 'PatientName', inheritsFrom: 'ohif.overlayItem', label: '', title: 'Patient name',
            condition: ({ referenceInstance }) => referenceInstance && referenceInstance.PatientName,
            contentF: ({ referenceInstance, formatters: { formatPN } }) => formatPN(referenceInstance.PatientName) },
          { id: 'PatientID', inheritsFrom: 'ohif.overlayItem', label: 'ID: ', title: 'Patient ID',
            condition: ({ referenceInstance }) => referenceInstance && referenceInstance.PatientID,
            contentF: ({ referenceInstance }) => referenceInstance.PatientID },
          { id: 'PatientBirthDateSex', inheritsFrom: 'ohif.overlayItem', label: 'Born: ', title: 'Birth date and sex',
            condition: ({ referenceInstance }) => referenceInstance,
            contentF: ({ referenceInstance, formatters: { formatDate } }) =>
              (referenceInstance.PatientBirthDate ? formatDate(referenceInstance.PatientBirthDate) : '?') +
              ' · Sex: ' + (referenceInstance.PatientSex || '?') },
        ],
      },
      'viewportOverlay.topRight': {
        $set: [
          { id: 'StudyDate', inheritsFrom: 'ohif.overlayItem', label: 'Study: ', title: 'Study date',
            condition: ({ referenceInstance }) => referenceInstance && referenceInstance.StudyDate,
            contentF: ({ referenceInstance, formatters: { formatDate } }) => formatDate(referenceInstance.StudyDate) },
          { id: 'AccessionNumber', inheritsFrom: 'ohif.overlayItem', label: 'Acc: ', title: 'Accession number',
            condition: ({ referenceInstance }) => referenceInstance && referenceInstance.AccessionNumber,
            contentF: ({ referenceInstance }) => referenceInstance.AccessionNumber },
          { id: 'SeriesDescription', inheritsFrom: 'ohif.overlayItem', label: '', title: 'Series description',
            condition: ({ referenceInstance }) => referenceInstance && referenceInstance.SeriesDescription,
            contentF: ({ referenceInstance }) => referenceInstance.SeriesDescription },
        ],
      },
    },
  ],
};
"""


def default_dist() -> Path:
    """Where ``make ohif`` puts the app in a checkout: ``ohif/node_modules/@ohif/app/dist`` beside ``medd/``."""
    return Path(__file__).resolve().parents[3] / "ohif" / "node_modules" / "@ohif" / "app" / "dist"


def _hash(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii") + "'"


class OhifApp:
    """The installed app: its page (without the service worker), the page's policy, its asset names."""

    def __init__(self, dist: Path):
        self.dist = dist
        page = (dist / "index.html").read_text(encoding="utf-8")
        self.index = SERVICE_WORKER_TAG.sub("", page).encode("utf-8")
        hashes = " ".join(sorted({_hash(s) for s in INLINE_SCRIPT.findall(page)}))
        # OHIF needs WebAssembly (the codecs), workers (decoding), inline styles (its React components) and
        # blob: URLs (thumbnails); everything it fetches is this site's.
        self.content_security_policy = (
            f"default-src 'none'; script-src 'self' {hashes} 'wasm-unsafe-eval'; worker-src 'self' blob:; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
            "connect-src 'self' data: blob:; manifest-src 'self'; media-src 'self' blob:; "
            "form-action 'self'; base-uri 'self'; frame-ancestors 'self'"
        )

    def page_for(self, session) -> bytes:
        """The page with the reading room's idle lock (a same-origin script, so the policy's hashes stay those of
        OHIF's own inline scripts), told the session's CSRF token, user and idle time in its data attributes.
        Framed by the reading screen, the script hands the page's input to the screen's idle timer."""
        attrs = {"csrf": session.csrf, "idle-lock": f"{session.idle_lock:g}", "user": session.user}
        tag = '<script src="/static/idle-lock.js" defer="defer" ' + " ".join(
            f'data-{k}="{html.escape(v, quote=True)}"' for k, v in attrs.items()) + "></script>"
        return self.index.replace(b"</head>", tag.encode("utf-8") + b"</head>", 1)

    def asset_names(self) -> list[str]:
        return sorted(p.name for p in self.dist.iterdir() if p.name not in OWN_NAMES)


def load_app(dist: Path | None) -> OhifApp | None:
    """The app at ``dist`` (default: :func:`default_dist`), or None when it is not installed."""
    dist = dist or default_dist()
    if not (dist / "index.html").is_file():
        log.warn("OHIF is not installed at {dist} (run `make ohif`): the reading room shows no images", dist=str(dist))
        return None
    return OhifApp(dist)


def viewer_url(study_uid: str) -> str:
    """The reading room's link to a study in OHIF."""
    return f"{BASE}/viewer?StudyInstanceUIDs={study_uid}"


class OhifPage(RoomResource):
    """``/ohif/...``: OHIF's page for every route of the app, to a logged-in user."""

    isLeaf = True

    def __init__(self, room, app: OhifApp | None):
        super().__init__(room)
        self.app = app

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        if self.app is None:
            raise WebError(503, "the image viewer (OHIF) is not installed on this viewer node: run `make ohif`")
        # Framed by the reading screen (same origin, beside the report), by no other site.
        return Response(200, "text/html; charset=utf-8", self.app.page_for(session),
                        {"Content-Security-Policy": self.app.content_security_policy, "X-Frame-Options": "SAMEORIGIN"})


class AppConfig(Resource):
    """``/app-config.js``: the configuration above (no patient data; the page that loads it needs a session)."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader("Content-Type", "text/javascript; charset=utf-8")
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.setHeader("Cache-Control", "no-cache")
        return APP_CONFIG.encode("utf-8")


class OhifAssets(StaticFiles):
    """OHIF's code and assets (no patient data): any name, as the bundle asks for them, with the media types
    its loaders check (WebAssembly must be ``application/wasm``)."""

    contentTypes = {**StaticFiles.contentTypes, ".wasm": "application/wasm", ".mjs": "text/javascript; charset=utf-8", ".json": "application/json",
                    ".woff2": "font/woff2", ".ico": "image/x-icon", ".map": "application/json"}


def ohif_resources(room, app: OhifApp | None) -> dict[bytes, Resource]:
    """The resources OHIF needs, by first path segment."""
    out: dict[bytes, Resource] = {b"ohif": OhifPage(room, app), b"app-config.js": AppConfig()}
    if app is not None:
        for name in app.asset_names():
            out[name.encode("utf-8")] = OhifAssets(str(app.dist / name))
    return out
