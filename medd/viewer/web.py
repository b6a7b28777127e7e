"""The reading room: the radiologist's web UI, served by the viewer node.

Server-rendered pages (twisted.web.template, so every value is escaped)
over the viewer's :class:`~medd.viewer.reading.ReadingRoom`: login, the
worklist, a study with its series and report, and an image view whose
pixels are rendered to PNG on the server (:mod:`medd.viewer.rendering`, on
the node's blocking pool). Zoom, pan, frame scrolling and drawing run in the
browser (``static/reading-room.js``), with annotations kept in image pixel
coordinates.

Every page needs a session (an HttpOnly, SameSite=Strict cookie). Every
state-changing POST carries a CSRF token derived from the session, and a
POST whose ``Origin`` is another site is refused.

Annotations sent to :meth:`ReadingRoom.save_overlay` are dicts in image pixel
coordinates (x to the right, y down, origin at the top-left of the image)::

    {"type": "arrow",   "points": [[x_tail, y_tail], [x_head, y_head]]}
    {"type": "line",    "points": [[x1, y1], [x2, y2]]}
    {"type": "ellipse", "points": [[x_left, y_top], [x_right, y_bottom]]}   # its bounding box
    {"type": "text",    "points": [[x, y]], "text": "..."}

and, on a multi-frame image, ``"frame": n`` (from 1), the frame it was drawn on.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from datetime import date, datetime
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import File
from twisted.web.template import Tag, flattenString, tags

from medd.webresource import Response, read_body, write_response
from medd.viewer.rendering import FrameCache, ImageFacts, RenderError, describe, render_png

log = Logger()

STATIC = Path(__file__).with_name("static")
SESSION_COOKIE = b"medd_session"
LOGIN_COOKIE = b"medd_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
# DICOM UIDs: digits and dots, at most 64 characters (PS3.5 9.1).
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_FORM = 256 * 1024
MAX_REPORT = 64 * 1024
MAX_ANNOTATIONS = 500
ANNOTATION_POINTS = {"arrow": 2, "line": 2, "ellipse": 2, "text": 1}
THUMBNAIL = 160

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class WebError(Exception):
    """A request the reading room answers with an error page (or JSON for the API)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class NotLoggedIn(Exception):
    """No valid session: a page redirects to the login form, the API answers 401."""


def reading_room_resources(reading_room, api) -> dict[bytes, Resource]:
    """The reading room's resources, by first path segment, for the viewer's HTTP listener.

    ``reading_room`` is the viewer's :class:`ReadingRoom`; ``api`` provides
    ``run_blocking`` for the rendering work.
    """
    room = _Room(reading_room, api)
    return {
        b"": HomePage(room),
        b"login": LoginAction(room),
        b"logout": LogoutAction(room),
        b"worklist": WorklistPage(room),
        b"studies": StudiesResource(room),
        b"images": ImagesResource(room),
        b"static": StaticFiles(str(STATIC)),
    }


class _Room:
    """What every resource shares: the backend, the blocking pool, the frame cache."""

    def __init__(self, reading_room, api):
        self.reading_room = reading_room
        self.api = api
        self.frames = FrameCache()
        self._facts: dict[str, ImageFacts] = {}

    async def facts(self, uid: str) -> ImageFacts:
        facts = self._facts.get(uid)
        if facts is None:
            data = await self.instance_bytes(uid)
            try:
                facts = await self.api.run_blocking(describe, data)
            except RenderError as e:
                raise WebError(422, f"image {uid} cannot be shown: {e}") from e
            if len(self._facts) > 10_000:
                self._facts.clear()
            self._facts[uid] = facts
        return facts

    async def instance_bytes(self, uid: str) -> bytes:
        try:
            data = await self.reading_room.instance_bytes(uid)
        except (KeyError, LookupError, FileNotFoundError) as e:
            raise WebError(404, f"there is no image {uid} in this viewer") from e
        if data is None:
            raise WebError(404, f"there is no image {uid} in this viewer")
        return data


# --- sessions and CSRF -------------------------------------------------------------------------


def csrf_token(session: str) -> str:
    """The CSRF token of a session: derived from the session token, which only the browser and the node know."""
    return hmac.new(session.encode("utf-8"), b"medd reading room csrf", hashlib.sha256).hexdigest()


def _cookie(request, name: bytes) -> str | None:
    value = request.getCookie(name)
    return value.decode("ascii", "replace") if value else None


def _set_cookie(request, name: bytes, value: str, *, max_age: int | None = None) -> None:
    request.addCookie(name, value.encode("ascii"), path=b"/", httpOnly=True, sameSite="strict",
                      secure=request.isSecure() or None, max_age=None if max_age is None else str(max_age).encode())


