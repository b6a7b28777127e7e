"""Answering a reading-room request: the state every resource shares, running
an async handler and turning its errors into pages (or JSON for the
browser's API calls), with the security headers every answer carries."""
from __future__ import annotations

import json
import re
from urllib.parse import urlencode

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from medd.viewer.web.errors import NotLoggedIn, SessionLocked, WebError
from medd.viewer.web.layout import error_page
from medd.viewer.web.session import Session, check_csrf, read_form, session_of
from medd.webresource import PROBLEM_JSON, Problem, Response, audit_refusal, write_response

log = Logger()

# DICOM UIDs: digits and dots, at most 64 characters (PS3.5 9.1).
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class Room:
    """What every resource shares: the reading room and the blocking pool."""

    def __init__(self, reading_room, api):
        self.reading_room = reading_room
        self.api = api

    async def session(self, request) -> Session:
        """The request's session (:class:`NotLoggedIn` without one), kept on the request for its error page."""
        session = await session_of(self.reading_room, request)
        request.medd_session = session
        return session

    async def posted(self, request) -> tuple[dict, Session]:
        """A POST's form and its session, the form's CSRF token checked against the session's."""
        form = await read_form(self.api.run_blocking, request)
        session = await self.session(request)
        check_csrf(request, session, form)
        return form, session


def security_headers(request) -> None:
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
        except SessionLocked:
            if api:
                response = api_problem(423, "the reading room is locked; type your password to unlock it")
            elif request.method in (b"GET", b"HEAD"):
                response = redirect("/unlock?" + urlencode({"next": request.uri.decode("latin-1")}))
            else:
                response = await error_page(423, "the reading room is locked; unlock it and try again", None)
        except NotLoggedIn:
            # A refused authentication like any 401: one record, whichever way it is answered.
            await audit_refusal(request, Problem(401, "no reading-room session"))
            if api:
                response = api_problem(401, "your session has ended; log in again")
            elif request.method in (b"GET", b"HEAD"):
                response = redirect("/?" + urlencode({"next": request.uri.decode("latin-1")}))
            else:
                response = await error_page(401, "your session has ended; log in again", None)
        except WebError as e:
            log.warn("{method} {uri} refused with {status}: {message}", method=request.method.decode("latin-1"),
                     uri=request.uri.decode("latin-1", "replace"), status=e.status, message=e.message)
            if api:
                response = api_problem(e.status, e.message)
            else:
                response = await error_page(e.status, e.message, getattr(request, "medd_session", None))
        except Exception:
            log.failure("{method} {uri} failed", method=request.method.decode("latin-1"),
                        uri=request.uri.decode("latin-1", "replace"))
            message = "something went wrong in the viewer; the node's log has the details"
            response = api_problem(500, message) if api else await error_page(500, message, None)
        if not gone:
            security_headers(request)
            write_response(request, response)

    ensureDeferred(run())
    return NOT_DONE_YET


def redirect(location: str, status: int = 303) -> Response:
    return Response(status, "text/plain; charset=utf-8", b"", {"Location": location})


def json_response(status: int, value) -> Response:
    return Response(status, "application/json", json.dumps(value).encode("utf-8"))


def api_problem(status: int, message: str) -> Response:
    """An RFC 9457 problem document for the browser's API calls; ``error`` repeats the
    detail (an extension member) for the reading room's own script."""
    doc = Problem(status, message).document()
    doc["error"] = message
    return Response(status, PROBLEM_JSON, json.dumps(doc).encode("utf-8"))


def uid_child(path: bytes) -> str | None:
    """A path segment that is a DICOM UID, or None."""
    try:
        uid = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    return uid if len(uid) <= 64 and UID.match(uid) else None


class RoomResource(Resource):
    """A reading-room resource: knows the :class:`Room`; an unknown child is a 404 page."""

    def __init__(self, room: Room):
        super().__init__()
        self.room = room

    def getChild(self, path, request):
        return ErrorResource(404, "there is no such page in the reading room")


class UidResource(RoomResource):
    """A resource of one study or image (``uid``); ``below`` maps child names to the resources under it."""

    below: dict = {}

    def __init__(self, room: Room, uid: str):
        super().__init__(room)
        self.uid = uid

    def getChild(self, path, request):
        if not request.postpath:
            if path in self.below:
                return self.below[path](self.room, self.uid)
            if path == b"":
                return self
        return super().getChild(path, request)


class ErrorResource(Resource):
    isLeaf = True

    def __init__(self, status: int, message: str):
        super().__init__()
        self.status, self.message = status, message

    def render(self, request):
        async def fail(request):
            raise WebError(self.status, self.message)

        return serve(request, fail)


class ApiResource(RoomResource):
    """``/api/...``: the JSON calls of the reading room's own pages; an unknown one is a 404 problem."""

    def __init__(self, room: Room, children: dict[bytes, Resource]):
        super().__init__(room)
        for name, child in children.items():
            self.putChild(name, child)

    def getChild(self, path, request):
        return ApiNotFound()


class ApiNotFound(Resource):
    isLeaf = True

    def render(self, request):
        async def fail(request):
            raise WebError(404, "there is no such call in the reading room's API")

        return serve(request, fail, api=True)
