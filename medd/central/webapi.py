"""Central's HTTP resources beyond ingest: the pull outbox for viewers and
imaging centres, and the administrator's API. Mounted on the node's HTTP listener.

Every request needs ``Authorization: Bearer <token>``: a viewer's or a
centre's token for ``/outbox`` (each sees only the deliveries to its own
address) — or, over HTTPS with ``[tls] client_ca``, the client certificate
``--client-cert`` issued to that viewer or centre — and an administrator's
token for ``/api``. Nothing here is open.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from urllib.parse import urlencode

from twisted.web.resource import Resource

from medd.central import outbox, routing
from medd.central.reports import report_summary
from medd.central.tracking import history_json, quarantine_json, study_json
from medd.storage.directory import DirectoryError, OutboxOwner
from medd.storage.routing import CorrectionError
from medd.central.routing import RoutingService
from medd.central.storage import CentralStorage
from medd.audit import AuditTrail, audit_time, credential_change, record_json
from medd.ingest import Ingest
from medd.storage.audit import AuditFilter
from medd.webresource import (Problem, ProblemResource, Response, bearer_token, client_ip, json_response,
                              peer_certificate, render_async, require_bearer, unauthorised)

RFC822 = "message/rfc822"


def unknown_viewer_token() -> Problem:
    return unauthorised("unknown viewer or centre token", invalid_token=True)


def outbox_credential(request):
    """What opens an outbox: the bearer token if the request has one, else the client certificate
    the HTTPS listener verified (its CN a registered viewer's or centre's address); a 401 problem
    when there is neither."""
    token = bearer_token(request)
    if token is not None:
        return token
    certified = peer_certificate(request)
    if certified is not None:
        return certified
    return require_bearer(request)


async def _json_body(request, central) -> dict:
    from medd.webresource import read_body

    raw = await central.ingest.run_blocking(read_body, request.content)
    try:
        value = json.loads(raw or b"{}")
    except ValueError as e:
        raise Problem(400, f"request body is not JSON: {e}", kind="invalid") from e
    if not isinstance(value, dict):
        raise Problem(400, "request body must be a JSON object", kind="invalid")
    return value


@dataclass(frozen=True)
class CentralWeb:
    """What central's resources use: its storage, its routing service (to kick it
    after a change, and the outbox's origin address) and the node's ingest (to
    read request bodies and blobs off the reactor)."""

    storage: CentralStorage
    routing: RoutingService
    ingest: Ingest
    audit: AuditTrail


class _Authenticated(ProblemResource):
    def __init__(self, central: CentralWeb):
        super().__init__()
        self.central = central
        self.storage = central.storage

    async def outbox_owner(self, request) -> OutboxOwner:
        owner = await self.storage.directory.outbox_owner(outbox_credential(request))
        if owner is None:
            raise unknown_viewer_token()
        return owner

    async def admin(self, request) -> str:
        token = require_bearer(request)
        principal = await self.storage.directory.principal(token)
        if principal is None:
            raise unauthorised("the token is no one's; an administrator token is required", invalid_token=True)
        if principal.kind != "admin":
            raise Problem(403, "an administrator token is required", kind="forbidden", who=principal.name)
        return principal.name

    def record(self, request, event: str, **fields):
        """Deferred: ``event`` recorded in the audit trail, with the request's peer address."""
        return self.central.audit.record(event, peer=client_ip(request), transport="http", **fields)


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
        return OutboxItem(self.central, delivery_id)

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        owner = await self.outbox_owner(request)
        waiting = await self.storage.deliveries.pull_waiting(owner.address)
        await self.record(request, "query", user=owner.address, credential=owner.address,
                          detail=f"GET /outbox: {len(waiting)} waiting")
        return json_response(200, [_listed(w.delivery, w.record) for w in waiting])


def _listed(d, r) -> dict:
    if d.status is not None:  # a status package to a centre: about the object ``uid``
        return {
            "id": d.id, "uid": d.status["uid"], "object_type": "status", "event": d.status["event"],
            "message_id": d.message_id, "study_instance_uid": None, "modality": None, "size": None,
            "state": d.state, "url": f"/outbox/{d.id}",
        }
    return {
        "id": d.id, "uid": r.sop_instance_uid, "object_type": r.object_type, "message_id": d.message_id,
        "study_instance_uid": r.study_instance_uid, "modality": r.modality, "size": r.size,
        "state": d.state, "url": f"/outbox/{d.id}",
    }