def _check_origin(request) -> None:
    """Refuse a POST that a page on another site sent (SameSite cookies are the first line, this the second)."""
    origin = request.getHeader("origin")
    if not origin or origin == "null":
        return
    host = request.getHeader("host") or ""
    if urlsplit(origin).netloc.lower() != host.lower():
        raise WebError(403, "this form was sent from another site; open the reading room directly and try again")


class Session:
    def __init__(self, token: str, user: str):
        self.token = token
        self.user = user
        self.csrf = csrf_token(token)


async def session_of(room: _Room, request) -> Session:
    token = _cookie(request, SESSION_COOKIE)
    if not token:
        raise NotLoggedIn()
    user = await room.reading_room.user_for_session(token)
    if not user:
        raise NotLoggedIn()
    return Session(token, user)


def check_csrf(request, session: Session, form: dict[str, str] | None) -> None:
    _check_origin(request)
    sent = (form or {}).get(CSRF_FIELD) or request.getHeader(CSRF_HEADER) or ""
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf.encode("ascii")):
        raise WebError(403, "this form has expired or did not come from the reading room; reload the page and try again")


async def read_form(room: _Room, request) -> dict[str, str]:
    """The urlencoded body of a POST, read off the reactor (the site does not parse forms)."""
    content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise WebError(415, "this form must be sent as application/x-www-form-urlencoded")
    body = await room.api.run_blocking(read_body, request.content)
    if len(body) > MAX_FORM:
        raise WebError(413, "the form is too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as e:
        raise WebError(400, "the form is not UTF-8") from e
    return {k: v[0] for k, v in fields.items()}


# --- answering -----------------------------------------------------------------------------------


def _security_headers(request) -> None:
    request.setHeader("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader("X-Content-Type-Options", "nosniff")
    request.setHeader("X-Frame-Options", "DENY")
    request.setHeader("Referrer-Policy", "no-referrer")
    # Pages and images carry patient data: never in a shared cache or on disk.
    request.setHeader("Cache-Control", "no-store")


def serve(request, handler, *, api: bool = False):
    """Run ``await handler(request)``; errors become an error page, or JSON for the browser's API calls."""
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    async def run():
        try:
            response = await handler(request)
        except NotLoggedIn:
            if api:
                response = _json(401, {"error": "your session has ended; log in again"})
            elif request.method in (b"GET", b"HEAD"):
                response = redirect("/?" + urlencode({"next": request.uri.decode("latin-1")}))
            else:
                response = await error_page(401, "your session has ended; log in again", None)
        except WebError as e:
            log.warn("{method} {uri} refused with {status}: {message}", method=request.method.decode("latin-1"),
                     uri=request.uri.decode("latin-1", "replace"), status=e.status, message=e.message)
            if api:
                response = _json(e.status, {"error": e.message})
            else:
                response = await error_page(e.status, e.message, getattr(request, "medd_session", None))
        except Exception:
            log.failure("{method} {uri} failed", method=request.method.decode("latin-1"),
                        uri=request.uri.decode("latin-1", "replace"))
            message = "something went wrong in the viewer; the node's log has the details"
            response = _json(500, {"error": message}) if api else await error_page(500, message, None)
        if not gone:
            _security_headers(request)
            write_response(request, response)

    ensureDeferred(run())
    return NOT_DONE_YET


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, "text/plain; charset=utf-8", b"", {"Location": location})


def _json(status: int, value) -> Response:
    return Response(status, "application/json", json.dumps(value).encode("utf-8"))


def data(**values) -> dict[str, str]:
    """``data-*`` attributes for a tag (``study_uid`` -> ``data-study-uid``)."""
    return {"data-" + k.replace("_", "-"): v for k, v in values.items()}


async def html(status: int, tag: Tag) -> Response:
    body = await flattenString(None, tag)
    return Response(status, "text/html; charset=utf-8", b"<!DOCTYPE html>\n" + body)


def page(title: str, session: Session | None, *content, body_class: str = "") -> Tag:
    nav = []
    if session is not None:
        nav = tags.nav(
            tags.a("Worklist", href="/worklist"),
            tags.span(session.user, class_="user"),
            tags.form(
                tags.input(type="hidden", name=CSRF_FIELD, value=session.csrf),
                tags.button("Log out", type="submit", class_="link"),
                method="post", action="/logout", class_="logout",
            ),
        )
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.title(f"{title} · medd reading room"),
        tags.link(rel="icon", href="data:,"),  # no favicon request, no 404 in the log
        tags.link(rel="stylesheet", href="/static/reading-room.css"),
        tags.script(src="/static/reading-room.js", defer="defer"),
    )
    if session is not None:
        head(tags.meta(name="csrf-token", content=session.csrf))
    return tags.html(
        head,
        tags.body(
            tags.header(tags.a("medd reading room", href="/worklist" if session else "/", class_="brand"), nav),
            Tag("main")(*content),
            class_=body_class,
        ),
        lang="en",
    )


