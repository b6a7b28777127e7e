"""Central's administrator console at ``/console``: log in with an administrator's name and token (or the
password of ``medd admins password``), see
the quarantine and correct it (route to an authorised viewer, or reject), one or many at once, and the
queues (what waits for each viewer and centre, the oldest, the last error; retry now), tracking (search,
paged; an object's timeline) and the directory: centres, viewers, authorisations and routing rules added
and removed, credentials issued, rotated and revoked (tokens shown once; a client certificate, where
``[tls] client_ca_key`` is configured, offered once as a PEM download). Logins go through a
:class:`~medd.throttling.LoginThrottle`, as the reading room's do.

Plain HTML forms, no script. The session is an HttpOnly, SameSite=Strict cookie for ``/console``; every
POST but the login carries the session's CSRF token and is refused from another origin. Sessions live
in the node's memory: they end when the node restarts, and each central node has its own.
Every correction goes through the same storage calls as ``POST /api/quarantine/{id}/route|reject``,
which record the administrator and the time; every directory change is an audit record naming the
administrator ("credential" for credentials and authorisations, "directory" for centres, viewers and rules).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.web.resource import Resource
from twisted.web.template import Tag, flattenString, tags

from medd.audit import MINOR_FAILURE, SERIOUS_FAILURE
from medd.storage.connector import aware
from medd.storage.directory import DirectoryError
from medd.storage.routing import CorrectionError
from medd.throttling import LoginThrottle
from medd.webresource import Response, client_ip, read_body, render_async

COOKIE = b"medd_console"
SESSION_SECONDS = 8 * 3600
MAX_FORM = 64 * 1024
PAGE = 200  # tracking rows per page
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1f24}
table{border-collapse:collapse;margin:1rem 0}th,td{border-bottom:1px solid #d0d7de;padding:.35rem .6rem;text-align:left}
th{background:#f6f8fa}.flash{background:#dafbe1;padding:.5rem}.error{background:#ffebe9;padding:.5rem}
header{display:flex;gap:1rem;align-items:baseline}header form{margin-left:auto}nav a{margin:0 .3rem}
form.inline{display:inline;margin-right:.3rem}form.add{margin:.5rem 0}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


class ConsoleSessions:
    """Logged-in administrators by session token, each for :data:`SESSION_SECONDS` from its last use."""

    def __init__(self, clock):
        self.clock = clock
        self._sessions: dict[str, tuple[str, float]] = {}

    def start(self, admin: str) -> str:
        token = secrets.token_urlsafe(32)
        self._sessions[token] = (admin, self.clock.seconds() + SESSION_SECONDS)
        return token

    def admin(self, token: str | None) -> str | None:
        found = self._sessions.get(token or "")
        if found is None:
            return None
        admin, until = found
        if until < self.clock.seconds():
            del self._sessions[token]
            return None
        self._sessions[token] = (admin, self.clock.seconds() + SESSION_SECONDS)
        return admin

    def end(self, token: str | None) -> None:
        self._sessions.pop(token or "", None)


def csrf_of(token: str) -> str:
    return hmac.new(token.encode("ascii"), b"medd console csrf", hashlib.sha256).hexdigest()


async def _page(status: int, title: str, *content, headers: dict | None = None) -> Response:
    doc = tags.html(tags.head(tags.meta(charset="utf-8"), tags.title(f"{title} - medd console"),
                              tags.style(STYLE)), tags.body(*content))
    body = b"<!DOCTYPE html>\n" + await flattenString(None, doc)
    return Response(status, "text/html; charset=utf-8", body,
                    {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                     "Referrer-Policy": "no-referrer", **(headers or {})})


def _see_other(location: str) -> Response:
    return Response(303, "text/plain; charset=utf-8", b"", {"Location": location})


def _age(created: datetime, now: datetime) -> str:
    seconds = max(0, int((now - created).total_seconds()))
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


class ConsoleResource(Resource):
    """``/console``: the quarantine page (``GET /console/``), ``POST /console/login``, ``/logout``, ``/quarantine``."""

    def __init__(self, storage, routing, ingest, audit, clock, *, client_ca: tuple[str, str] | None = None):
        super().__init__()
        self.storage, self.routing, self.ingest, self.audit = storage, routing, ingest, audit
        self.sessions = ConsoleSessions(clock)
        self.login_throttle = LoginThrottle(clock)
        self.client_ca = client_ca  # ([tls] client_ca, client_ca_key): the console may issue certificates

    def getChild(self, path, request):
        if path in (b"", b"login", b"logout", b"quarantine", b"queues", b"tracking",
                    b"directory") and not request.postpath:
            return _Action(self, path.decode("ascii"))
        return _Action(self, "missing")

    def render_GET(self, request):
        # /console without its slash: the page's relative links want /console/.
        request.setResponseCode(303)
        request.setHeader(b"location", b"/console/")
        return b""


class _Action(Resource):
    isLeaf = True

    def __init__(self, console: ConsoleResource, name: str):
        super().__init__()
        self.console = console
        self.name = name

    def render_GET(self, request):
        return render_async(request, self._get)

    def render_POST(self, request):
        return render_async(request, self._post)

    # -- sessions and forms ---------------------------------------------------------------------

    def _admin(self, request) -> tuple[str | None, str | None]:
        token = (request.getCookie(COOKIE) or b"").decode("ascii", "replace")
        return self.console.sessions.admin(token), token

    async def _form(self, request) -> dict[str, list[str]]:
        if (request.getHeader("content-type") or "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise _Refused(415, "this form must be sent as application/x-www-form-urlencoded")
        body = await self.console.ingest.run_blocking(read_body, request.content)
        if len(body) > MAX_FORM:
            raise _Refused(413, "the form is too large")
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

    @staticmethod
    def _same_origin(request) -> bool:
        origin = request.getHeader("origin")
        return not origin or origin == "null" or urlsplit(origin).netloc.lower() == (request.getHeader("host") or "").lower()

    # -- GET ------------------------------------------------------------------------------------

    async def _get(self, request) -> Response:
        if self.name not in ("", "queues", "tracking", "directory"):
            return await _page(404, "Not found", tags.p("No such page. ", tags.a("The console", href="/console/")))
        admin, token = self._admin(request)
        if admin is None:
            return await self._login_form(200)
        try:
            if self.name == "queues":
                return await self._queues_page(request, admin, token)
            if self.name == "tracking":
                return await self._tracking_page(request, admin, token)
            if self.name == "directory":
                return await self._directory_page(request, admin, token)
            return await self._quarantine_page(request, admin, token)
        except _Refused as e:
            return await self._refused(e)

    @staticmethod
    async def _refused(e: "_Refused") -> Response:
        return await _page(e.status, "Refused", tags.p(e.message, class_="error"),
                           tags.p(tags.a("Back to the console", href="/console/")))

    @staticmethod
    def _header(title: str, admin: str, csrf, detail: str) -> Tag:
        return tags.header(tags.h1(title), tags.span(detail),
                           tags.nav(tags.a("Quarantine", href="/console/"), " · ", tags.a("Queues", href="/console/queues"),
                                    " · ", tags.a("Tracking", href="/console/tracking"),
                                    " · ", tags.a("Directory", href="/console/directory")),
                           tags.form(csrf, tags.span(f"{admin} "), tags.button("Log out", type="submit"),
                                     method="post", action="/console/logout"))

    async def _tracking_page(self, request, admin: str, token: str) -> Response:
        from medd.storage.tracking import SEARCH_STATES

        args = {k.decode("ascii", "replace"): v[0].decode("utf-8", "replace").strip() for k, v in request.args.items()}
        csrf = tags.input(type="hidden", name="csrf", value=csrf_of(token))
        if args.get("uid"):
            return await self._timeline(admin, csrf, args["uid"])
        fields = [("patient", "patient ID"), ("accession", "accession"), ("centre", "centre"), ("viewer", "viewer"),
                  ("since", "from (YYYY-MM-DD)"), ("until", "to (YYYY-MM-DD)"), ("hours", "overdue after hours")]
        form = tags.form(*[tags.label(f"{label} ", tags.input(name=name, value=args.get(name, ""), size="14"), " ")
                           for name, label in fields],
                         tags.label("state ", tags.select(tags.option("any", value=""), *[
                             tags.option(st, value=st, selected="selected") if args.get("state") == st else
                             tags.option(st, value=st) for st in SEARCH_STATES], name="state")),
                         " ", tags.button("Search", type="submit"), method="get", action="/console/tracking")
        try:
            since = _day(args.get("since"))
            until = _day(args.get("until"), end=True)
            hours = float(args.get("hours") or 24)
            before = int(args["before"]) if args.get("before") else None
        except ValueError:
            raise _Refused(400, "dates are YYYY-MM-DD and hours a number")
        now = datetime.now(timezone.utc)
        rows = await self.console.storage.tracking.search(
            centre=args.get("centre", ""), viewer=args.get("viewer", ""), patient=args.get("patient", ""),
            accession=args.get("accession", ""), since=since, until=until, state=args.get("state", ""),
            overdue_before=now - timedelta(hours=hours), limit=PAGE + 1, before=before)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        # The next page continues below this one's last row, with the same search.
        following = tags.p(tags.a("Next page", href="/console/tracking?" + urlencode(
            {**{k: v for k, v in args.items() if v and k != "before"}, "before": rows[-1].id}), class_="next")) \
            if more else ""
        earlier = tags.p(tags.a("First page", href="/console/tracking?" + urlencode(
            {k: v for k, v in args.items() if v and k != "before"}))) if before is not None else ""
        table = tags.table(tags.tr(*[tags.th(h) for h in ("received", "centre", "patient", "accession", "modality",
                                                          "routing", "deliveries", "object")]), *[
            tags.tr(tags.td(f"{r.received_at:%Y-%m-%d %H:%M}"), tags.td(r.centre or ""), tags.td(r.patient_id or ""),
                    tags.td(r.accession_number or ""), tags.td(r.modality or ""), tags.td(r.outcome or "not yet"),
                    tags.td("; ".join(f"{dest}: {state}" for dest, state in r.deliveries)),
                    tags.td(tags.a(r.uid, href="/console/tracking?uid=" + quote(r.uid))), class_="found")
            for r in rows]) if rows else tags.p("Nothing found.", class_="empty")
        await self.console.audit.record("query", user=admin, credential="console session", peer=client_ip(request),
                                        transport="http", patient_id=args.get("patient") or None,
                                        detail=f"console tracking: {len(rows)}")
        shown = f"{len(rows)} found" + (" (more on the next page)" if more else "")
        return await _page(200, "Tracking", self._header("Tracking", admin, csrf, shown), form, table, following,
                           earlier)

    async def _timeline(self, admin: str, csrf, uid: str) -> Response:
        history = await self.console.storage.tracking.object_history(uid)
        if history is None:
            raise _Refused(404, "no such object")
        o = history.object
        events = [(r.received_at, f"received over {r.receipt.transport or '?'} from {r.receipt.origin}")
                  for r in history.received] or [(o.received_at, f"received over {o.transport} from {o.origin}")]
        if history.routing is not None:
            events.append((history.routing.decided_at, f"{history.routing.outcome} (centre {history.routing.centre or '?'})"))
        for q in history.quarantine:
            events.append((q.created_at, f"quarantined: {q.reason}"))
            events += [(c.at, f"{c.action} by {c.admin}" + (f" to {c.new_route}" if c.new_route else "")
                        + (f": {c.reason}" if c.reason else "")) for c in q.corrections]
        for d in history.deliveries:
            events += [(e.at, f"{d.destination}: {e.state}" + (f" ({e.detail})" if e.detail else ""))
                       for e in d.history]
        events += [(st.received_at, f"{st.event} by {st.user or '?'} at {st.origin}") for st in history.status]
        events += [(r.received_at, f"report {r.uid} from {r.origin}") for r in history.reports]
        events = sorted(((aware(at), what) for at, what in events), key=lambda e: e[0])
        return await _page(200, "Timeline", self._header("Timeline", admin, csrf, uid),
                           tags.p(f"Patient {o.patient_id or '?'}, study {o.study_instance_uid or '?'}, "
                                  f"{o.modality or '?'}"),
                           tags.ol(*[tags.li(f"{at:%Y-%m-%d %H:%M:%S} ", what, class_="event") for at, what in events]))

    async def _directory_page(self, request, admin: str, token: str, issued: tuple[str, str] | None = None) -> Response:
        directory = self.console.storage.directory
        centres, viewers, rules = await directory.centres(), await directory.viewers(), await directory.rules()
        readers, admins = await directory.readers(), await directory.admins()
        csrf = tags.input(type="hidden", name="csrf", value=csrf_of(token))
        certificates = self.console.client_ca is not None

        def heads(*names):
            return tags.tr(*[tags.th(n) for n in names])

        def act(label: str, action: str, **fields):
            """A one-button form posting ``action`` with ``fields`` to /console/directory."""
            return tags.form(csrf.clone(), tags.input(type="hidden", name="action", value=action),
                             *[tags.input(type="hidden", name=k, value=v) for k, v in fields.items()],
                             tags.button(label, type="submit"), method="post", action="/console/directory",
                             class_="inline")

        def field(label: str, name: str, size: str = "18", **extra):
            return tags.label(f"{label} ", tags.input(name=name, size=size, **extra), " ")

        def adder(action: str, label: str, *fields):
            return tags.form(csrf.clone(), tags.input(type="hidden", name="action", value=action), *fields,
                             tags.button(label, type="submit"), method="post", action="/console/directory",
                             class_="add")

        def centre_actions(c):
            if not c.addresses:  # a credential authenticates a centre's package address
                return [act("Remove", "centre-remove", name=c.name)]
            return [act("New token", "centre-token", name=c.name),
                    act("Revoke token", "centre-token-revoke", name=c.name) if c.has_token else "",
                    act("New certificate", "centre-cert", name=c.name) if certificates else "",
                    act("Revoke certificate", "centre-cert-revoke", name=c.name) if c.client_cert_sha256 else "",
                    act("Remove", "centre-remove", name=c.name)]

        centre_rows = [tags.tr(tags.td(c.name), tags.td(" ".join(v for k, v in c.aliases if k == "ae")), tags.td(" ".join(c.addresses)),
                               tags.td(" ".join(c.networks)), tags.td("token" if c.has_token else "",
                                                                      " certificate" if c.client_cert_sha256 else ""),
                               tags.td(*centre_actions(c)), class_="centre") for c in centres]
        viewer_rows = [tags.tr(tags.td(v.address), tags.td(v.mode), tags.td(v.push_url or ""),
                               tags.td(*[tags.span(scope, " ", act("Revoke", "revoke", viewer=v.address, scope=scope),
                                                   " ") for scope in v.authorisations]),
                               tags.td(act("New token", "viewer-token", address=v.address),
                                       act("Revoke token", "viewer-token-revoke", address=v.address),
                                       act("New certificate", "viewer-cert", address=v.address) if certificates else "",
                                       act("Revoke certificate", "viewer-cert-revoke", address=v.address)
                                       if certificates else "",
                                       act("Remove", "viewer-remove", address=v.address)), class_="viewer")
                       for v in viewers]
        rule_rows = [tags.tr(tags.td(str(r.id)), tags.td(r.centre or "any"), tags.td(r.modality or "any"),
                             tags.td(r.object_type or "any"), tags.td(r.destination),
                             tags.td(act("Remove", "rule-remove", rule=str(r.id))), class_="rule") for r in rules]
        reader_rows = [tags.tr(tags.td(r.name), tags.td(r.scope),
                               tags.td("token" if r.has_token else "", " certificate" if r.client_cert_sha256 else ""),
                               tags.td(act("Revoke", "reader-revoke", name=r.name)), class_="reader") for r in readers]
        admin_rows = [tags.tr(tags.td(name), tags.td(act("New token", "admin-token", name=name),
                                                     act("Remove", "admin-remove", name=name) if name != admin else ""),
                              class_="admin") for name in admins]
        done = (request.args.get(b"done") or [b""])[0].decode("utf-8", "replace")
        return await _page(200, "Directory", self._header("Directory", admin, csrf, ""),
                           tags.p("New token for ", tags.strong(issued[0]), ": ", tags.code(issued[1], class_="token"),
                                  " (shown once; any old one no longer works)", class_="flash") if issued else "",
                           tags.p(done, class_="flash") if done else "",
                           tags.h2("Centres"), tags.table(heads("name", "AE titles", "addresses", "networks",
                                                               "credentials", ""), *centre_rows),
                           adder("centre-add", "Add centre", field("name", "name"),
                                 field("AE titles", "aes", placeholder="CT1 MR1"),
                                 field("addresses", "addresses", "24", placeholder="pacs@centre.example"),
                                 field("networks", "networks", placeholder="10.1.2.0/24"),
                                 tags.label(tags.input(type="checkbox", name="token", value="1"), " with a token ")),
                           tags.h2("Viewers"), tags.table(heads("address", "mode", "push to", "authorised for",
                                                                "credentials"), *viewer_rows),
                           adder("viewer-add", "Add viewer", field("address", "address", "24"),
                                 field("push URL (empty: pull)", "push", "24"),
                                 field("authorised for", "scopes", placeholder="centre-a:CT centre-b")),
                           adder("authorise", "Authorise", field("viewer", "viewer", "24"),
                                 field("for (centre or centre:modality)", "scope")),
                           tags.h2("Routing rules"), tags.table(heads("#", "centre", "modality", "type", "to", ""),
                                                                *rule_rows),
                           adder("rule-add", "Add rule", field("centre", "centre"), field("modality", "modality", "6"),
                                 field("object type", "object_type", "10"), field("to", "destination", "24")),
                           tags.h2("Readers (DICOMweb, read only)"),
                           tags.table(heads("name", "scope", "credentials", ""), *reader_rows),
                           tags.form(csrf.clone(), field("name", "name"),
                                     tags.button("Add with a token", type="submit", name="action",
                                                 value="reader-add-token"), " ",
                                     tags.button("Add with a certificate", type="submit", name="action",
                                                 value="reader-add-cert") if certificates else "",
                                     method="post", action="/console/directory", class_="add"),
                           tags.h2("Administrators"), tags.table(heads("name", ""), *admin_rows),
                           adder("admin-add", "Add administrator", field("name", "name")),
                           tags.p("A console password: medd admins password NAME."))

    async def _queues_page(self, request, admin: str, token: str) -> Response:
        queues = await self.console.storage.deliveries.queues()
        now = datetime.now(timezone.utc)
        csrf = tags.input(type="hidden", name="csrf", value=csrf_of(token))
        rows = [tags.tr(tags.td(q.destination), tags.td(str(q.waiting)), tags.td(_age(q.oldest, now) if q.oldest else ""),
                        tags.td(str(q.failed)), tags.td(q.last_error or ""),
                        tags.td(tags.form(csrf.clone(), tags.input(type="hidden", name="destination", value=q.destination),
                                          tags.button("Retry now", type="submit"), method="post",
                                          action="/console/queues") if q.failed else ""), class_="queue")
                for q in queues]
        table = tags.table(tags.tr(*[tags.th(h) for h in ("destination", "waiting", "oldest", "failed", "last error",
                                                          "")]), *rows) if rows else tags.p("Nothing waits.",
                                                                                            class_="empty")
        done = (request.args.get(b"done") or [b""])[0].decode("utf-8", "replace")
        return await _page(200, "Queues", self._header("Queues", admin, csrf, f"{len(queues)} destinations waiting"),
                           tags.p(done, class_="flash") if done else "", table)

    async def _login_form(self, status: int, message: str | None = None) -> Response:
        return await _page(status, "Log in", tags.h1("medd central console"),
                           tags.p(message, class_="error") if message else "",
                           tags.form(tags.label("Administrator ", tags.input(name="name", autocomplete="username")),
                                     " ", tags.label("Token or password ", tags.input(name="token", type="password",
                                                                          autocomplete="current-password")),
                                     " ", tags.button("Log in", type="submit"),
                                     method="post", action="/console/login"))

    async def _quarantine_page(self, request, admin: str, token: str) -> Response:
        entries = await self.console.storage.routing.quarantined("held")
        directory = self.console.storage.directory
        now = datetime.now(timezone.utc)
        rows = []
        for e in entries:
            choices = await directory.authorised_viewers(e.centre, e.modality)
            select = tags.select(tags.option("(choose a viewer)", value=""),
                                 *[tags.option(v, value=v) for v in choices], name=f"to-{e.id}",
                                 **{"aria-label": f"route {e.id} to"})
            rows.append(tags.tr(
                tags.td(tags.input(type="checkbox", name="id", value=str(e.id), **{"aria-label": f"select {e.id}"})),
                tags.td(str(e.id)), tags.td(e.centre or f"(unknown: {e.origin or '?'})"), tags.td(e.patient_id or ""),
                tags.td(e.study_instance_uid or ""), tags.td(e.modality or ""), tags.td(e.reason),
                tags.td(_age(e.created_at, now)), tags.td(select if choices else "no authorised viewer"),
                class_="entry"))
        done = (request.args.get(b"done") or [b""])[0].decode("utf-8", "replace")
        csrf = tags.input(type="hidden", name="csrf", value=csrf_of(token))
        table = tags.table(tags.tr(*[tags.th(h) for h in ("", "#", "centre", "patient", "study", "modality", "reason",
                                                          "age", "route to")]), *rows) if rows else tags.p(
            "Nothing is held in quarantine.", class_="empty")
        await self.console.audit.record("query", user=admin, credential="console session", peer=client_ip(request),
                                        transport="http", detail=f"console quarantine: {len(entries)}")
        return await _page(200, "Quarantine", self._header("Quarantine", admin, csrf, f"{len(entries)} held"),
                           tags.p(done, class_="flash") if done else "",
                           tags.form(csrf.clone(), table,
                                     tags.p(tags.button("Route selected", type="submit", name="action", value="route"),
                                            " or ", tags.input(name="reason", placeholder="reason for rejecting",
                                                               **{"aria-label": "reason"}),
                                            " ", tags.button("Reject selected", type="submit", name="action",
                                                             value="reject")),
                                     method="post", action="/console/quarantine"))

    # -- POST -----------------------------------------------------------------------------------

    async def _post(self, request) -> Response:
        try:
            if not self._same_origin(request):
                raise _Refused(403, "this form was sent from another site; open the console directly")
            form = await self._form(request)
            if self.name == "login":
                return await self._login(request, form)
            admin, token = self._admin(request)
            if admin is None:
                return await self._login_form(401, "Your session has ended; log in again.")
            sent = (form.get("csrf") or [""])[0]
            if not hmac.compare_digest(sent.encode("utf-8", "replace"), csrf_of(token).encode("ascii")):
                raise _Refused(403, "this form has expired or did not come from the console; reload and try again")
            if self.name == "logout":
                self.console.sessions.end(token)
                await self.console.audit.record("logout", user=admin, credential="console session",
                                                peer=client_ip(request), transport="http")
                request.addCookie(COOKIE, b"", path=b"/console", httpOnly=True, sameSite="strict", max_age=b"0")
                return _see_other("/console/")
            if self.name == "quarantine":
                return await self._correct(admin, form)
            if self.name == "directory":
                return await self._change_directory(request, admin, token, form)
            if self.name == "queues":
                destination = (form.get("destination") or [""])[0]
                count = await self.console.storage.deliveries.retry_now(destination, admin)
                self.console.routing.kick()
                return _see_other("/console/queues?done=" + quote(f"{count} deliveries to {destination} retried now."))
            raise _Refused(404, "no such action")
        except _Refused as e:
            return await self._refused(e)

    async def _login(self, request, form) -> Response:
        name = (form.get("name") or [""])[0].strip()
        token = (form.get("token") or [""])[0].strip()
        peer = client_ip(request)
        wait = self.console.login_throttle.attempt(name, peer)
        if wait:
            # Refused before the token is checked: while throttled, the right one does not work either.
            await self.console.audit.record("auth-refused", user=name or None, credential="admin token", peer=peer,
                                            transport="http", outcome=SERIOUS_FAILURE,
                                            detail=f"console login throttled for {wait} s")
            response = await self._login_form(429, f"Too many failed logins for this name or from this computer. "
                                                   f"Wait {wait} s and try again.")
            response.headers["Retry-After"] = str(wait)
            return response
        credential = await self._check_admin(name, token)
        if credential is None:
            await self.console.audit.record("login", user=name or None, credential="admin token or password",
                                            peer=peer, transport="http", outcome=MINOR_FAILURE,
                                            detail="console: wrong administrator name, token or password")
            return await self._login_form(401, "Wrong administrator name, token or password.")
        self.console.login_throttle.succeeded(name, peer)
        session = self.console.sessions.start(name)
        await self.console.audit.record("login", user=name, credential=credential, peer=peer, transport="http",
                                        detail="console")
        request.addCookie(COOKIE, session.encode("ascii"), path=b"/console", httpOnly=True, sameSite="strict",
                          secure=request.isSecure() or None)
        return _see_other("/console/")

    async def _check_admin(self, name: str, secret: str) -> str | None:
        """"admin token" or "password" when ``secret`` is administrator ``name``'s token or console password
        (`medd admins password`), else None. The scrypt check runs in a thread."""
        from medd.passwords import check_hash

        if not name or not secret:
            return None
        directory = self.console.storage.directory
        principal = await directory.principal(secret)
        if principal is not None and principal.kind == "admin" and principal.name == name:
            return "admin token"
        stored = await directory.admin_password_hash(name)
        ok = await self.console.ingest.run_blocking(check_hash, stored, secret)
        return "password" if ok else None

    async def _change_directory(self, request, admin: str, token: str, form) -> Response:
        """One directory change from the Directory page's forms, recorded with ``admin``; a DirectoryError is
        refused (409) with its message and changes nothing."""
        from medd.audit import credential_change

        def one(name: str) -> str:
            return (form.get(name) or [""])[0].strip()

        def many(name: str) -> list[str]:
            return one(name).replace(",", " ").split()

        action, directory, peer = one("action"), self.console.storage.directory, client_ip(request)

        async def credential(what: str, account: str, code: str) -> None:
            await credential_change(self.console.audit, f"{what} (console)", account, action=code, admin=admin,
                                    peer=peer, transport="http")

        async def credited(what: str, account: str, code: str, done: str) -> Response:
            await credential(what, account, code)
            return _see_other("/console/directory?done=" + quote(done))

        async def changed(what: str, code: str) -> Response:
            await self.console.audit.record("directory", action=code, user=admin, credential="console session",
                                            peer=peer, transport="http", detail=f"{what} (console)")
            return _see_other("/console/directory?done=" + quote(what[0].upper() + what[1:] + "."))

        try:
            if action == "centre-add":
                if not one("name"):
                    raise _Refused(400, "a centre needs a name")
                if await directory.centre(one("name")) is not None:
                    raise _Refused(409, f"centre {one('name')} exists; remove it first to change it")
                added = await directory.add_centre(one("name"), many("aes"), many("addresses"), many("networks"),
                                                   token=bool(one("token")))
                response = await changed(f"centre {added.centre.name} added", "C")
                if added.token:
                    await credential("centre token issued", added.centre.name, "C")
                    return await self._directory_page(request, admin, token, issued=(added.centre.name, added.token))
                return response
            if action == "centre-remove":
                await directory.remove_centre(one("name"))
                await credential("centre removed: its token and certificate revoked", one("name"), "D")
                return await changed(f"centre {one('name')} removed", "D")
            if action == "centre-token":
                if await directory.centre(one("name")) is None:
                    raise _Refused(404, "no such centre")
                issued = await directory.add_centre(one("name"), token=True)
                await credential("centre token issued", one("name"), "U")
                return await self._directory_page(request, admin, token, issued=(one("name"), issued.token))
            if action == "centre-token-revoke":
                await directory.revoke_centre_token(one("name"))
                return await credited("centre token revoked", one("name"), "D",
                                      f"Centre {one('name')}'s token revoked.")
            if action == "centre-cert":
                centre = await directory.centre(one("name"))
                if centre is None or not centre.address:
                    raise _Refused(404, "no such centre, or it has no address for a certificate to name")
                return await self._certificate(directory.centre_certificate, centre.name, centre.address, credential)
            if action == "centre-cert-revoke":
                await directory.centre_certificate(one("name"), None)
                return await credited("centre client certificate revoked", one("name"), "D",
                                      f"Centre {one('name')}'s certificate revoked.")
            if action == "viewer-add":
                added = await directory.add_viewer(one("address"), one("push") or None, many("scopes"))
                await credential("viewer added, token issued", added.viewer.address, "C")
                return await self._directory_page(request, admin, token, issued=(added.viewer.address, added.token))
            if action == "viewer-remove":
                await directory.remove_viewer(one("address"))
                return await credited("viewer removed: its token and certificate revoked", one("address"), "D",
                                      f"Viewer {one('address')} removed.")
            if action == "viewer-token":
                new = await directory.issue_viewer_token(one("address"))
                await credential("viewer token issued", one("address"), "U")
                return await self._directory_page(request, admin, token, issued=(one("address"), new))
            if action == "viewer-token-revoke":
                # A viewer always has a token (the column is required): a new one nobody is shown revokes it.
                await directory.issue_viewer_token(one("address"))
                return await credited("viewer token revoked", one("address"), "D",
                                      f"Viewer {one('address')}'s token revoked.")
            if action == "viewer-cert":
                viewer = await directory.viewer(one("address"))
                if viewer is None:
                    raise _Refused(404, "no such viewer")
                return await self._certificate(directory.viewer_certificate, viewer.address, viewer.address, credential)
            if action == "viewer-cert-revoke":
                await directory.viewer_certificate(one("address"), None)
                return await credited("viewer client certificate revoked", one("address"), "D",
                                      f"Viewer {one('address')}'s certificate revoked.")
            if action in ("authorise", "revoke"):
                await (directory.authorise if action == "authorise" else directory.revoke)(one("viewer"), one("scope"))
                what = f"{'authorised' if action == 'authorise' else 'no longer authorised'} for {one('scope')}"
                await credential(f"viewer {what}", one("viewer"), "U")
                return _see_other("/console/directory?done=" + quote(f"{one('viewer')} {what}."))
            if action == "reader-add-token":
                new = await directory.add_reader(one("name"), "read", token=True)
                await credential("reader added, token issued", new.reader.name, "C")
                return await self._directory_page(request, admin, token, issued=(new.reader.name, new.token))
            if action == "reader-add-cert":
                if not one("name"):
                    raise _Refused(400, "a reader needs a name")
                return await self._certificate(
                    lambda name, fingerprint: directory.add_reader(name, "read", client_certificate=fingerprint),
                    one("name"), f"reader:{one('name')}", credential)
            if action == "reader-revoke":
                await directory.revoke_reader(one("name"))
                return await credited("reader revoked: its token and certificate", one("name"), "D",
                                      f"Reader {one('name')} revoked.")
            if action in ("admin-add", "admin-token"):
                if action == "admin-add":
                    new = await directory.add_admin(one("name"))
                else:
                    new = await directory.issue_admin_token(one("name"))
                await credential("administrator token issued", one("name"), "C" if action == "admin-add" else "U")
                return await self._directory_page(request, admin, token, issued=(one("name"), new))
            if action == "admin-remove":
                if one("name") == admin:
                    raise _Refused(409, "you cannot remove yourself; another administrator can")
                await directory.remove_admin(one("name"))
                return await credited("administrator removed: token and password revoked", one("name"), "D",
                                      f"Administrator {one('name')} removed.")
            if action == "rule-add":
                if not one("destination"):
                    raise _Refused(400, "a rule needs a destination")
                rule = await directory.add_rule(one("destination"), one("centre"), one("modality"), one("object_type"))
                return await changed(f"routing rule {rule.id} added: {rule.centre or 'any'}/{rule.modality or 'any'}/"
                                     f"{rule.object_type or 'any'} to {rule.destination}", "C")
            if action == "rule-remove":
                if not one("rule").isdigit():
                    raise _Refused(400, "which rule?")
                await directory.remove_rule(int(one("rule")))
                return await changed(f"routing rule {one('rule')} removed", "D")
        except DirectoryError as e:
            raise _Refused(409, str(e)) from e
        raise _Refused(400, "unknown directory action")

    async def _certificate(self, record, account: str, common_name: str, credential) -> Response:
        """A new client certificate for ``account`` (CN ``common_name``) signed by the configured client CA,
        its fingerprint recorded (an older certificate stops working), sent once as a PEM download."""
        from medd.tlscert import issue_from_ca_files

        if self.console.client_ca is None:
            raise _Refused(409, "this node has no [tls] client_ca and client_ca_key to sign certificates with")
        pem, fingerprint = await self.console.ingest.run_blocking(issue_from_ca_files, *self.console.client_ca,
                                                                  common_name)
        await record(account, fingerprint)
        await credential("client certificate issued", account, "U")
        filename = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in account) + ".pem"
        return Response(200, "application/x-pem-file", pem,
                        {"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store",
                         "X-Content-Type-Options": "nosniff", "X-Certificate-SHA256": fingerprint})

    async def _correct(self, admin: str, form) -> Response:
        from medd.central.routing import correct_route

        action = (form.get("action") or [""])[0]
        ids = [int(i) for i in form.get("id", []) if i.isdigit()]
        if not ids:
            return _see_other("/console/?done=" + quote("Nothing was selected."))
        routing = self.console.storage.routing
        done, refused = 0, []
        for entry_id in ids:
            try:
                if action == "route":
                    to = (form.get(f"to-{entry_id}") or [""])[0]
                    if not to:
                        refused.append(f"#{entry_id}: choose a viewer")
                        continue
                    await correct_route(routing, entry_id, to, admin)
                elif action == "reject":
                    reason = (form.get("reason") or [""])[0].strip()
                    if not reason:
                        refused.append(f"#{entry_id}: give a reason")
                        continue
                    await routing.reject(entry_id, reason, admin)
                else:
                    raise _Refused(400, "unknown action")
                done += 1
            except CorrectionError as e:
                refused.append(f"#{entry_id}: {e}")
        if done:
            self.console.routing.kick()
        verb = "routed" if action == "route" else "rejected"
        message = f"{done} {verb}." + (f" Not done: {'; '.join(refused)}." if refused else "")
        return _see_other("/console/?done=" + quote(message))


def _day(text: str | None, *, end: bool = False) -> datetime | None:
    if not text:
        return None
    day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    return day + timedelta(days=1) if end else day


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
