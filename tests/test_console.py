"""Central's administrator console (/console): login, the quarantine, corrections, in Chromium."""
from __future__ import annotations

import io
import os

import pytest
import pytest_twisted
import requests
from sqlalchemy import text
from twisted.internet.threads import deferToThread

from medd.storage.directory import DirectoryError
from tests.conftest import listener_port, testdata
from tests.test_gateway import datasets
from tests.test_reading_room import _browser_or_skip, _drive

LISTEN = {"http": "tcp:0:interface=127.0.0.1"}
ALLOWED = "dr-ct@viewers.example"
OTHER = "dr-elsewhere@viewers.example"
PUSH = "dr-push@viewers.example"


async def _central_with_quarantine(make_central):
    """A central with three objects from centre-a held in quarantine (no route), a viewer authorised for
    centre-a's CT, one authorised for another centre only, and an administrator; (node, admin token)."""
    node = await make_central(LISTEN)
    directory = node.central_storage.directory
    await directory.add_centre("centre-a", aes=["CT1"])
    await directory.add_centre("centre-b", aes=["CT2"])
    await directory.add_viewer(ALLOWED, None, ["centre-a:CT"])
    await directory.add_viewer(OTHER, None, ["centre-b"])
    for name in ("CT_small.dcm", "rtdose.dcm", "MR_small.dcm"):
        await node.ingest.receive_dicom(testdata(name), transport="dicom", origin="CT1")
    await node.routing.kick()
    return node, await directory.add_admin("alice")


@pytest_twisted.ensureDeferred
async def test_console_quarantine_in_chromium(make_central):
    """Alice logs in with her token, sees the three held objects with centre, patient, study, modality and
    reason; the CT's route menu offers only the viewer authorised for centre-a's CT; she routes it there and
    rejects the other two at once with a reason; the database has the CT queued for that viewer, the
    others rejected, each correction by alice; the Queues page shows that viewer with one waiting; Tracking
    lists the three objects and the CT's timeline shows its correction by alice; on Directory she adds a
    routing rule (any centre's MR to the other viewer), which the page then lists."""
    _browser_or_skip()
    node, token = await _central_with_quarantine(make_central)
    held = await node.central_storage.routing.quarantined("held")
    assert len(held) == 3
    ct = next(e for e in held if e.modality == "CT")
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"
    shots = os.environ.get("MEDD_SCREENSHOTS")

    def scenario(page):
        page.goto("/console/")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_selector("tr.entry")
        rows = page.locator("tr.entry")
        assert rows.count() == 3
        text = page.inner_text("table")
        assert "centre-a" in text and ct.patient_id in text and ct.study_instance_uid in text
        offered = page.locator(f"select[name=to-{ct.id}] option").all_inner_texts()
        if shots:
            page.screenshot(path=os.path.join(shots, "console-quarantine.png"), full_page=True)
        page.check(f"input[name=id][value='{ct.id}']")
        page.select_option(f"select[name=to-{ct.id}]", ALLOWED)
        page.click("button[value=route]")
        page.wait_for_selector(".flash")
        routed = page.inner_text(".flash")
        for e in held:
            if e.id != ct.id:
                page.check(f"input[name=id][value='{e.id}']")
        page.fill("input[name=reason]", "wrong patient")
        page.click("button[value=reject]")
        page.wait_for_selector(".empty")
        rejected = page.inner_text(".flash")
        page.click("text=Queues")
        page.wait_for_selector("tr.queue")
        if shots:
            page.screenshot(path=os.path.join(shots, "console-queues.png"), full_page=True)
        queues = page.locator("tr.queue").all_inner_texts()
        page.click("text=Tracking")
        page.wait_for_selector("tr.found")
        if shots:
            page.screenshot(path=os.path.join(shots, "console-tracking.png"), full_page=True)
        found = page.locator("tr.found").count()
        page.click(f"a:text('{ct.uid}')")
        page.wait_for_selector("li.event")
        if shots:
            page.screenshot(path=os.path.join(shots, "console-timeline.png"), full_page=True)
        timeline = page.locator("li.event").all_inner_texts()
        page.click("text=Directory")
        page.wait_for_selector("tr.viewer")
        page.fill("form.add input[name=destination]", OTHER)
        page.fill("form.add input[name=modality]", "MR")
        page.click("text=Add rule")
        page.wait_for_selector("tr.rule")
        if shots:
            page.screenshot(path=os.path.join(shots, "console-directory.png"), full_page=True)
        return offered, routed, rejected, queues, found, timeline, page.locator("tr.rule").all_inner_texts()

    offered, routed, rejected, queues, found, timeline, rules = await deferToThread(_drive, base, scenario)
    assert len(rules) == 1 and rules[0].split("\t")[1:5] == ["any", "MR", "any", OTHER]
    assert found == 3
    assert "received over dicom from CT1" in timeline[0] and any("by alice" in e for e in timeline)
    assert len(queues) == 1 and queues[0].split("\t")[:2] == [ALLOWED, "1"]
    assert offered == ["(choose a viewer)", ALLOWED]
    assert routed == "1 routed." and rejected == "2 rejected."
    states = {e.id: e.state for e in await node.central_storage.routing.quarantined(None)}
    assert states == {e.id: ("released" if e.id == ct.id else "rejected") for e in held}
    assert [d.destination for d in await node.central_storage.deliveries.of_object(ct.uid)] == [ALLOWED]
    corrections = await node.database.run(
        lambda conn: conn.execute(text("SELECT quarantine_id, admin FROM corrections")).all())
    assert sorted(corrections) == sorted((e.id, "alice") for e in held)