async def error_page(status: int, message: str, session: Session | None) -> Response:
    titles = {400: "Bad request", 401: "Not logged in", 403: "Refused", 404: "Not found", 413: "Too large",
              415: "Wrong form", 422: "Cannot show this image", 500: "Viewer error", 502: "Backend error"}
    title = titles.get(status, "Error")
    content = [tags.h1(title), tags.p(message, class_="error")]
    content.append(tags.p(tags.a("Back to the worklist", href="/worklist") if session else tags.a("Log in", href="/")))
    return await html(status, page(title, session, *content))


class _Resource(Resource):
    def __init__(self, room: _Room):
        super().__init__()
        self.room = room

    def getChild(self, path, request):
        return ErrorResource(404, "there is no such page in the reading room")


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, status: int, message: str):
        super().__init__()
        self.status, self.message = status, message

    def render(self, request):
        async def fail(request):
            raise WebError(self.status, self.message)

        return serve(request, fail)


# --- login, logout ---------------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    """A same-site path to go to after login, never another site."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/worklist"


async def login_form(request, *, status: int = 200, message: str | None = None, username: str = "",
                     next_path: str = "/worklist") -> Response:
    nonce = secrets.token_urlsafe(24)
    _set_cookie(request, LOGIN_COOKIE, nonce, max_age=3600)
    form = tags.form(
        tags.h1("Log in"),
        tags.p(message, class_="error", role="alert") if message else "",
        tags.label("User name", tags.input(name="username", id="username", autocomplete="username", required="required",
                                            value=username, autofocus="autofocus")),
        tags.label("Password", tags.input(name="password", id="password", type="password",
                                           autocomplete="current-password", required="required")),
        tags.input(type="hidden", name=CSRF_FIELD, value=nonce),
        tags.input(type="hidden", name="next", value=next_path),
        tags.button("Log in", type="submit"),
        method="post", action="/login", class_="login",
    )
    return await html(status, page("Log in", None, form, body_class="login-page"))


class HomePage(_Resource):
    """``/``: the login form, or the worklist for a logged-in user."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        next_path = _safe_next((request.args.get(b"next") or [b""])[0].decode("utf-8", "replace"))
        try:
            await session_of(self.room, request)
        except NotLoggedIn:
            return await login_form(request, next_path=next_path)
        return redirect(next_path)

    def render_POST(self, request):
        return LoginAction(self.room).render_POST(request)


class LoginAction(_Resource):
    """``POST /login``: check the password, start a session, set its cookie."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, lambda request: _async(redirect("/")))

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        _check_origin(request)
        form = await read_form(self.room, request)
        username = form.get("username", "").strip()
        next_path = _safe_next(form.get("next"))
        nonce = _cookie(request, LOGIN_COOKIE)
        if not nonce or not hmac.compare_digest(nonce.encode(), form.get(CSRF_FIELD, "").encode("utf-8", "replace")):
            return await login_form(request, status=403, username=username, next_path=next_path,
                                    message="The login form had expired or your browser did not send its cookie; "
                                            "please log in again (cookies must be enabled).")
        password = form.get("password", "")
        if not username or not password:
            return await login_form(request, status=400, username=username, next_path=next_path,
                                    message="Enter your user name and password.")
        if not await self.room.reading_room.check_password(username, password):
            log.warn("reading room login refused for {user}", user=username)
            return await login_form(request, status=401, username=username, next_path=next_path,
                                    message="Unknown user name or wrong password.")
        token = await self.room.reading_room.create_session(username)
        _set_cookie(request, SESSION_COOKIE, token)
        _set_cookie(request, LOGIN_COOKIE, "", max_age=0)
        log.info("reading room login: {user}", user=username)
        return redirect(next_path)


async def _async(value):
    return value


