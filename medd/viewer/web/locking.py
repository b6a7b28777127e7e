"""The idle lock: after ``[reading_room] idle_lock`` minutes without input the
page's script (``/static/idle-lock.js``) locks the session here and covers
the page; until the user types their password again every request of the
session is refused (pages send to ``/unlock``, the API and DICOMweb answer
423 or 403). The page is not reloaded, so what it held (a typed filter, a
draft) is still there after unlocking.

``POST /lock`` locks; ``POST /unlock`` (the overlay's call, JSON) or the
``/unlock`` page's form unlocks. Unlocking goes through the login throttle.
"""
from __future__ import annotations

from twisted.logger import Logger
from twisted.web.template import tags

from medd.viewer.web.layout import html, page
from medd.viewer.web.pages import _safe_next, _wants_json
from medd.viewer.web.serving import RoomResource, api_problem, json_response, redirect, serve
from medd.viewer.web.session import CSRF_FIELD, check_csrf, read_form, session_of
from medd.webresource import Response, client_ip

log = Logger()


class LockAction(RoomResource):
    """``POST /lock``: the page sat idle; the session serves nothing until unlocked."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request) -> Response:
        form = await read_form(self.room.api.run_blocking, request)
        session = await session_of(self.room.reading_room, request, locked_too=True)
        check_csrf(request, session, form)
        await self.room.reading_room.lock_session(session.token)
        log.info("reading room session of {user} locked (idle)", user=session.user)
        await self.room.reading_room.record_access("logout", user=session.user, credential="session",
                                                   peer=client_ip(request), detail="idle lock: session locked")
        return json_response(200, {"locked": True})


class UnlockResource(RoomResource):
    """``/unlock``: the form asking a locked session's user for the password again (GET), and the unlocking
    (POST; JSON for the overlay's call, a redirect to ``next`` for the form)."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await session_of(self.room.reading_room, request, locked_too=True)
        next_path = _safe_next((request.args.get(b"next") or [b""])[0].decode("utf-8", "replace"))
        return await self._form(session, next_path)

    @staticmethod
    async def _form(session, next_path: str, *, status: int = 200, message: str = "") -> Response:
        form = tags.form(
            tags.h1("Locked"),
            tags.p(f"The reading room of {session.user} locked after a while without input."),
            tags.p(message, class_="error", role="alert") if message else "",
            tags.label("Password", tags.input(name="password", id="unlock-password", type="password",
                                               autocomplete="current-password", required="required",
                                               autofocus="autofocus")),
            tags.input(type="hidden", name=CSRF_FIELD, value=session.csrf),
            tags.input(type="hidden", name="next", value=next_path),
            tags.button("Unlock", type="submit"),
            method="post", action="/unlock", class_="login",
        )
        return await html(status, page("Locked", None, form, body_class="login-page"))

    def render_POST(self, request):
        return serve(request, self._post, api=_wants_json(request))

    async def _post(self, request) -> Response:
        form = await read_form(self.room.api.run_blocking, request)
        session = await session_of(self.room.reading_room, request, locked_too=True)
        check_csrf(request, session, form)
        room, peer = self.room.reading_room, client_ip(request)
        next_path = _safe_next(form.get("next"))
        wait = room.login_throttle.attempt(session.user, peer)
        if wait:
            message = f"Too many wrong passwords; wait {wait} s and try again."
            await room.record_access("auth-refused", outcome=8, user=session.user, credential="password", peer=peer,
                                     detail=f"unlock throttled for {wait} s")
            if _wants_json(request):
                return api_problem(429, message)
            return await self._form(session, next_path, status=429, message=message)
        if not await room.unlock_session(session.token, form.get("password", "")):
            await room.record_access("auth-refused", outcome=4, user=session.user, credential="password", peer=peer,
                                     detail="wrong password to unlock")
            if _wants_json(request):
                return api_problem(401, "wrong password")
            return await self._form(session, next_path, status=401, message="Wrong password.")
        room.login_throttle.succeeded(session.user, peer)
        log.info("reading room session of {user} unlocked", user=session.user)
        await room.record_access("login", user=session.user, credential="password", peer=peer,
                                 detail="unlocked the idle lock")
        if _wants_json(request):
            return json_response(200, {"locked": False})
        return redirect(next_path)