class OutboxItem(_Authenticated):
    def __init__(self, central: CentralWeb, delivery_id: int):
        super().__init__(central)
        self.delivery_id = delivery_id

    def getChild(self, path, request):
        if path == b"ack":
            return OutboxAck(self.central, self.delivery_id)
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request):
        return render_async(request, self._fetch)

    def _found(self, pulled):
        if pulled.owner is None:
            raise unknown_viewer_token()
        if pulled.delivery is None:
            raise Problem(404, f"no delivery {self.delivery_id} for {pulled.owner.address}")
        return pulled

    async def _fetch(self, request) -> Response:
        pulled = self._found(await self.storage.deliveries.pull_request(outbox_credential(request), self.delivery_id))
        delivery = pulled.delivery
        package = await outbox.load_package(self.central.ingest, pulled.record, delivery, self.central.routing.outbox.origin,
                                            self.storage.directory)
        r = pulled.record
        await self.record(request, "retrieve", user=pulled.owner.address, credential=pulled.owner.address,
                          patient_id=r.patient_id if r else None, study_instance_uid=r.study_instance_uid if r else None,
                          series_instance_uid=r.series_instance_uid if r else None, sop_instance_uid=delivery.uid,
                          detail=f"GET /outbox/{delivery.id}")
        if delivery.state == "queued":
            await self.storage.deliveries.mark_sent(delivery.id, delivery.attempts + 1, f"fetched by {pulled.owner.address}")
        return Response(200, RFC822, package, {"Medd-Delivery": str(delivery.id)})


class OutboxAck(OutboxItem):
    def render_POST(self, request):
        return render_async(request, self._ack)

    def render_GET(self, request):  # only POST acknowledges
        return render_async(request, self._method_not_allowed)

    async def _method_not_allowed(self, request):
        raise Problem(405, "acknowledge with POST", headers={"Allow": "POST"})

    async def _ack(self, request) -> Response:
        delivery = self._found(await self.storage.deliveries.acknowledge(outbox_credential(request), self.delivery_id)).delivery
        return json_response(200, {"id": delivery.id, "state": "delivered" if delivery.state != "opened" else "opened"})


# -- /api ----------------------------------------------------------------------------------------------


class ApiResource(_Authenticated):
    """/api/objects/{uid}, /api/studies/{uid}, /api/quarantine[/{id}/route|reject], /api/viewers, /api/centres, /api/routes,
    /api/conflicts."""

    def __init__(self, central: CentralWeb):
        super().__init__(central)
        self.putChild(b"objects", ObjectsResource(central))
        self.putChild(b"studies", StudiesResource(central))
        self.putChild(b"quarantine", QuarantineResource(central))
        self.putChild(b"viewers", ViewersResource(central))
        self.putChild(b"centres", CentresResource(central))
        self.putChild(b"routes", RoutesResource(central))
        self.putChild(b"conflicts", ConflictsResource(central))
        self.putChild(b"audit", AuditResource(central))


class ObjectsResource(_Authenticated):
    def getChild(self, path, request):
        return ObjectResource(self.central, path.decode("ascii", "replace"))


class ObjectResource(_Authenticated):
    isLeaf = True

    def __init__(self, central, uid: str):
        super().__init__(central)
        self.uid = uid

    def render_GET(self, request):
        return render_async(request, self._get)

    async def _get(self, request) -> Response:
        admin = await self.admin(request)
        history = await self.storage.tracking.object_history(self.uid)
        await self.record(request, "query", user=admin, credential=admin, sop_instance_uid=self.uid[:64],
                          detail=f"GET /api/objects: {'found' if history else 'not found'}")
        if history is None:
            raise Problem(404, f"no object {self.uid}")
        found = history_json(history)
        if history.object.object_type == "report":
            found["report"] = await report_summary(self.central.ingest, self.storage.directory, history.object)
        return json_response(200, found)


class StudiesResource(_Authenticated):
    def getChild(self, path, request):
        return StudyResource(self.central, path.decode("ascii", "replace"))


class StudyResource(_Authenticated):
    """/api/studies/{uid}: the study's state: images received, delivered and opened per viewer (and by whom),
    reports."""

    isLeaf = True

    def __init__(self, central, uid: str):
        super().__init__(central)
        self.uid = uid

    def render_GET(self, request):
        return render_async(request, self._get)

    async def _get(self, request) -> Response:
        admin = await self.admin(request)
        study = await self.storage.tracking.study_state(self.uid)
        await self.record(request, "query", user=admin, credential=admin, study_instance_uid=self.uid[:64],
                          detail=f"GET /api/studies: {'found' if study else 'not found'}")
        if study is None:
            raise Problem(404, f"no study {self.uid}")
        return json_response(200, study_json(study))