class LogoutAction(_Resource):
    """``POST /logout``: end the session."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        form = await read_form(self.room, request)
        try:
            session = await session_of(self.room, request)
        except NotLoggedIn:
            return redirect("/")
        check_csrf(request, session, form)
        await self.room.reading_room.end_session(session.token)
        _set_cookie(request, SESSION_COOKIE, "", max_age=0)
        return redirect("/")


# --- the worklist -----------------------------------------------------------------------------------


def _get(entry: dict, *names, default=None):
    for name in names:
        if name in entry and entry[name] is not None:
            return entry[name]
    return default


def _digits(value) -> str:
    if isinstance(value, (date, datetime)):
        return value.strftime("%Y%m%d")
    return re.sub(r"[^0-9]", "", str(value or ""))[:8]


def display_date(value) -> str:
    d = _digits(value)
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else str(value or "")


def modalities_of(entry: dict) -> list[str]:
    value = _get(entry, "modalities", "modalities_in_study", "modality", default=[])
    if isinstance(value, str):
        value = re.split(r"[\\,\s]+", value)
    return [str(m) for m in value if m]


def patient_name(value) -> str:
    # DICOM person names: family^given^middle^prefix^suffix.
    parts = [p for p in str(value or "").split("^") if p]
    if len(parts) >= 2:
        return f"{parts[0]}, {' '.join(parts[1:])}"
    return parts[0] if parts else ""


def worklist_filters(request) -> dict[str, str]:
    filters = {}
    for key in ("patient", "modality", "date_from", "date_to", "status"):
        value = (request.args.get(key.encode()) or [b""])[0].decode("utf-8", "replace").strip()
        if value:
            filters[key] = value
    return filters


def matches(entry: dict, filters: dict[str, str]) -> bool:
    """The worklist filters, applied here too so the page is right whatever the backend did with them."""
    patient = filters.get("patient", "").lower()
    if patient:
        text = " ".join(str(_get(entry, k, default="")) for k in ("patient_name", "patient_id")).lower()
        if patient not in text and patient not in patient_name(_get(entry, "patient_name", default="")).lower():
            return False
    modality = filters.get("modality", "").upper()
    if modality and modality not in [m.upper() for m in modalities_of(entry)]:
        return False
    study_date = _digits(_get(entry, "study_date", default=""))
    if filters.get("date_from") and (not study_date or study_date < _digits(filters["date_from"])):
        return False
    if filters.get("date_to") and (not study_date or study_date > _digits(filters["date_to"])):
        return False
    status = filters.get("status")
    if status in ("unread", "read") and is_unread(entry) != (status == "unread"):
        return False
    return True


def backend_filters(filters: dict[str, str], user: str) -> dict[str, str]:
    """The worklist filters as :func:`medd.viewer.inbox.worklist` takes them (a DICOM date range, the user)."""
    out = {k: v for k, v in filters.items() if k in ("patient", "modality", "status")}
    if "modality" in out:
        out["modality"] = out["modality"].upper()
    low, high = _digits(filters.get("date_from", "")), _digits(filters.get("date_to", ""))
    if low or high:
        out["study_date"] = f"{low}-{high}"
    out["user"] = user
    return out


def is_unread(entry: dict) -> bool:
    if "unread" in entry:
        return bool(entry["unread"])
    if "read" in entry:
        return not entry["read"]
    return False


class WorklistPage(_Resource):
    """``/worklist``: the studies in this viewer, filterable by patient, modality, study date and read status."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await session_of(self.room, request)
        request.medd_session = session
        filters = worklist_filters(request)
        for key in ("date_from", "date_to"):
            if key in filters and len(_digits(filters[key])) != 8:
                raise WebError(400, f"{key.replace('_', ' ')} must be a date (YYYY-MM-DD), not {filters[key]!r}")
        studies = await self.room.reading_room.worklist(backend_filters(filters, session.user))
        studies = [s for s in studies if matches(s, filters)]
        studies.sort(key=lambda s: (_digits(_get(s, "study_date", default="")), str(_get(s, "study_time", default=""))),
                     reverse=True)
        all_modalities = sorted({m for s in await self.room.reading_room.worklist({"user": session.user})
                                 for m in modalities_of(s)}
                                | ({filters["modality"].upper()} if "modality" in filters else set()))
        return await html(200, page("Worklist", session, self._filter_form(filters, all_modalities),
                                    self._table(studies, filters)))

    @staticmethod
    def _filter_form(filters: dict, modalities: list[str]) -> Tag:
        def option(value, label, current):
            o = tags.option(label, value=value)
            if value == current:
                o(selected="selected")
            return o

        modality = tags.select(option("", "any", filters.get("modality", "").upper()), name="modality", id="f-modality")
        for m in modalities:
            modality(option(m, m, filters.get("modality", "").upper()))
        status = tags.select(*[option(v, label, filters.get("status", "")) for v, label in
                               (("", "all"), ("unread", "unread"), ("read", "read"))], name="status", id="f-status")
        return tags.form(
            tags.label("Patient", tags.input(name="patient", id="f-patient", value=filters.get("patient", ""),
                                             placeholder="name or ID", type="search")),
            tags.label("Modality", modality),
            tags.label("From", tags.input(name="date_from", id="f-date-from", type="date",
                                          value=display_date(filters.get("date_from", "")))),
            tags.label("To", tags.input(name="date_to", id="f-date-to", type="date",
                                        value=display_date(filters.get("date_to", "")))),
            tags.label("Status", status),
            tags.button("Filter", type="submit"),
            tags.a("Clear", href="/worklist", class_="button secondary"),
            method="get", action="/worklist", class_="filters",
        )

    @staticmethod
    def _table(studies: list[dict], filters: dict) -> Tag:
        if not studies:
            text = "No studies match these filters." if filters else "No studies have arrived in this viewer yet."
            return tags.p(text, class_="empty", id="worklist-empty")
        header = tags.tr(*[tags.th(h) for h in ("", "Patient", "Patient ID", "Study date", "Description", "Modality",
                                                "Centre", "Images", "Report")])
        rows = []
        for s in studies:
            uid = str(_get(s, "study_uid", "study_instance_uid", default=""))
            unread = is_unread(s)
            has_report = bool(_get(s, "has_report", "reported", default=False))
            link = f"/studies/{quote(uid)}"
            rows.append(tags.tr(
                tags.td(tags.span("unread" if unread else "read", class_="badge unread" if unread else "badge read")),
                tags.td(tags.a(patient_name(_get(s, "patient_name", default="")) or "(no name)", href=link)),
                tags.td(str(_get(s, "patient_id", default=""))),
                tags.td(display_date(_get(s, "study_date", default=""))),
                tags.td(str(_get(s, "study_description", "description", default=""))),
                tags.td(", ".join(modalities_of(s))),
                tags.td(str(_get(s, "centre", "origin", "imaging_centre", default=""))),
                tags.td(str(_get(s, "images", "number_of_images", "instances", "image_count", default="")), class_="num"),
                tags.td("✓ reported" if has_report else "—", class_="has-report" if has_report else "no-report"),
                class_="study unread" if unread else "study", **data(study_uid=uid),
            ))
        return tags.table(tags.thead(header), tags.tbody(*rows), class_="worklist", id="worklist")


