"""The reading room's HTML pages: login and logout, the worklist, and a
study with its series and reports (and the report form). The images are
shown by OHIF (:mod:`.ohif`); each study links to it.

Every GET here only reads.
"""
from __future__ import annotations

import hmac
import math
import re
import secrets
import unicodedata
from urllib.parse import quote, unquote, urlencode, urlsplit

from twisted.logger import Logger
from twisted.web.template import Tag, tags

from medd.viewer.contract import ReportView, SeriesView, StudyRow, UnknownObject, WorklistPage, WorklistQuery
from medd.viewer.reports import ReportError
from medd.viewer.web.errors import NotLoggedIn, WebError
from medd.viewer.web.layout import data, html, page
from medd.viewer.web.measurements import WithdrawMeasurements
from medd.viewer.web.ohif import viewer_url
from medd.viewer.web.serving import ErrorResource, RoomResource, UidResource, redirect, serve, uid_child
from medd.viewer.web.session import (CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, Session, check_csrf, check_origin,
                                     get_cookie, read_form, session_of, set_cookie)
from medd.webresource import PROBLEM_JSON, Problem, Response, client_ip

log = Logger()

MAX_REPORT = 64 * 1024
THUMBNAIL = 160
PAGE_SIZE = 100


# --- display ---------------------------------------------------------------------------------------


def _digits(value: str | None) -> str:
    return re.sub(r"[^0-9]", "", value or "")[:8]


def display_date(value: str | None) -> str:
    d = _digits(value)
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else (value or "")


def patient_name(value: str | None) -> str:
    # DICOM person names: family^given^middle^prefix^suffix.
    parts = [p for p in (value or "").split("^") if p]
    if len(parts) >= 2:
        return f"{parts[0]}, {' '.join(parts[1:])}"
    return parts[0] if parts else ""


def _text(value) -> str:
    return "" if value is None else str(value)


# --- login, logout ---------------------------------------------------------------------------------


MAX_NEXT = 2048


def _is_local_path(value: str) -> bool:
    """True for a path on this site: one leading ``/``, no backslash, no control or space characters, no scheme.

    Browsers drop tabs and newlines from a URL and read ``\\`` as ``/``, so ``/\t/evil`` and ``/\\evil`` are
    ``//evil``: another host.
    """
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return False
    if any(c.isspace() or unicodedata.category(c)[0] == "C" for c in value):
        return False
    parts = urlsplit(value)
    return not parts.scheme and not parts.netloc


def _safe_next(value: str | None) -> str:
    """A same-site path to go to after login (checked as sent and percent-decoded), otherwise the worklist."""
    if not value or len(value) > MAX_NEXT:
        return "/worklist"
    decoded = value
    for _ in range(3):  # what a proxy or a browser might decode again
        if not _is_local_path(decoded):
            return "/worklist"
        decoded, before = unquote(decoded), decoded
        if decoded == before:
            return value
    return "/worklist"


async def login_form(request, *, status: int = 200, message: str | None = None, username: str = "",
                     next_path: str = "/worklist") -> Response:
    nonce = secrets.token_urlsafe(24)
    set_cookie(request, LOGIN_COOKIE, nonce, max_age=3600)
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