class ConflictsResource(_Authenticated):
    """The objects refused because their UID or Message-ID was already held, newest first
    (``?limit=``, at most 1000)."""

    isLeaf = True

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        admin = await self.admin(request)
        raw = request.args.get(b"limit", [b"100"])[0]
        if not raw.isdigit() or not 0 < int(raw) <= 1000:
            raise Problem(400, "limit is a whole number from 1 to 1000", kind="invalid")
        found = await self.central.ingest.index.conflicts(int(raw))
        await self.record(request, "query", user=admin, credential=admin, detail=f"GET /api/conflicts: {len(found)}")
        return json_response(200, [
            {**dataclasses.asdict(c), "refused_at": c.refused_at.isoformat()} for c in found])


class QuarantineResource(_Authenticated):
    def getChild(self, path, request):
        if path == b"":
            return self
        try:
            return QuarantineEntryResource(self.central, int(path))
        except ValueError:
            return super().getChild(path, request)

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        admin = await self.admin(request)
        state = request.args.get(b"state", [b"held"])[0].decode() or None
        entries = await self.storage.routing.quarantined(None if state == "all" else state)
        await self.record(request, "query", user=admin, credential=admin,
                          detail=f"GET /api/quarantine: {len(entries)}")
        return json_response(200, [quarantine_json(e) for e in entries])


class QuarantineEntryResource(_Authenticated):
    def __init__(self, central, entry_id: int):
        super().__init__(central)
        self.entry_id = entry_id

    def getChild(self, path, request):
        if path in (b"route", b"reject"):
            return QuarantineAction(self.central, self.entry_id, path.decode())
        return super().getChild(path, request)


class QuarantineAction(_Authenticated):
    isLeaf = True

    def __init__(self, central, entry_id: int, action: str):
        super().__init__(central)
        self.entry_id = entry_id
        self.action = action

    def render_POST(self, request):
        return render_async(request, self._post)

    async def _post(self, request) -> Response:
        admin = await self.admin(request)
        body = await _json_body(request, self.central)
        try:
            if self.action == "route":
                if not body.get("to"):
                    raise Problem(400, 'route needs {"to": "<viewer address>"}', kind="invalid")
                await routing.correct_route(self.storage.routing, self.entry_id, body["to"], admin)
            else:
                if not body.get("reason"):
                    raise Problem(400, 'reject needs {"reason": "..."}', kind="invalid")
                await self.storage.routing.reject(self.entry_id, body["reason"], admin)
        except CorrectionError as e:
            raise Problem(409, str(e), kind="correction-refused") from e
        self.central.routing.kick()
        return json_response(200, {"id": self.entry_id, "state": "released" if self.action == "route" else "rejected"})


class _Collection(_Authenticated):
    """A directory collection of the admin API: GET lists it, POST adds to it."""

    def render_GET(self, request):
        return render_async(request, self._list)

    def render_POST(self, request):
        return render_async(request, self._add)


class ViewersResource(_Collection):
    async def _list(self, request) -> Response:
        await self.admin(request)
        viewers = await self.storage.directory.viewers()
        return json_response(200, [dataclasses.asdict(v) for v in viewers])

    async def _add(self, request) -> Response:
        admin = await self.admin(request)
        body = await _json_body(request, self.central)
        try:
            added = await self.storage.directory.add_viewer(body.get("address", ""), body.get("push"),
                                                            body.get("authorise", []))
        except DirectoryError as e:
            raise Problem(409, str(e), kind="directory") from e
        await credential_change(self.central.audit, "viewer token issued", added.viewer.address, action="C", admin=admin,
                                peer=client_ip(request), transport="http")
        return json_response(201, {**dataclasses.asdict(added.viewer), "token": added.token})


def _centre_json(centre) -> dict:
    return {"name": centre.name, "ae": [v for k, v in centre.aliases if k == "ae"], "address": list(centre.addresses),
            "network": list(centre.networks), "token": centre.has_token,
            "client_cert_sha256": centre.client_cert_sha256}


class CentresResource(_Collection):
    """GET lists centres; POST ``{"name", "ae": [...], "address": [...], "network": [...], "token": true}``
    adds one (or more ways to recognise it) and, with ``token``, answers its new token once."""

    async def _list(self, request) -> Response:
        await self.admin(request)
        return json_response(200, [_centre_json(c) for c in await self.storage.directory.centres()])

    async def _add(self, request) -> Response:
        admin = await self.admin(request)
        body = await _json_body(request, self.central)
        lists = {key: body.get(key, []) for key in ("ae", "address", "network")}
        if not body.get("name") or not all(isinstance(v, list) for v in lists.values()):
            raise Problem(400, 'a centre needs {"name": …} and lists for "ae", "address", "network"', kind="invalid")
        try:
            added = await self.storage.directory.add_centre(body["name"], lists["ae"], lists["address"], lists["network"],
                                                            token=bool(body.get("token")))
        except DirectoryError as e:
            raise Problem(409, str(e), kind="directory") from e
        if added.token:
            await credential_change(self.central.audit, "centre token issued", added.centre.name, action="C", admin=admin,
                                    peer=client_ip(request), transport="http")
        return json_response(201, {**_centre_json(added.centre), **({"token": added.token} if added.token else {})})