@pytest_twisted.ensureDeferred
async def test_console_refuses_without_session_csrf_or_from_another_site(make_central):
    """Without a session the console shows only the login form and a correction is refused; with a session
    but no CSRF token, or from another origin, a POST is refused (403) and nothing changes; a viewer's
    token does not log in (401, said on the form); the session cookie is HttpOnly and SameSite=Strict."""
    node, token = await _central_with_quarantine(make_central)
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"
    entry = (await node.central_storage.routing.quarantined("held"))[0]

    def http():
        anonymous = requests.get(f"{base}/console/", timeout=30)
        assert anonymous.status_code == 200 and 'name="token"' in anonymous.text and "tr class" not in anonymous.text
        refused = requests.post(f"{base}/console/quarantine", data={"id": entry.id, "action": "reject", "reason": "x"},
                                timeout=30)
        assert refused.status_code == 401
        viewer = requests.post(f"{base}/console/login", data={"name": ALLOWED, "token": "x" * 40}, timeout=30)
        assert viewer.status_code == 401 and "Wrong administrator name, token or password" in viewer.text
        s = requests.Session()
        login = s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30,
                       allow_redirects=False)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        no_csrf = s.post(f"{base}/console/quarantine", data={"id": entry.id, "action": "reject", "reason": "x"},
                         timeout=30)
        csrf = s.get(f"{base}/console/", timeout=30).text.split('name="csrf" value="')[1].split('"')[0]
        elsewhere = s.post(f"{base}/console/quarantine", headers={"Origin": "http://evil.example"},
                           data={"id": entry.id, "action": "reject", "reason": "x", "csrf": csrf}, timeout=30)
        return no_csrf.status_code, elsewhere.status_code

    assert await deferToThread(http) == (403, 403)
    assert all(e.state == "held" for e in await node.central_storage.routing.quarantined(None))


@pytest_twisted.ensureDeferred
async def test_console_queues_show_the_last_error_and_retry_now(make_central):
    """A push viewer that cannot be reached: the Queues page shows its waiting delivery, one failed, and the
    sender's error; "Retry now" (with the CSRF token) makes it due at once and records who asked."""
    node, token = await _central_with_quarantine(make_central)
    directory = node.central_storage.directory
    await directory.add_viewer(PUSH, "smtp://127.0.0.1:9", ["centre-a:CT"])
    await directory.add_rule(PUSH, centre="centre-a", modality="CT")
    buffer = io.BytesIO()
    datasets(1)[0].save_as(buffer, enforce_file_format=True)  # a new CT, routed to the push viewer by the rule
    await node.ingest.receive_dicom(buffer.getvalue(), transport="dicom", origin="CT1")
    await node.routing.kick()
    await node.routing.outbox.settled(PUSH)
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        s = requests.Session()
        s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30)
        page = s.get(f"{base}/console/queues", timeout=30).text
        row = page.split(PUSH, 1)[1].split("</tr>", 1)[0]
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        retried = s.post(f"{base}/console/queues", data={"destination": PUSH, "csrf": csrf}, timeout=30)
        return row, retried.text

    row, after = await deferToThread(http)
    assert "<td>1</td>" in row and "Retry now" in row and "Connection was refused" in row
    assert f"1 deliveries to {PUSH} retried now." in after
    events = await node.database.run(lambda conn: conn.execute(
        text("SELECT detail FROM delivery_events WHERE detail LIKE 'retry now%'")).scalars().all())
    assert events == ["retry now, asked by alice"]