# --- a study -----------------------------------------------------------------------------------------


def _uid_child(path: bytes) -> str | None:
    try:
        uid = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    return uid if len(uid) <= 64 and UID.match(uid) else None


class StudiesResource(_Resource):
    def getChild(self, path, request):
        uid = _uid_child(path)
        if uid is None:
            return ErrorResource(404, "that is not a study UID")
        return StudyPage(self.room, uid)


class StudyPage(_Resource):
    """``/studies/{uid}``: the study's series with their images, its reports and the report form."""

    def __init__(self, room, uid):
        super().__init__(room)
        self.uid = uid

    def getChild(self, path, request):
        if path == b"report" and not request.postpath:
            return ReportAction(self.room, self.uid)
        if path == b"" and not request.postpath:
            return self
        return super().getChild(path, request)

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await session_of(self.room, request)
        request.medd_session = session
        try:
            study = await self.room.reading_room.study(self.uid, session.user)
        except (KeyError, LookupError) as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        if not study:
            raise WebError(404, f"there is no study {self.uid} in this viewer")
        reports = await self.room.reading_room.reports(self.uid)
        saved = (request.args.get(b"saved") or [b""])[0].decode("ascii", "replace")
        name = patient_name(_get(study, "patient_name", default=""))
        summary = tags.dl(
            tags.dt("Patient"), tags.dd(name or "(no name)", class_="patient"),
            tags.dt("Patient ID"), tags.dd(str(_get(study, "patient_id", default=""))),
            tags.dt("Study date"), tags.dd(display_date(_get(study, "study_date", default=""))),
            tags.dt("Description"), tags.dd(str(_get(study, "study_description", "description", default=""))),
            tags.dt("Centre"), tags.dd(str(_get(study, "centre", "origin", default=""))),
            tags.dt("Study UID"), tags.dd(self.uid, class_="uid"),
            class_="summary",
        )
        series_sections = [self._series(series) for series in _get(study, "series", default=[])]
        if not series_sections:
            series_sections = [tags.p("This study has no images in this viewer.", class_="empty")]
        report_section = self._reports(session, reports, saved)
        return await html(200, page(f"Study of {name or self.uid}", session,
                                    tags.h1("Study ", tags.span(name, class_="patient")), summary,
                                    tags.div(tags.section(tags.h2("Series"), *series_sections, class_="series-list"),
                                             report_section, class_="study-layout")))

    @staticmethod
    def _series(series: dict) -> Tag:
        instances = sorted(_get(series, "instances", default=[]),
                           key=lambda i: (_int(_get(i, "instance_number", default=0)), str(_get(i, "uid", default=""))))
        title = " · ".join(x for x in (
            str(_get(series, "modality", default="")),
            f"Series {_get(series, 'series_number', default='')}".strip() if _get(series, "series_number") else "",
            str(_get(series, "series_description", "description", default="")),
            f"{len(instances)} image(s)",
        ) if x)
        cards = []
        for i in instances:
            uid = str(_get(i, "uid", "sop_instance_uid", default=""))
            frames = _int(_get(i, "frames", "number_of_frames", default=1)) or 1
            caption = [f"#{_get(i, 'instance_number', default='?')}",
                       f"{_get(i, 'columns', default='?')}×{_get(i, 'rows', default='?')}"]
            if frames > 1:
                caption.append(f"{frames} frames")
            if _get(i, "overlays", default=0):
                caption.append("overlay")
            cards.append(tags.li(tags.a(
                tags.img(src=f"/images/{quote(uid)}/render.png?size={THUMBNAIL}", alt=f"image {caption[0]}",
                         loading="lazy", width=str(THUMBNAIL), height=str(THUMBNAIL)),
                tags.span(" · ".join(caption), class_="caption"),
                href=f"/images/{quote(uid)}", class_="thumbnail opened" if _get(i, "opened") else "thumbnail",
                **data(uid=uid),
                title=str(_get(i, "transfer_syntax", default="")),
            )))
        return tags.section(tags.h3(title), tags.ul(*cards, class_="thumbnails"), class_="series")

    def _reports(self, session: Session, reports: list[dict], saved: str) -> Tag:
        items = []
        for r in reports:
            items.append(tags.li(
                tags.div(tags.strong(str(_get(r, "author", "user", default=""))), " · ",
                         tags.time(_when(_get(r, "time", "created", "created_at", default=""))),
                         " · signed" if _get(r, "verified", "signed", default=False) else "", class_="meta"),
                tags.pre(str(_get(r, "text", default="")), class_="report-text"),
                class_="report",
            ))
        # A new report starts from the latest one: an addendum is an edit of it, signed again.
        draft = str(_get(reports[-1], "text", default="")) if reports else ""
        notice = ""
        if saved:
            notice = tags.p("Report signed and sent to central.", class_="notice", role="status", id="report-saved")
        return tags.section(
            tags.h2("Report"),
            notice,
            tags.ol(*items, class_="reports", id="reports") if items else tags.p("No report yet.", class_="empty"),
            tags.form(
                tags.input(type="hidden", name=CSRF_FIELD, value=session.csrf),
                tags.label("Report text", tags.textarea(draft, name="text", id="report-text", rows="12",
                                                        required="required", maxlength=str(MAX_REPORT))),
                tags.div(
                    tags.span("Saving signs the report with your name and sends it to central.", class_="hint"),
                    tags.button("Save and sign", type="submit", name="action", value="sign", id="report-sign"),
                    class_="buttons",
                ),
                method="post", action=f"/studies/{quote(self.uid)}/report", class_="report-form",
            ),
            class_="report-panel",
        )


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _when(value) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value or "")[:19].replace("T", " ")