class HomePage(RoomResource):
    """``/``: the login form, or the worklist for a logged-in user."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        next_path = _safe_next((request.args.get(b"next") or [b""])[0].decode("utf-8", "replace"))
        try:
            await session_of(self.room.reading_room, request)
        except NotLoggedIn:
            return await login_form(request, next_path=next_path)
        return redirect(next_path)

    def render_POST(self, request):
        return LoginAction(self.room).render_POST(request)


class LoginAction(RoomResource):
    """``POST /login``: check the password, start a session, set its cookie."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        return redirect("/")

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        check_origin(request)
        form = await read_form(self.room.api.run_blocking, request)
        username = form.get("username", "").strip()
        next_path = _safe_next(form.get("next"))
        nonce = get_cookie(request, LOGIN_COOKIE)
        if not nonce or not hmac.compare_digest(nonce.encode(), form.get(CSRF_FIELD, "").encode("utf-8", "replace")):
            return await login_form(request, status=403, username=username, next_path=next_path,
                                    message="The login form had expired or your browser did not send its cookie; "
                                            "please log in again (cookies must be enabled).")
        password = form.get("password", "")
        if not username or not password:
            return await login_form(request, status=400, username=username, next_path=next_path,
                                    message="Enter your user name and password.")
        throttle, peer = self.room.reading_room.login_throttle, client_ip(request)
        wait = throttle.attempt(username, peer)
        if wait:
            # Refused before the password is checked: while throttled, the right one does not work either.
            log.warn("reading room login for {user} from {peer} throttled for {wait} s", user=username, peer=peer,
                     wait=wait)
            await self.room.reading_room.record_access("auth-refused", outcome=8, user=username, credential="password",
                                                       peer=peer, detail=f"login throttled for {wait} s")
            return await self._throttled(request, wait, username, next_path)
        if not await self.room.reading_room.check_password(username, password):
            log.warn("reading room login refused for {user} from {peer}", user=username, peer=peer)
            await self.room.reading_room.record_access("auth-refused", outcome=4, user=username, credential="password",
                                                       peer=peer, detail="unknown user name or wrong password")
            return await login_form(request, status=401, username=username, next_path=next_path,
                                    message="Unknown user name or wrong password.")
        throttle.succeeded(username, peer)
        token = await self.room.reading_room.create_session(username)
        set_cookie(request, SESSION_COOKIE, token)
        set_cookie(request, LOGIN_COOKIE, "", max_age=0)
        log.info("reading room login: {user}", user=username)
        await self.room.reading_room.record_access("login", user=username, credential="password", peer=peer)
        return redirect(next_path)

    @staticmethod
    async def _throttled(request, wait: int, username: str, next_path: str) -> Response:
        """429 with Retry-After: the login form with a message, or problem JSON for a client that asks for JSON."""
        message = (f"Too many failed logins for this user or from this computer. "
                   f"Wait {_duration(wait)} and try again.")
        headers = {"Retry-After": str(wait)}
        if _wants_json(request):
            problem = Problem(429, message, kind="login-throttled", title="Too many login attempts", headers=headers)
            return Response(429, PROBLEM_JSON, problem.body(request.uri.decode("latin-1", "replace")), headers)
        response = await login_form(request, status=429, username=username, next_path=next_path, message=message)
        response.headers.update(headers)
        return response


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{math.ceil(seconds / 60)} minutes"


def _wants_json(request) -> bool:
    """True when the client asks for JSON (an API client) rather than a page."""
    accept = (request.getHeader("accept") or "").lower()
    return ("application/json" in accept or PROBLEM_JSON in accept) and "text/html" not in accept


class LogoutAction(RoomResource):
    """``POST /logout``: end the session."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        form = await read_form(self.room.api.run_blocking, request)
        try:
            session = await session_of(self.room.reading_room, request)
        except NotLoggedIn:
            return redirect("/")
        check_csrf(request, session, form)
        await self.room.reading_room.end_session(session.token)
        await self.room.reading_room.record_access("logout", user=session.user, credential="session",
                                                   peer=client_ip(request))
        set_cookie(request, SESSION_COOKIE, "", max_age=0)
        return redirect("/")


# --- the worklist -----------------------------------------------------------------------------------

FILTERS = ("patient", "modality", "date_from", "date_to", "status")


def worklist_filters(request) -> dict[str, str]:
    """The filters in the worklist's query string, as the form shows them."""
    filters = {}
    for key in FILTERS:
        value = (request.args.get(key.encode()) or [b""])[0].decode("utf-8", "replace").strip()
        if value:
            filters[key] = value
    return filters


def worklist_query(filters: dict[str, str], user: str, offset: int) -> WorklistQuery:
    """The :class:`WorklistQuery` of the form's filters, or a 400 naming the filter that is wrong."""
    dates = {}
    for key in ("date_from", "date_to"):
        value = filters.get(key, "")
        if value and len(_digits(value)) != 8:
            raise WebError(400, f"{key.replace('_', ' ')} must be a date (YYYY-MM-DD), not {value!r}")
        dates[key] = _digits(value)
    status = filters.get("status", "")
    if status not in ("", "read", "unread"):
        raise WebError(400, f"status is read or unread, not {status!r}")
    return WorklistQuery(user=user, patient=filters.get("patient", ""), modality=filters.get("modality", "").upper(),
                         status=status, limit=PAGE_SIZE, offset=offset, **dates)