@pytest_twisted.ensureDeferred
async def test_console_tracking_search_and_timeline(make_central):
    """Tracking finds objects by patient, centre, state (quarantined, overdue) and shows an object's
    timeline: received, quarantined, the correction by alice, the delivery queued for the viewer."""
    from medd.central.routing import correct_route

    node, token = await _central_with_quarantine(make_central)
    held = await node.central_storage.routing.quarantined("held")
    ct = next(e for e in held if e.modality == "CT")
    await correct_route(node.central_storage.routing, ct.id, ALLOWED, "alice")
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        s = requests.Session()
        s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30)

        def found(**query):
            page = s.get(f"{base}/console/tracking", params=query, timeout=30)
            assert page.status_code == 200
            return [row for row in page.text.split('<tr class="found">')[1:]]

        by_patient = found(patient=ct.patient_id)
        held_rows = found(state="quarantined")
        overdue = found(state="overdue", hours="0")
        elsewhere = found(centre="centre-b")
        timeline = s.get(f"{base}/console/tracking", params={"uid": ct.uid}, timeout=30).text
        bad_date = s.get(f"{base}/console/tracking", params={"since": "yesterday"}, timeout=30)
        return by_patient, held_rows, overdue, elsewhere, timeline, bad_date.status_code

    by_patient, held_rows, overdue, elsewhere, timeline, bad_date = await deferToThread(http)
    assert len(by_patient) == 1 and f"{ALLOWED}: queued" in by_patient[0] and ct.uid in by_patient[0]
    assert len(held_rows) == 2 and not any(ct.uid in row for row in held_rows)
    assert len(overdue) == 1 and ct.uid in overdue[0]
    assert elsewhere == []
    events = timeline.split('<li class="event">')[1:]
    assert "received over dicom from CT1" in events[0]
    assert any("quarantined: no route" in e for e in events) and any("by alice" in e for e in events)
    assert f"{ALLOWED}: queued" in events[-1]
    assert bad_date == 400


@pytest_twisted.ensureDeferred
async def test_console_directory_and_new_centre_token(make_central):
    """The Directory page lists the centres (AE titles), the viewers with their authorisations; "New token"
    for centre-a shows a token once that then names centre-a (the old one no longer does), recorded in the
    audit trail as a credential change by alice."""
    node, token = await _central_with_quarantine(make_central)
    directory = node.central_storage.directory
    old = (await directory.add_centre("centre-a", addresses=["ct1@centre-a.example"], token=True)).token
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        s = requests.Session()
        s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30)
        page = s.get(f"{base}/console/directory", timeout=30).text
        csrf = page.split('name="csrf" value="')[1].split('"')[0]
        issued = s.post(f"{base}/console/directory", data={"action": "centre-token", "name": "centre-a", "csrf": csrf},
                        timeout=30).text
        forged = s.post(f"{base}/console/directory", data={"action": "centre-token", "name": "centre-a"}, timeout=30)
        return page, issued, forged.status_code

    page, issued, forged = await deferToThread(http)
    centres = page.split('<tr class="centre">')[1:]
    assert len(centres) == 2 and "CT1" in centres[0] and "CT2" in centres[1]
    assert f"<td>{ALLOWED}</td>" in page and "centre-a:CT" in page
    new = issued.split('<code class="token">')[1].split("</code>")[0]
    assert (await directory.principal(new)).name == "centre-a"
    assert await directory.principal(old) is None
    assert forged == 403
    records = await node.database.run(lambda conn: conn.execute(
        text("SELECT user, credential, detail FROM audit WHERE event = 'credential'")).all())
    assert [tuple(r) for r in records] == [("alice", "centre-a", "centre token issued (console)")]


def _logged_in(base: str, token: str):
    """A requests session logged in as alice, and a function posting a Directory form with its CSRF token."""
    s = requests.Session()
    s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30)
    csrf = s.get(f"{base}/console/directory", timeout=30).text.split('name="csrf" value="')[1].split('"')[0]

    def change(action: str, **fields):
        return s.post(f"{base}/console/directory", data={"action": action, "csrf": csrf, **fields}, timeout=30)

    return s, change