class ReportAction(_Resource):
    """``POST /studies/{uid}/report``: save the study's report, signed by the user (a Basic Text SR, sent to central)."""

    isLeaf = True

    def __init__(self, room, uid):
        super().__init__(room)
        self.uid = uid

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        form = await read_form(self.room, request)
        session = await session_of(self.room, request)
        request.medd_session = session
        check_csrf(request, session, form)
        text = form.get("text", "").replace("\r\n", "\n").strip()
        if not text:
            raise WebError(400, "the report is empty; write the report before saving it")
        if len(text) > MAX_REPORT:
            raise WebError(413, f"the report is longer than {MAX_REPORT} characters")
        try:
            report_uid = await self.room.reading_room.save_report(self.uid, session.user, text)
        except (KeyError, LookupError) as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        except ValueError as e:  # the backend's ReportError
            raise WebError(400, f"the report was refused: {e}") from e
        log.info("report {report} on study {study} signed by {user}", report=report_uid, study=self.uid,
                 user=session.user)
        return redirect(f"/studies/{quote(self.uid)}?saved=signed#report-saved")


# --- an image ---------------------------------------------------------------------------------------


class ImagesResource(_Resource):
    def getChild(self, path, request):
        uid = _uid_child(path)
        if uid is None:
            return ErrorResource(404, "that is not an image UID")
        return ImagePage(self.room, uid)