MAX_OFFSET = 2**31 - 1


def _offset(request) -> int:
    raw = (request.args.get(b"offset") or [b"0"])[0].decode("ascii", "replace").strip() or "0"
    # str.isdigit() would pass "²", which int() refuses; and SQL refuses an offset past 2^63.
    if not re.fullmatch(r"[0-9]{1,10}", raw) or int(raw) > MAX_OFFSET:
        raise WebError(400, f"offset is a number of studies up to {MAX_OFFSET}, not {raw[:40]!r}")
    return int(raw)


class WorklistResource(RoomResource):
    """``/worklist``: the studies in this viewer, filterable by patient, modality, study date and read status,
    a page at a time."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        filters = worklist_filters(request)
        found = await self.room.reading_room.worklist(worklist_query(filters, session.user, _offset(request)))
        modalities = set(await self.room.reading_room.modalities())
        if "modality" in filters:
            modalities.add(filters["modality"].upper())
        return await html(200, page("Worklist", session, self._filter_form(filters, sorted(modalities)),
                                    self._table(found, filters), self._pages(found, filters)))

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
    def _row(s: StudyRow) -> Tag:
        link = f"/studies/{quote(s.study_uid)}"
        return tags.tr(
            tags.td(tags.span("unread" if s.unread else "read", class_="badge unread" if s.unread else "badge read")),
            tags.td(tags.a(patient_name(s.patient_name) or "(no name)", href=link)),
            tags.td(_text(s.patient_id)),
            tags.td(display_date(s.study_date)),
            tags.td(_text(s.study_description)),
            tags.td(", ".join(s.modalities)),
            tags.td(s.centre),
            tags.td(str(s.images), class_="num"),
            tags.td("✓ reported" if s.has_report else "—", class_="has-report" if s.has_report else "no-report"),
            tags.td(tags.a("Images", href=viewer_url(s.study_uid), class_="open-images button"),
                    " ", tags.a("Report", href=link, class_="open-report button secondary")),
            class_="study unread" if s.unread else "study", **data(study_uid=s.study_uid),
        )

    def _table(self, found: WorklistPage, filters: dict) -> Tag:
        if not found.studies:
            text = "No studies match these filters." if filters else "No studies have arrived in this viewer yet."
            return tags.p(text, class_="empty", id="worklist-empty")
        header = tags.tr(*[tags.th(h) for h in ("", "Patient", "Patient ID", "Study date", "Description", "Modality",
                                                "Centre", "Images", "Report", "Open")])
        return tags.table(tags.thead(header), tags.tbody(*[self._row(s) for s in found.studies]),
                          class_="worklist", id="worklist")

    @staticmethod
    def _pages(found: WorklistPage, filters: dict) -> Tag | str:
        offset, limit = found.query.offset, found.query.limit
        if not found.studies or (offset == 0 and not found.has_next):
            return ""

        def link(label, to, rel):
            return tags.a(label, href="/worklist?" + urlencode({**filters, "offset": str(to)}), rel=rel,
                          class_="button secondary", id=f"page-{rel}")

        return tags.nav(
            link("← Newer", max(offset - limit, 0), "prev") if offset else "",
            tags.span(f"{found.first}–{found.last} of {found.total}", class_="page-position"),
            link("Older →", offset + limit, "next") if found.has_next else "",
            class_="pages",
        )


# --- a study -----------------------------------------------------------------------------------------


class StudiesResource(RoomResource):
    def getChild(self, path, request):
        uid = uid_child(path)
        if uid is None:
            return ErrorResource(404, "that is not a study UID")
        return StudyPage(self.room, uid)


class StudyPage(UidResource):
    """``/studies/{uid}``: the study's series with their images, its reports and the report form."""

    @property
    def below(self):
        return {b"report": ReportAction, b"withdraw-measurements": WithdrawMeasurements}

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        try:
            study = await self.room.reading_room.study(self.uid, session.user)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        reports = await self.room.reading_room.reports(self.uid)
        saved = (request.args.get(b"saved") or [b""])[0].decode("ascii", "replace")
        name = patient_name(study.patient_name)
        summary = tags.dl(
            tags.dt("Patient"), tags.dd(name or "(no name)", class_="patient"),
            tags.dt("Patient ID"), tags.dd(_text(study.patient_id)),
            tags.dt("Study date"), tags.dd(display_date(study.study_date)),
            tags.dt("Description"), tags.dd(_text(study.study_description)),
            tags.dt("Centre"), tags.dd(study.centre),
            tags.dt("Study UID"), tags.dd(self.uid, class_="uid"),
            class_="summary",
        )
        series_sections = [self._series(self.uid, series) for series in study.series]
        if not series_sections:
            series_sections = [tags.p("This study has no images in this viewer.", class_="empty")]
        report_section = self._reports(session, reports, saved)
        return await html(200, page(f"Study of {name or self.uid}", session,
                                    tags.h1("Study ", tags.span(name, class_="patient")), summary,
                                    tags.p(tags.a("Open the images", href=viewer_url(self.uid),
                                                  class_="button open-images")),
                                    tags.div(tags.section(tags.h2("Series"), *series_sections, class_="series-list"),
                                             report_section, class_="study-layout")))

    @staticmethod
    def _series(study_uid: str, series: SeriesView) -> Tag:
        title = " · ".join(x for x in (
            _text(series.modality),
            f"Series {series.series_number}" if series.series_number else "",
            _text(series.series_description),
            f"{len(series.instances)} image(s)",
        ) if x)
        opened = sum(1 for i in series.instances if i.opened)
        # The thumbnail is the node's rendering (DICOMweb's .../thumbnail): showing it opens no image.
        thumbnail = (f"/dicomweb/studies/{quote(study_uid)}/series/{quote(series.series_uid or '')}/thumbnail"
                     f"?viewport={THUMBNAIL},{THUMBNAIL}")
        if series.series_uid is None:
            thumbnail = "data:,"
        return tags.section(
            tags.a(tags.img(src=thumbnail, alt=f"series {series.series_number or ''}", loading="lazy",
                            width=str(THUMBNAIL), height=str(THUMBNAIL)),
                   href=viewer_url(study_uid), class_="thumbnail opened" if opened else "thumbnail",
                   **data(series_uid=series.series_uid)),
            tags.div(tags.h3(title), tags.p(f"{opened} of {len(series.instances)} opened by you", class_="caption")),
            class_="series",
        )

    def _reports(self, session: Session, reports: list[ReportView], saved: str) -> Tag:
        items = []
        for r in reports:
            items.append(tags.li(
                tags.div(tags.strong(_text(r.author)), " · ", tags.time(_when(r.time)),
                         " · signed" if r.verified else "", class_="meta"),
                tags.pre(r.text, class_="report-text"),
                class_="report",
            ))
        # A new report starts from the latest one: an addendum is an edit of it, signed again.
        draft = reports[-1].text if reports else ""
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


def _when(value: str | None) -> str:
    return (value or "")[:19].replace("T", " ")


class ReportAction(UidResource):
    """``POST /studies/{uid}/report``: save the study's report, signed by the user (a Basic Text SR, sent to central)."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        form = await read_form(self.room.api.run_blocking, request)
        session = await self.room.session(request)
        check_csrf(request, session, form)
        text = form.get("text", "").replace("\r\n", "\n").strip()
        if not text:
            raise WebError(400, "the report is empty; write the report before saving it")
        if len(text) > MAX_REPORT:
            raise WebError(413, f"the report is longer than {MAX_REPORT} characters")
        try:
            report_uid = await self.room.reading_room.save_report(self.uid, session.user, text)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        except ReportError as e:
            raise WebError(400, f"the report was refused: {e}") from e
        log.info("report {report} on study {study} signed by {user}", report=report_uid, study=self.uid,
                 user=session.user)
        return redirect(f"/studies/{quote(self.uid)}?saved=signed#report-saved")