def _shown_token(page: str) -> str:
    return page.split('<code class="token">')[1].split("</code>")[0]


@pytest_twisted.ensureDeferred
async def test_console_directory_changes(make_central):
    """From the Directory page alice adds a centre with a token, a viewer (its token shown once), authorises
    it for the centre's CT, adds a rule to it and rotates the viewer's token (the old one stops working);
    removing the centre is refused while the rule names it, an authorisation for an unknown centre too;
    she revokes the authorisation, removes the rule, the centre and the viewer. Each change is in the
    directory and in the audit trail with alice; a form without the CSRF token changes nothing (403). A
    reader added with a token is that token's principal until she revokes it; so is an administrator she
    adds, until removed; she cannot remove herself (409)."""
    node, token = await _central_with_quarantine(make_central)
    directory = node.central_storage.directory
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"
    viewer = "dr-new@viewers.example"
    def http():
        s, change = _logged_in(base, token)
        out = {"forged": s.post(f"{base}/console/directory", data={"action": "centre-add", "name": "centre-x"},
                                timeout=30).status_code}
        out["centre"] = change("centre-add", name="centre-c", aes="CT9, MR9", addresses="pacs@centre-c.example",
                               networks="10.9.0.0/16", token="1").text
        out["viewer"] = change("viewer-add", address=viewer, push="", scopes="centre-a").text
        out["authorise"] = change("authorise", viewer=viewer, scope="centre-c:CT").text
        out["rule"] = change("rule-add", centre="centre-c", modality="CT", destination=viewer).text
        out["page"] = s.get(f"{base}/console/directory", timeout=30).text
        out["rotated"] = change("viewer-token", address=viewer).text
        out["refused"] = change("centre-remove", name="centre-c")
        out["bad"] = change("authorise", viewer=viewer, scope="nowhere").status_code
        out["reader"] = change("reader-add-token", name="research").text
        out["admin"] = change("admin-add", name="carol").text
        out["self"] = change("admin-remove", name="alice").status_code
        return out

    out = await deferToThread(http)
    assert out["forged"] == 403 and await directory.centre("centre-x") is None
    centre = await directory.centre("centre-c")
    assert [v for k, v in centre.aliases if k == "ae"] == ["CT9", "MR9"] and centre.networks == ("10.9.0.0/16",)
    assert (await directory.principal(_shown_token(out["centre"]))).name == "centre-c"
    first, second = _shown_token(out["viewer"]), _shown_token(out["rotated"])
    assert await directory.principal(first) is None and (await directory.principal(second)).name == viewer
    assert "centre-c:CT" in out["authorise"] and out["page"].count('<tr class="rule">') == 1
    assert out["refused"].status_code == 409 and "routing rule" in out["refused"].text
    assert await directory.centre("centre-c") is not None and out["bad"] == 409
    reader = await directory.principal(_shown_token(out["reader"]))
    assert (reader.kind, reader.name) == ("reader", "research")
    carol = await directory.principal(_shown_token(out["admin"]))
    assert (carol.kind, carol.name) == ("admin", "carol") and out["self"] == 409
    rule = (await directory.rules())[0]
    assert (rule.centre, rule.modality, rule.destination) == ("centre-c", "CT", viewer)

    def undo():
        s, change = _logged_in(base, token)
        return [change("revoke", viewer=viewer, scope="centre-c:CT").status_code,
                change("rule-remove", rule=str(rule.id)).status_code,
                change("centre-remove", name="centre-c").status_code,
                change("viewer-remove", address=viewer).status_code,
                change("reader-revoke", name="research").status_code,
                change("admin-remove", name="carol").status_code]

    assert await deferToThread(undo) == [200] * 6
    assert await directory.admins() == ["alice"]
    with pytest.raises(DirectoryError, match="last administrator"):
        await directory.remove_admin("alice")
    assert await directory.principal(_shown_token(out["reader"])) is None
    assert await directory.centre("centre-c") is None and await directory.viewer(viewer) is None
    assert await directory.rules() == [] and await directory.principal(_shown_token(out["centre"])) is None
    records = await node.database.run(lambda conn: conn.execute(
        text("SELECT event, action, user, detail FROM audit WHERE event IN ('credential', 'directory') ORDER BY id"))
        .all())
    assert [tuple(r) for r in records] == [
        ("directory", "C", "alice", "centre centre-c added (console)"),
        ("credential", "C", "alice", "centre token issued (console)"),
        ("credential", "C", "alice", "viewer added, token issued (console)"),
        ("credential", "U", "alice", "viewer authorised for centre-c:CT (console)"),
        ("directory", "C", "alice", f"routing rule {rule.id} added: centre-c/CT/any to {viewer} (console)"),
        ("credential", "U", "alice", "viewer token issued (console)"),
        ("credential", "C", "alice", "reader added, token issued (console)"),
        ("credential", "C", "alice", "administrator token issued (console)"),
        ("credential", "U", "alice", "viewer no longer authorised for centre-c:CT (console)"),
        ("directory", "D", "alice", f"routing rule {rule.id} removed (console)"),
        ("credential", "D", "alice", "centre removed: its token and certificate revoked (console)"),
        ("directory", "D", "alice", "centre centre-c removed (console)"),
        ("credential", "D", "alice", "viewer removed: its token and certificate revoked (console)"),
        ("credential", "D", "alice", "reader revoked: its token and certificate (console)"),
        ("credential", "D", "alice", "administrator removed: token and password revoked (console)"),
    ]