class ImagePage(_Resource):
    """``/images/{uid}``: the image view; ``render.png`` and ``overlays`` below it."""

    def __init__(self, room, uid):
        super().__init__(room)
        self.uid = uid

    def getChild(self, path, request):
        if request.postpath:
            return super().getChild(path, request)
        if path == b"render.png":
            return RenderedImage(self.room, self.uid)
        if path == b"overlays":
            return OverlaysResource(self.room, self.uid)
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await session_of(self.room, request)
        request.medd_session = session
        facts = await self.room.facts(self.uid)
        header = await self.room.reading_room.header(self.uid)
        overlays = await self.room.reading_room.overlays(self.uid)
        try:
            await self.room.reading_room.opened(self.uid, session.user)
        except Exception:
            # The radiologist still sees the image; the status message is the backend's to retry.
            log.failure("recording that {user} opened {uid} failed", user=session.user, uid=self.uid)
        annotations = flatten_overlays(overlays)
        spacing = facts.pixel_spacing
        frame_controls = ""
        if facts.frames > 1:
            frame_controls = tags.div(
                tags.button("◀", type="button", id="frame-prev", title="Previous frame (wheel up, ←)"),
                tags.input(type="range", id="frame-slider", min="1", max=str(facts.frames), value="1"),
                tags.button("▶", type="button", id="frame-next", title="Next frame (wheel down, →)"),
                tags.output("1 / ", str(facts.frames), id="frame-label"),
                class_="group frames",
            )
        tools = tags.div(
            *[tags.button(label, type="button", class_="tool", **data(tool=tool), id=f"tool-{tool}", title=tip)
              for tool, label, tip in (
                  ("pan", "Pan", "Drag to move the image"),
                  ("arrow", "Arrow", "Drag from the tail to the point of the arrow"),
                  ("line", "Line", "Drag to measure" + (" (mm)" if spacing else " (pixels: no pixel spacing)")),
                  ("ellipse", "Ellipse", "Drag the bounding box of the ellipse"),
                  ("text", "Text", "Click where the text goes"),
              )],
            tags.input(type="text", id="annotation-text", placeholder="text to place", maxlength="200"),
            class_="group tools",
        )
        window = tags.div(
            tags.label("WC", tags.input(type="number", id="wc", step="any", value=_num(facts.window_center))),
            tags.label("WW", tags.input(type="number", id="ww", step="any", min="1", value=_num(facts.window_width))),
            tags.select(
                tags.option("Preset…", value=""),
                tags.option("Default", value="default"),
                *[tags.option(name, value=f"{c},{w}") for name, c, w in
                  (("Soft tissue", 40, 400), ("Lung", -600, 1500), ("Bone", 300, 1500), ("Brain", 40, 80))],
                id="wl-preset",
            ),
            tags.button("Apply", type="button", id="wl-apply"),
            class_="group window",
        ) if facts.samples_per_pixel == 1 else ""
        toolbar = tags.div(
            tools,
            tags.div(tags.button("−", type="button", id="zoom-out", title="Zoom out (ctrl+wheel)"),
                     tags.output("100%", id="zoom-label"),
                     tags.button("+", type="button", id="zoom-in", title="Zoom in (ctrl+wheel)"),
                     tags.button("Fit", type="button", id="zoom-fit"),
                     class_="group zoom"),
            window,
            frame_controls,
            tags.div(tags.button("Undo", type="button", id="undo"),
                     tags.button("Save overlay", type="button", id="save-overlay"),
                     tags.output("", id="overlay-status", role="status"),
                     class_="group save"),
            class_="toolbar",
        )
        viewport = tags.div(
            tags.div(
                tags.img(id="image", alt="image", src=f"/images/{quote(self.uid)}/render.png",
                         width=str(facts.columns), height=str(facts.rows), draggable="false"),
                Tag("svg")(id="overlay", viewBox=f"0 0 {facts.columns} {facts.rows}",
                         width=str(facts.columns), height=str(facts.rows), xmlns="http://www.w3.org/2000/svg"),
                id="stage",
            ),
            id="viewport",
            **data(uid=self.uid, rows=str(facts.rows), columns=str(facts.columns), frames=str(facts.frames),
                   spacing=",".join(f"{v:g}" for v in spacing) if spacing else "",
                   wc=_num(facts.window_center), ww=_num(facts.window_width), overlays=json.dumps(annotations)),
        )
        back = f"/studies/{quote(facts.study_uid)}" if facts.study_uid else "/worklist"
        info = tags.p(
            tags.a("← Study", href=back), " · ",
            f"{facts.modality} · {facts.columns}×{facts.rows}",
            f" · {facts.frames} frames" if facts.frames > 1 else "",
            f" · pixel spacing {spacing[0]:g}×{spacing[1]:g} mm" if spacing else " · no pixel spacing",
            f" · {facts.photometric}",
            class_="image-info",
        )
        rows = [tags.tr(tags.td(str(t), class_="tag"), tags.td(str(k)), tags.td(str(vr)), tags.td(str(v)))
                for t, k, vr, v in header]
        header_table = tags.details(
            tags.summary(f"DICOM header ({len(rows)} elements)"),
            tags.table(tags.thead(tags.tr(tags.th("Tag"), tags.th("Keyword"), tags.th("VR"), tags.th("Value"))),
                       tags.tbody(*rows), class_="header-table", id="header-table"),
            id="header",
        )
        return await html(200, page("Image", session, info, toolbar, viewport, header_table, body_class="image-page"))


def _num(value) -> str:
    return "" if value is None else f"{value:g}"


def flatten_overlays(overlays) -> list[dict]:
    """Saved annotations as one list, whether the backend returns overlays (with ``annotations``) or annotations."""
    out = []
    for item in overlays or []:
        if isinstance(item, dict) and isinstance(item.get("annotations"), list):
            out.extend(a for a in item["annotations"] if isinstance(a, dict))
        elif isinstance(item, dict) and "type" in item:
            out.append(item)
    return out


