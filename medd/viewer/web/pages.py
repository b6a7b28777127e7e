"""The reading room's HTML pages: login and logout. The worklist is
:mod:`.worklist`; a study opens on the reading screen (:mod:`.reading_screen`):
its images in OHIF (:mod:`.ohif`) beside its report.

Every GET here only reads.
"""
from __future__ import annotations

import hmac
import math
import re
import secrets
import unicodedata
from urllib.parse import unquote, urlsplit

from twisted.logger import Logger
from twisted.web.template import tags

from medd.viewer.web.errors import NotLoggedIn
from medd.viewer.web.layout import html, page
from medd.viewer.web.serving import RoomResource, redirect, serve
from medd.viewer.web.session import (CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, check_csrf, check_origin,
                                     get_cookie, read_form, session_of, set_cookie)
from medd.webresource import PROBLEM_JSON, Problem, Response, client_ip

log = Logger()



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