@pytest_twisted.ensureDeferred
async def test_console_issues_and_revokes_client_certificates(make_central, tmp_path):
    """With [tls] client_ca and client_ca_key, "New certificate" for a viewer and for a centre, and a new
    reader "with a certificate", answer a PEM
    download (certificate and key) whose certificate's SHA-256 now names that viewer or centre; a second one
    replaces it (the first no longer names anyone); "Revoke certificate" leaves none; a token revoked no
    longer names the centre, nor one revoked a viewer. Without a client CA the console refuses (409)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from medd.tlscert import make_self_signed

    ca_cert, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    make_self_signed(ca_cert, ca_key, "medd test client CA")
    node = await make_central(LISTEN, extra=f"[tls]\nclient_ca = {ca_cert}\nclient_ca_key = {ca_key}\n")
    directory = node.central_storage.directory
    viewer_token = (await directory.add_viewer(ALLOWED)).token
    assert (await directory.principal(viewer_token)).name == ALLOWED
    centre_token = (await directory.add_centre("centre-a", addresses=["ct1@centre-a.example"], token=True)).token
    token = await directory.add_admin("alice")
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        s, change = _logged_in(base, token)
        first, second = change("viewer-cert", address=ALLOWED), change("viewer-cert", address=ALLOWED)
        centre = change("centre-cert", name="centre-a")
        reader = change("reader-add-cert", name="research")
        revoked = change("viewer-cert-revoke", address=ALLOWED).status_code
        token_revoked = (change("centre-token-revoke", name="centre-a").status_code,
                         change("viewer-token-revoke", address=ALLOWED).status_code)
        return first, second, centre, reader, revoked, token_revoked

    first, second, centre, reader, revoked, token_revoked = await deferToThread(http)

    def fingerprint(response):
        assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
        assert response.content.count(b"-----BEGIN") == 2  # certificate and key
        cert = x509.load_pem_x509_certificate(response.content)
        return cert.fingerprint(hashes.SHA256()).hex(), cert.subject.rfc4514_string()

    (one, cn1), (two, _), (three, cn3) = fingerprint(first), fingerprint(second), fingerprint(centre)
    assert cn1 == f"CN={ALLOWED}" and cn3 == "CN=ct1@centre-a.example"
    assert await directory.principal(None, one) is None
    assert (await directory.principal(None, three)).name == "centre-a"
    four, cn4 = fingerprint(reader)
    found = await directory.principal(None, four)
    assert cn4 == "CN=reader:research" and (found.kind, found.name) == ("reader", "research")
    assert revoked == 200 and await directory.principal(None, two) is None
    assert token_revoked == (200, 200) and await directory.principal(centre_token) is None
    assert await directory.principal(viewer_token) is None

    plain, admin = await _central_with_quarantine(lambda listen: make_central(listen, site="plain"))

    def refused():
        s, change = _logged_in(f"http://127.0.0.1:{listener_port(plain, 'http')}", admin)
        return change("viewer-cert", address=ALLOWED)

    response = await deferToThread(refused)
    assert response.status_code == 409 and "client_ca" in response.text


@pytest_twisted.ensureDeferred
async def test_console_tracking_pages(make_central, monkeypatch):
    """With two rows a page, tracking shows the two newest objects and a "Next page" link keeping the
    search; that page shows the third and no further link: every object once."""
    from medd.central import console

    monkeypatch.setattr(console, "PAGE", 2)
    node, token = await _central_with_quarantine(make_central)
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        s = requests.Session()
        s.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30)
        first = s.get(f"{base}/console/tracking", params={"state": "quarantined"}, timeout=30).text
        link = first.split('<a href="')[-1].split('"')[0] if 'class="next"' in first else None
        second = s.get(base + link.replace("&amp;", "&"), timeout=30).text if link else ""
        return first, link, second

    first, link, second = await deferToThread(http)
    assert link is not None and "state=quarantined" in link and "before=" in link
    assert 'class="next"' not in second
    uids = [row.split("uid=")[1].split('"')[0] for page in (first, second) for row in page.split('<tr class="found">')[1:]]
    held = await node.central_storage.routing.quarantined("held")
    assert len(uids) == 3 and sorted(uids) == sorted(e.uid for e in held)


@pytest_twisted.ensureDeferred
async def test_console_login_throttled(make_central, monkeypatch):
    """After five wrong tokens for alice from one address, even her right token is refused (429 with
    Retry-After, said on the form) and recorded as a refused authentication; another name still logs in."""
    from twisted.internet.task import Clock

    from medd.central import console
    from medd.throttling import LoginThrottle

    stopped = Clock()  # the throttle's time stands still: the wait cannot run out during the test
    monkeypatch.setattr(console, "LoginThrottle", lambda clock: LoginThrottle(stopped))
    node, token = await _central_with_quarantine(make_central)
    bob = await node.central_storage.directory.add_admin("bob")
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"

    def http():
        wrong = [requests.post(f"{base}/console/login", data={"name": "alice", "token": "x" * 40}, timeout=30,
                               allow_redirects=False).status_code for _ in range(5)]
        right = requests.post(f"{base}/console/login", data={"name": "alice", "token": token}, timeout=30,
                              allow_redirects=False)
        other = requests.post(f"{base}/console/login", data={"name": "bob", "token": bob}, timeout=30,
                              allow_redirects=False)
        return wrong, right, other.status_code

    wrong, right, other = await deferToThread(http)
    assert wrong == [401] * 5
    assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1 and "Too many failed logins" in right.text
    assert other == 303
    refused = await node.database.run(lambda conn: conn.execute(
        text("SELECT user, detail FROM audit WHERE event = 'auth-refused'")).all())
    assert [tuple(r) for r in refused] == [("alice", "console login throttled for 1 s")]


@pytest_twisted.ensureDeferred
async def test_console_login_with_an_administrators_password(make_central, tmp_path):
    """`medd admins password alice --password-file F` gives alice a console password: she logs in with it
    (303, recorded as a password login); a wrong password, or bob's name with it, is refused (401); an
    unknown administrator gets no password."""
    import subprocess
    import sys
    from pathlib import Path

    node, _ = await _central_with_quarantine(make_central)
    await node.central_storage.directory.add_admin("bob")
    secret = tmp_path / "password"
    secret.write_text("correct horse battery\n")
    medd = str(Path(sys.executable).parent / "medd")
    ini = str(tmp_path / "central.ini")  # the node's own config (make_central's)

    def run(name):
        return subprocess.run([medd, "admins", "password", name, "--password-file", str(secret), "--config", ini],
                              capture_output=True, text=True, timeout=120)

    def http():
        done = run("alice")
        base = f"http://127.0.0.1:{listener_port(node, 'http')}"

        def login(name, password):
            return requests.post(f"{base}/console/login", data={"name": name, "token": password}, timeout=30,
                                 allow_redirects=False).status_code

        return (done.returncode, done.stderr, login("alice", "correct horse battery"),
                login("alice", "correct horse"), login("bob", "correct horse battery"))

    done, stderr, right, wrong, other = await deferToThread(http)
    assert done == 0, stderr
    with pytest.raises(DirectoryError, match="no administrator nobody"):
        await node.central_storage.directory.set_admin_password("nobody", "scrypt$x")
    assert (right, wrong, other) == (303, 401, 401)
    logins = await node.database.run(lambda conn: conn.execute(
        text("SELECT user, credential, outcome FROM audit WHERE event = 'login' ORDER BY id")).all())
    assert [tuple(r) for r in logins] == [("alice", "password", 0), ("alice", "admin token or password", 4),
                                          ("bob", "admin token or password", 4)]
