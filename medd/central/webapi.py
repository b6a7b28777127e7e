"""Central's HTTP resources beyond ingest: the pull outbox for viewers and
the administrator's API. Mounted on the node's HTTP listener.

Every request needs ``Authorization: Bearer <token>``: a viewer's token for
``/outbox``, an administrator's for ``/api``. Nothing here is open.
"""
from __future__ import annotations

import json

from twisted.web.resource import Resource

from medd.central import directory, outbox, routing, tracking
from medd.webresource import Problem, ProblemResource, Response, json_response, render_async

RFC822 = "message/rfc822"


def bearer(request) -> str:
    value = (request.getHeader("authorization") or "").strip()
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "this resource needs Authorization: Bearer <token>", kind="unauthorised",
                      headers={"WWW-Authenticate": 'Bearer realm="medd"'})
    return token.strip()


def unknown_viewer_token() -> Problem:
    return Problem(401, "unknown viewer token", kind="unauthorised",
                   headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def _json_body(request, node) -> dict:
    from medd.webresource import read_body

    raw = await node.ingest.run_blocking(read_body, request.content)
    try:
        value = json.loads(raw or b"{}")
    except ValueError as e:
        raise Problem(400, f"request body is not JSON: {e}", kind="invalid") from e
    if not isinstance(value, dict):
        raise Problem(400, "request body must be a JSON object", kind="invalid")
    return value


class _Authenticated(ProblemResource):
    def __init__(self, node):
        super().__init__()
        self.node = node

    async def viewer(self, request) -> directory.Viewer:
        token = bearer(request)
        viewer = await self.node.database.run(lambda c: directory.viewer_by_token(c, token))
        if viewer is None:
            raise unknown_viewer_token()
        return viewer

    async def admin(self, request) -> str:
        token = bearer(request)
        name = await self.node.database.run(lambda c: directory.admin_by_token(c, token))
        if name is None:
            raise Problem(403, "an administrator token is required", kind="forbidden")
        return name


# -- /outbox -----------------------------------------------------------------------------------------


class OutboxResource(_Authenticated):
    """GET /outbox, GET /outbox/{id}, POST /outbox/{id}/ack."""

    def getChild(self, path, request):
        if path == b"":
            return self
        try:
            delivery_id = int(path)
        except ValueError:
            return super().getChild(path, request)
        return OutboxItem(self.node, delivery_id)

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        viewer = await self.viewer(request)
        waiting = await self.node.database.run(lambda c: outbox.pull_waiting(c, viewer.address))
        return json_response(200, [
            {
                "id": d.id, "uid": r.sop_instance_uid, "object_type": r.object_type, "message_id": d.message_id,
                "study_instance_uid": r.study_instance_uid, "modality": r.modality, "size": r.size,
                "state": d.state, "url": f"/outbox/{d.id}",
            }
            for d, r in waiting
        ])


class OutboxItem(_Authenticated):
    def __init__(self, node, delivery_id: int):
        super().__init__(node)
        self.delivery_id = delivery_id

    def getChild(self, path, request):
        if path == b"ack":
            return OutboxAck(self.node, self.delivery_id)
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request):
        return render_async(request, self._fetch)

    async def _delivery(self, request, then=None):
        """The viewer, its delivery and ``then(conn, viewer, delivery)``, in one
        transaction: a pull viewer does this for every package, and each
        separate database call waits its turn behind ingest's commits."""
        token = bearer(request)

        def lookup(c):
            viewer = directory.viewer_by_token(c, token)
            if viewer is None:
                return None, None, None
            delivery = outbox.delivery_for(c, self.delivery_id, viewer.address)
            extra = then(c, viewer, delivery) if delivery is not None and then is not None else None
            return viewer, delivery, extra

        viewer, delivery, extra = await self.node.database.run(lookup)
        if viewer is None:
            raise unknown_viewer_token()
        if delivery is None:
            raise Problem(404, f"no delivery {self.delivery_id} for {viewer.address}")
        return viewer, delivery, extra

    async def _fetch(self, request) -> Response:
        viewer, delivery, record = await self._delivery(request, lambda c, v, d: tracking.object_by_uid(c, d.uid))
        package = await outbox.load_package(self.node.ingest, record, delivery, self.node.routing.outbox.origin)
        if delivery.state == "queued":
            at = self.node.routing.outbox.now()
            await self.node.database.run(
                lambda c: outbox.set_state(c, delivery.id, "sent", at, f"fetched by {viewer.address}",
                                           attempts=delivery.attempts + 1))
        return Response(200, RFC822, package, {"Medd-Delivery": str(delivery.id)})


class OutboxAck(OutboxItem):
    def render_POST(self, request):
        return render_async(request, self._ack)

    def render_GET(self, request):  # only POST acknowledges
        return render_async(request, self._method_not_allowed)

    async def _method_not_allowed(self, request):
        raise Problem(405, "acknowledge with POST", headers={"Allow": "POST"})

    async def _ack(self, request) -> Response:
        def acknowledge(c, viewer, delivery):
            if delivery.state in ("queued", "sent", "failed"):
                at = self.node.routing.outbox.now()
                outbox.set_state(c, delivery.id, "delivered", at, f"acknowledged by {viewer.address}",
                                 next_attempt_at=None)

        viewer, delivery, _ = await self._delivery(request, acknowledge)
        return json_response(200, {"id": delivery.id, "state": "delivered" if delivery.state != "opened" else "opened"})


