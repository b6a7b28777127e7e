"""The browser's JSON API on an image: its saved annotations, saving new ones
as an overlay, and saying that the image was shown ("opened").

Both POSTs carry the session's CSRF token in the ``X-CSRF-Token`` header.
"""
from __future__ import annotations

import json

from twisted.logger import Logger

from medd.viewer.annotations import AnnotationError, check_annotations
from medd.viewer.contract import CannotAnnotate, UnknownObject
from medd.viewer.web.errors import WebError
from medd.viewer.web.serving import UidResource, json_response, serve
from medd.viewer.web.session import check_csrf
from medd.webresource import Response, client_ip, read_body

log = Logger()


def saved_annotations(overlays) -> list[dict]:
    """The annotations of every overlay, oldest first, as the browser draws them."""
    return [a.as_json() for overlay in overlays for a in overlay.annotations]


class OverlaysResource(UidResource):
    """``GET|POST /images/{uid}/overlays``: the saved annotations; save new ones as an overlay (JSON)."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get, api=True)

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _get(self, request) -> Response:
        await self.room.session(request)
        return json_response(200, {"annotations": saved_annotations(await self.room.reading_room.overlays(self.uid))})

    async def _post(self, request) -> Response:
        session = await self.room.session(request)
        check_csrf(request, session, None)
        content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise WebError(415, "annotations are sent as application/json")
        body = await self.room.api.run_blocking(read_body, request.content)
        try:
            value = json.loads(body or b"null")
        except ValueError as e:
            raise WebError(400, f"the request is not JSON: {e}") from e
        if not isinstance(value, dict) or "annotations" not in value:
            raise WebError(400, 'send {"annotations": [...]}')
        try:
            annotations = check_annotations(value["annotations"])
        except AnnotationError as e:
            raise WebError(400, str(e)) from e
        await self.room.facts(self.uid)  # a 404 for an image this viewer does not have
        try:
            overlay_uid = await self.room.reading_room.save_overlay(self.uid, session.user, annotations)
        except UnknownObject as e:
            raise WebError(404, f"there is no image {self.uid} in this viewer") from e
        except AnnotationError as e:
            raise WebError(400, f"the overlay was refused: {e}") from e
        except CannotAnnotate as e:
            raise WebError(422, f"image {self.uid} cannot carry an overlay: {e}") from e
        log.info("overlay {overlay} on {uid} saved by {user}", overlay=overlay_uid, uid=self.uid, user=session.user)
        return json_response(201, {"uid": overlay_uid, "annotations": len(annotations)})


class OpenedAction(UidResource):
    """``POST /images/{uid}/opened``: the image page sends this once the image is shown; the viewer records
    it for the user and tells central (status ``opened``). Viewing the page itself changes nothing."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request) -> Response:
        session = await self.room.session(request)
        check_csrf(request, session, None)
        try:
            mark = await self.room.reading_room.opened(self.uid, session.user, client_ip(request))
        except UnknownObject as e:
            raise WebError(404, f"there is no image {self.uid} in this viewer") from e
        return json_response(200, {"uid": mark.uid, "user": mark.user, "at": mark.at.isoformat(), "first": mark.first})