def _query_float(request, name: str) -> float | None:
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


class RenderedImage(_Resource):
    """``/images/{uid}/render.png?frame=1&wc=&ww=&size=``: one frame as a PNG, rendered off the reactor."""

    isLeaf = True

    def __init__(self, room, uid):
        super().__init__(room)
        self.uid = uid

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        await session_of(self.room, request)
        frame = _query_float(request, "frame")
        frame = 1 if frame is None else frame
        if frame != int(frame) or frame < 1:
            raise WebError(400, f"frame is a frame number from 1, not {frame:g}")
        center, width = _query_float(request, "wc"), _query_float(request, "ww")
        if (center is None) != (width is None):
            raise WebError(400, "give both wc and ww, or neither")
        size = _query_float(request, "size")
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


def check_annotations(value) -> list[dict]:
    """The annotations of a save request, checked and normalised, or a 400 naming what is wrong."""
    if not isinstance(value, dict) or not isinstance(value.get("annotations"), list):
        raise WebError(400, 'send {"annotations": [...]}')
    annotations = value["annotations"]
    if not annotations:
        raise WebError(400, "there is nothing to save: draw an annotation first")
    if len(annotations) > MAX_ANNOTATIONS:
        raise WebError(400, f"at most {MAX_ANNOTATIONS} annotations per overlay")
    out = []
    for n, a in enumerate(annotations, 1):
        kind = a.get("type") if isinstance(a, dict) else None
        if kind not in ANNOTATION_POINTS:
            raise WebError(400, f"annotation {n}: type must be one of {', '.join(ANNOTATION_POINTS)}")
        points = a.get("points")
        if not isinstance(points, list) or len(points) != ANNOTATION_POINTS[kind]:
            raise WebError(400, f"annotation {n}: a {kind} has {ANNOTATION_POINTS[kind]} point(s)")
        clean = []
        for p in points:
            if (not isinstance(p, list) or len(p) != 2
                    or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in p)):
                raise WebError(400, f"annotation {n}: a point is [x, y] in image pixels")
            clean.append([round(float(p[0]), 2), round(float(p[1]), 2)])
        item = {"type": kind, "points": clean}
        if "frame" in a:
            frame = a["frame"]
            if not isinstance(frame, int) or isinstance(frame, bool) or frame < 1:
                raise WebError(400, f"annotation {n}: frame is a frame number from 1")
            item["frame"] = frame
        if kind == "text":
            text = a.get("text")
            if not isinstance(text, str) or not text.strip():
                raise WebError(400, f"annotation {n}: a text annotation needs its text")
            item["text"] = text.strip()[:1000]
        out.append(item)
    return out


class OverlaysResource(_Resource):
    """``GET|POST /images/{uid}/overlays``: the saved annotations; save new ones as an overlay (JSON)."""

    isLeaf = True

    def __init__(self, room, uid):
        super().__init__(room)
        self.uid = uid

    def render_GET(self, request):
        return serve(request, self._get, api=True)

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _get(self, request) -> Response:
        await session_of(self.room, request)
        return _json(200, {"annotations": flatten_overlays(await self.room.reading_room.overlays(self.uid))})

    async def _post(self, request) -> Response:
        session = await session_of(self.room, request)
        check_csrf(request, session, None)
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise WebError(415, "annotations are sent as application/json")
        body = await self.room.api.run_blocking(read_body, request.content)
        try:
            value = json.loads(body or b"null")
        except ValueError as e:
            raise WebError(400, f"the request is not JSON: {e}") from e
        annotations = check_annotations(value)
        await self.room.facts(self.uid)  # a 404 for an image this viewer does not have
        try:
            overlay_uid = await self.room.reading_room.save_overlay(self.uid, session.user, annotations)
        except (KeyError, LookupError) as e:
            raise WebError(404, f"there is no image {self.uid} in this viewer") from e
        except ValueError as e:
            raise WebError(400, f"the overlay was refused: {e}") from e
        log.info("overlay {overlay} on {uid} saved by {user}", overlay=overlay_uid, uid=self.uid, user=session.user)
        return _json(201, {"uid": overlay_uid, "annotations": len(annotations)})


# --- static files -------------------------------------------------------------------------------------


class StaticFiles(File):
    """The reading room's CSS and JavaScript, with their media types and no directory listings."""

    contentTypes = {**File.contentTypes, ".js": "text/javascript; charset=utf-8",
                    ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

    def directoryListing(self):
        return ErrorResource(404, "there is no such file")

    def createSimilarFile(self, path):
        f = super().createSimilarFile(path)
        f.contentTypes = self.contentTypes
        return f

    def render_GET(self, request):
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.setHeader("Cache-Control", "no-cache")
        return super().render_GET(request)