# -- /api ----------------------------------------------------------------------------------------------


class ApiResource(_Authenticated):
    """/api/objects/{uid}, /api/quarantine[/{id}/route|reject], /api/viewers, /api/routes."""

    def __init__(self, node):
        super().__init__(node)
        self.putChild(b"objects", ObjectsResource(node))
        self.putChild(b"quarantine", QuarantineResource(node))
        self.putChild(b"viewers", ViewersResource(node))
        self.putChild(b"routes", RoutesResource(node))


class ObjectsResource(_Authenticated):
    def getChild(self, path, request):
        return ObjectResource(self.node, path.decode("ascii", "replace"))


class ObjectResource(_Authenticated):
    isLeaf = True

    def __init__(self, node, uid: str):
        super().__init__(node)
        self.uid = uid

    def render_GET(self, request):
        return render_async(request, self._get)

    async def _get(self, request) -> Response:
        await self.admin(request)
        history = await self.node.database.run(lambda c: tracking.object_history(c, self.uid))
        if history is None:
            raise Problem(404, f"no object {self.uid}")
        return json_response(200, history)


class QuarantineResource(_Authenticated):
    def getChild(self, path, request):
        if path == b"":
            return self
        try:
            return QuarantineEntryResource(self.node, int(path))
        except ValueError:
            return super().getChild(path, request)

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        await self.admin(request)
        state = request.args.get(b"state", [b"held"])[0].decode() or None
        entries = await self.node.database.run(lambda c: routing.list_quarantine(c, None if state == "all" else state))
        return json_response(200, [{**e.__dict__, "created_at": e.created_at.isoformat()} for e in entries])


class QuarantineEntryResource(_Authenticated):
    def __init__(self, node, entry_id: int):
        super().__init__(node)
        self.entry_id = entry_id

    def getChild(self, path, request):
        if path in (b"route", b"reject"):
            return QuarantineAction(self.node, self.entry_id, path.decode())
        return super().getChild(path, request)


class QuarantineAction(_Authenticated):
    isLeaf = True

    def __init__(self, node, entry_id: int, action: str):
        super().__init__(node)
        self.entry_id = entry_id
        self.action = action

    def render_POST(self, request):
        return render_async(request, self._post)

    async def _post(self, request) -> Response:
        admin = await self.admin(request)
        body = await _json_body(request, self.node)
        try:
            if self.action == "route":
                if not body.get("to"):
                    raise Problem(400, 'route needs {"to": "<viewer address>"}', kind="invalid")
                await self.node.database.run(lambda c: routing.correct_route(c, self.entry_id, body["to"], admin))
            else:
                if not body.get("reason"):
                    raise Problem(400, 'reject needs {"reason": "..."}', kind="invalid")
                await self.node.database.run(lambda c: routing.reject(c, self.entry_id, body["reason"], admin))
        except routing.CorrectionError as e:
            raise Problem(409, str(e), kind="correction-refused") from e
        self.node.routing.kick()
        return json_response(200, {"id": self.entry_id, "state": "released" if self.action == "route" else "rejected"})


class ViewersResource(_Authenticated):
    def render_GET(self, request):
        return render_async(request, self._list)

    def render_POST(self, request):
        return render_async(request, self._add)

    async def _list(self, request) -> Response:
        await self.admin(request)
        viewers = await self.node.database.run(directory.list_viewers)
        return json_response(200, [v.__dict__ for v in viewers])

    async def _add(self, request) -> Response:
        await self.admin(request)
        body = await _json_body(request, self.node)
        try:
            viewer, token = await self.node.database.run(
                lambda c: directory.add_viewer(c, body.get("address", ""), body.get("push"), body.get("authorise", [])))
        except directory.DirectoryError as e:
            raise Problem(409, str(e), kind="directory") from e
        return json_response(201, {**viewer.__dict__, "token": token})


class RoutesResource(_Authenticated):
    def render_GET(self, request):
        return render_async(request, self._list)

    def render_POST(self, request):
        return render_async(request, self._add)

    async def _list(self, request) -> Response:
        await self.admin(request)
        rules = await self.node.database.run(directory.list_rules)
        return json_response(200, [r.__dict__ for r in rules])

    async def _add(self, request) -> Response:
        await self.admin(request)
        body = await _json_body(request, self.node)
        try:
            rule = await self.node.database.run(lambda c: directory.add_rule(
                c, body.get("to", ""), body.get("centre", ""), body.get("modality", ""), body.get("type", "")))
        except directory.DirectoryError as e:
            raise Problem(400, str(e), kind="invalid") from e
        self.node.routing.kick()
        return json_response(201, rule.__dict__)


def central_resources(node) -> dict[bytes, Resource]:
    return {b"outbox": OutboxResource(node), b"api": ApiResource(node)}