class RoutesResource(_Collection):
    async def _list(self, request) -> Response:
        await self.admin(request)
        rules = await self.storage.directory.rules()
        return json_response(200, [dataclasses.asdict(r) for r in rules])

    async def _add(self, request) -> Response:
        await self.admin(request)
        body = await _json_body(request, self.central)
        try:
            rule = await self.storage.directory.add_rule(body.get("to", ""), body.get("centre", ""),
                                                         body.get("modality", ""), body.get("type", ""))
        except DirectoryError as e:
            raise Problem(400, str(e), kind="invalid") from e
        self.central.routing.kick()
        return json_response(201, dataclasses.asdict(rule))


# -- /api/audit -----------------------------------------------------------------------------------------

AUDIT_PAGE = 100
AUDIT_MAX_PAGE = 1000


def audit_filter(args: dict[str, str]) -> AuditFilter:
    """The filter of ``GET /api/audit`` (and ``medd audit``): ``since``, ``until`` (ISO 8601), ``patient``,
    ``user``, ``event``, ``after`` (the last id of the previous page); ValueError names the bad one."""
    from medd.audit import EVENTS

    def when(key):
        if not args.get(key):
            return None
        try:
            return audit_time(args[key])
        except ValueError:
            raise ValueError(f"{key}={args[key][:40]!r} is not an ISO 8601 date or time") from None

    event = args.get("event") or None
    if event is not None and event not in EVENTS:
        raise ValueError(f"event={event[:40]!r} is none of {', '.join(EVENTS)}")
    after = args.get("after") or "0"
    if not after.isdigit() or len(after) > 18:
        raise ValueError(f"after={after[:40]!r} is not a record id")
    return AuditFilter(since=when("since"), until=when("until"), patient_id=args.get("patient") or None,
                       user=args.get("user") or None, event=event, after_id=int(after))


class AuditResource(_Authenticated):
    """``GET /api/audit?since=&until=&patient=&user=&event=&after=&limit=``: the audit trail, oldest first,
    a page of at most ``limit`` (100, at most 1000); ``next`` is the URL of the next page."""

    isLeaf = True
    KEYS = ("since", "until", "patient", "user", "event", "after", "limit")

    def render_GET(self, request):
        return render_async(request, self._list)

    async def _list(self, request) -> Response:
        admin = await self.admin(request)
        args = {k.decode("latin-1"): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        unknown = sorted(set(args) - set(self.KEYS))
        if unknown:
            raise Problem(400, f"unknown query key {unknown[0][:40]!r}; supported: {', '.join(self.KEYS)}", kind="invalid")
        raw = args.get("limit") or str(AUDIT_PAGE)
        if not raw.isdigit() or not 0 < int(raw) <= AUDIT_MAX_PAGE:
            raise Problem(400, f"limit is a whole number from 1 to {AUDIT_MAX_PAGE}", kind="invalid")
        try:
            where = audit_filter(args)
        except ValueError as e:
            raise Problem(400, str(e), kind="invalid") from e
        records = await self.central.audit.search(where, int(raw))
        # Reading the trail is itself an access (ATNA "Audit Log Used" is a query of it).
        await self.record(request, "query", user=admin, credential=admin, patient_id=where.patient_id,
                          detail=f"GET /api/audit: {len(records)} records")
        body = {"records": [record_json(r) for r in records], "next": None}
        if len(records) == int(raw):
            body["next"] = "/api/audit?" + urlencode({**{k: v for k, v in args.items() if v}, "after": records[-1].id})
        return json_response(200, body)


def central_resources(storage: CentralStorage, routing: RoutingService, ingest: Ingest,
                      audit: AuditTrail, client_ca: tuple[str, str] | None = None) -> dict[bytes, Resource]:
    """``client_ca``: ([tls] client_ca, client_ca_key) when this node may issue client certificates."""
    from medd.central.console import ConsoleResource

    central = CentralWeb(storage, routing, ingest, audit)
    return {b"outbox": OutboxResource(central), b"api": ApiResource(central),
            b"console": ConsoleResource(storage, routing, ingest, audit, storage.clock, client_ca=client_ca)}
