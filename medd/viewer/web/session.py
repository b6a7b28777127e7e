"""Sessions and CSRF: the session cookie, the CSRF token derived from it, the
Origin check and the reading of urlencoded forms.

Every page needs a session (an HttpOnly, SameSite=Strict cookie). Every
state-changing POST carries a CSRF token derived from the session (a form
field, or the ``X-CSRF-Token`` header for the browser's API calls), and a POST
whose ``Origin`` is another site is refused.
"""
from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

from medd.viewer.web.errors import NotLoggedIn, SessionLocked, WebError
from medd.webresource import read_body

SESSION_COOKIE = b"medd_session"
LOGIN_COOKIE = b"medd_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
MAX_FORM = 256 * 1024


def csrf_token(session: str) -> str:
    """The CSRF token of a session: derived from the session token, which only the browser and the node know."""
    return hmac.new(session.encode("utf-8"), b"medd reading room csrf", hashlib.sha256).hexdigest()


def get_cookie(request, name: bytes) -> str | None:
    value = request.getCookie(name)
    return value.decode("ascii", "replace") if value else None


def set_cookie(request, name: bytes, value: str, *, max_age: int | None = None) -> None:
    request.addCookie(name, value.encode("ascii"), path=b"/", httpOnly=True, sameSite="strict",
                      secure=request.isSecure() or None, max_age=None if max_age is None else str(max_age).encode())


def check_origin(request) -> None:
    """Refuse a POST that a page on another site sent (SameSite cookies are the first line, this the second)."""
    origin = request.getHeader("origin")
    if not origin or origin == "null":
        return
    host = request.getHeader("host") or ""
    if urlsplit(origin).netloc.lower() != host.lower():
        raise WebError(403, "this form was sent from another site; open the reading room directly and try again")


class Session:
    """A logged-in user's session: its token (the cookie), the user, the CSRF token, and the seconds
    without input after which its page locks (0: never)."""

    def __init__(self, token: str, user: str, idle_lock: float = 0):
        self.token = token
        self.user = user
        self.csrf = csrf_token(token)
        self.idle_lock = idle_lock


async def session_of(reading_room, request, *, locked_too: bool = False) -> Session:
    """The request's live session; :class:`NotLoggedIn` without one, :class:`SessionLocked` for a locked one
    (unless ``locked_too``: the unlocking itself)."""
    token = get_cookie(request, SESSION_COOKIE)
    if not token:
        raise NotLoggedIn()
    state = await reading_room.session_state(token)
    if state is None:
        raise NotLoggedIn()
    if state.locked and not locked_too:
        raise SessionLocked()
    return Session(token, state.user, reading_room.room_settings.idle_lock)


def check_csrf(request, session: Session, form: dict[str, str] | None) -> None:
    """Refuse a POST from another site or without the session's CSRF token (form field or header)."""
    check_origin(request)
    sent = (form or {}).get(CSRF_FIELD) or request.getHeader(CSRF_HEADER) or ""
    if not hmac.compare_digest(sent.encode("utf-8", "replace"), session.csrf.encode("ascii")):
        raise WebError(403, "this form has expired or did not come from the reading room; reload the page and try again")


async def read_form(run_blocking, request) -> dict[str, str]:
    """The urlencoded body of a POST, read off the reactor (the site does not parse forms)."""
    content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise WebError(415, "this form must be sent as application/x-www-form-urlencoded")
    body = await run_blocking(read_body, request.content)
    if len(body) > MAX_FORM:
        raise WebError(413, "the form is too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as e:
        raise WebError(400, "the form is not UTF-8") from e
    return {k: v[0] for k, v in fields.items()}
