"""The report beside the images: the reading screen (patient banner, OHIF framed, report panel), per-modality
templates, drafts saved as the radiologist types, preliminary / final / addendum reports as their own SRs, and
"signed" shown only for what a registered viewer's authenticated user signed, as central vouches in the
package it delivers (``Medd-Report-Source``).

The browser test drives headless Debian Chromium (Playwright) against a real central and a real viewer on
loopback; ``MEDD_SCREENSHOTS=DIR`` saves the reading screen as DIR/report-panel.png.
"""
from __future__ import annotations

import os
from functools import partial
from io import BytesIO

import pydicom
import pytest
import pytest_twisted
import requests
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread

from medd.central.outbox import package_for
from medd.demo import ct_stack
from medd.objects import parse_part10
from medd.package import AttachmentId, ReportSource, build_package, read_package
from medd.plugins.host import load_plugins
from medd.storage.index import ObjectRecord
from medd.viewer.reports import build_text_report
from medd.viewer.templates import template_for
from medd.viewer.users import add_user
from tests.conftest import listener_port, testdata
from medd.viewer.web import csrf_token
from tests import test_reading_room
from tests.test_ohif import _ohif_or_skip
from tests.test_reading_room import _browser_login, _browser_or_skip, _drive, _login

RFC822 = {"Content-Type": "message/rfc822"}
CENTRE_ADDRESS = "ct1@centre-a.example"  # centre-a's address in tests.test_viewer._directory
OTHER_VIEWER = "dr-kim@viewers-b.example"


# --- templates and the header, without a network ----------------------------------------------------------


def test_the_template_is_chosen_by_the_studys_modality(tmp_path):
    """A template file serves the modalities its name lists (CR-DX.txt: CR and DX); the first modality of the
    study that has one wins, SR/PR are not read, default.txt serves the rest; medd ships CT, MR, CR/DX, US."""
    (tmp_path / "CR-DX.txt").write_text("chest\n")
    (tmp_path / "CT.txt").write_text("ct\n")
    (tmp_path / "default.txt").write_text("any\n")
    (tmp_path / "not a template.txt").write_text("never\n")
    assert template_for(tmp_path, ["DX"]).name == "CR-DX.txt"
    assert template_for(tmp_path, ["SR", "cr"]).text == "chest\n"
    assert template_for(tmp_path, ["PR", "CT", "DX"]).name == "CT.txt"
    assert template_for(tmp_path, ["XA"]).name == "default.txt"
    (tmp_path / "default.txt").unlink()
    assert template_for(tmp_path, ["XA"]) is None
    from medd.viewer.settings import default_templates
    shipped = default_templates()
    assert {m: template_for(shipped, [m]).name for m in ("CT", "MR", "CR", "DX", "US")} == {
        "CT": "CT.txt", "MR": "MR.txt", "CR": "CR-DX.txt", "DX": "CR-DX.txt", "US": "US.txt"}


def test_central_sets_the_report_source_and_never_passes_on_the_senders():
    """The package central delivers carries central's Medd-Report-Source, whatever the sender's package said;
    a viewer reads it back as sent."""
    sr = parse_part10(build_text_report(testdata("CT_small.dcm"), [], text="x", user="dr-evil",
                                        report_uid="1.2.826.0.1.3680043.8.498.777", device="centre"))
    key = sr.keyinfo
    forged = build_package(sr, AttachmentId.of("report", uid=key.sop_instance_uid, study_uid=key.study_instance_uid),
                           origin=CENTRE_ADDRESS, destination="central.test",
                           report_source=ReportSource("viewer", "dr-lee@viewers.example"))
    plugins = load_plugins()
    assert read_package(forged, plugins.object_type).report_source == ReportSource("viewer", "dr-lee@viewers.example")

    class Delivery:
        destination, message_id = "dr-lee@viewers.example", "<1@central>"
        centre, study_images = None, None

    from datetime import datetime, timezone
    record = ObjectRecord(sop_instance_uid=key.sop_instance_uid, object_type="report", media_type="application/dicom",
                          study_instance_uid=key.study_instance_uid, digest="0" * 64, size=len(sr.data),
                          origin=CENTRE_ADDRESS, transport="http", received_at=datetime.now(timezone.utc))
    delivered = package_for(record, sr.data, Delivery(), "central@central.test",
                            ReportSource("centre", CENTRE_ADDRESS))
    assert delivered.count(b"Medd-Report-Source") == 1
    assert read_package(delivered, plugins.object_type).report_source == ReportSource("centre", CENTRE_ADDRESS)
    assert ReportSource.parse('viewer; node="a@b"; x=1') == ReportSource("viewer", "a@b")
    assert ReportSource.parse("signed; node=a@b") is None and ReportSource.parse("viewer") is None


# --- "signed" only from a registered viewer, over a real central and viewer ---------------------------------


def _sr_package(image: bytes, *, user: str, uid: str, origin: str, to: str, source: ReportSource | None) -> bytes:
    sr = parse_part10(build_text_report(image, [], text=f"Report by {user}.", user=user, report_uid=uid,
                                        device=origin))
    study = sr.keyinfo.study_instance_uid
    return build_package(sr, AttachmentId.of("report", uid=uid, study_uid=study), origin=origin, destination=to,
                         report_source=source)


@pytest_twisted.ensureDeferred
async def test_signed_only_for_what_a_registered_viewer_sent(make_central):
    """A centre's own VERIFIED SR on its own study, even with a forged "Medd-Report-Source: viewer" header, reaches
    the viewer vouched as "centre" (central overwrites the header from who authenticated): the reading screen shows
    it "from centre …, unverified here" and never "signed by", and it does not make the study's report final.
    Another registered viewer's SR, sent with its own credential, shows "signed by" its radiologist; central's API
    says the same of both."""
    from tests.test_viewer import VIEWER, _central_and_viewer, _fake_clock, _history, _send_to_viewer
    from tests.test_routing import _with_recipient

    central, viewer, admin = await _central_and_viewer(make_central, _fake_clock())
    directory = central.central_storage.directory
    centre_token = await directory.issue_centre_token("centre-a")
    kim_token = (await directory.add_viewer(OTHER_VIEWER, None, ["centre-a"])).token
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await _send_to_viewer(central, viewer, ct)
    buf = BytesIO()
    ct.save_as(buf)
    image, study = buf.getvalue(), ct.StudyInstanceUID
    base = f"http://127.0.0.1:{listener_port(central, 'http')}"
    centre_uid, kim_uid = "1.2.826.0.1.3680043.8.498.901", "1.2.826.0.1.3680043.8.498.902"
    from_centre = _sr_package(image, user="dr-centre", uid=centre_uid, origin=CENTRE_ADDRESS, to=VIEWER,
                              source=ReportSource("viewer", VIEWER))
    from_kim = _sr_package(image, user="dr-kim", uid=kim_uid, origin=OTHER_VIEWER, to=VIEWER, source=None)
    for package, token in ((from_centre, centre_token), (from_kim, kim_token)):
        r = await deferToThread(requests.post, base + "/packages", data=package,
                                headers={"Authorization": f"Bearer {token}", **RFC822})
        assert r.status_code == 201, r.text
    await central.routing.router.kick()
    pulled = await viewer.viewer.requestor.kick()
    assert pulled.error is None and pulled.stored == 2, pulled

    room = viewer.reading_room
    shown = {r.uid: r for r in await room.reports(study)}
    centre, kim = shown[centre_uid], shown[kim_uid]
    assert centre.verified and centre.signer == "dr-centre"  # what the SR says of itself ...
    assert (centre.vouched, centre.node, centre.signed_by) == ("centre", CENTRE_ADDRESS, None)  # ... is not vouched
    assert (kim.vouched, kim.node, kim.signed_by, kim.kind) == ("viewer", OTHER_VIEWER, "dr-kim", "final")
    await add_user(room.accounts, "dr-lee", "correct horse")

    def screen():
        s = _login(f"http://127.0.0.1:{listener_port(viewer, 'http')}", "dr-lee", "correct horse")
        return s.get(f"http://127.0.0.1:{listener_port(viewer, 'http')}/studies/{study}").text

    page = await deferToThread(screen)
    assert f"from centre {CENTRE_ADDRESS}, unverified here" in page
    assert f"signed by dr-kim on {OTHER_VIEWER}" in page and "signed by dr-centre" not in page
    # dr-kim's final report makes the study final (an addendum next); the centre's alone would not have.
    assert (await room.report_desk(study, "dr-lee")).next_kinds == ("addendum",)
    assert {"source": "centre", "node": CENTRE_ADDRESS, "signed_by": None, "author": "dr-centre"}.items() <= (
        await _history(central, admin, centre_uid))["report"].items()
    assert {"source": "viewer", "node": OTHER_VIEWER, "signed_by": "dr-kim", "kind": "final"}.items() <= (
        await _history(central, admin, kim_uid))["report"].items()


# --- the reading screen in Chromium ---------------------------------------------------------------------------

FIRST = "CT head: no acute intracranial abnormality."
FINAL = "CT head: no acute intracranial abnormality. No fracture."
ADDENDUM = "Addendum: small left maxillary sinus retention cyst, incidental."
LATE = " Discussed with Dr Ode."


def _unexpected(error: str) -> bool:
    """Any page or console error but the 401s of what the browser asked after the session was ended on purpose,
    and OHIF's "request failed" for its requests cut off when the test leaves the screen (signing, logging in)
    before OHIF has finished loading; a Content-Security-Policy violation always counts."""
    if "Content Security Policy" in error:
        return True
    return not ("favicon" in error or "status of 401 (Unauthorized)" in error or "request failed" in error)


def _wait_for_images(page):
    frame = page.frame_locator("#images")
    frame.locator(".cornerstone-canvas").first.wait_for(timeout=90_000)
    return frame


def _value(page) -> str:
    return page.locator("#report-text").input_value()


@pytest_twisted.ensureDeferred
async def test_report_beside_the_images_in_chromium(make_central):
    """A radiologist opens an unread CT from the worklist: the patient banner, the images (OHIF) and the report panel
    are on one screen, side by side, the CT template in the panel. What they type is saved as a draft and is
    there after a reload, and after their session ended (the unsaved text kept in the tab is put back after they
    log in again). They sign it preliminary, then final, then an addendum: each its own SR, signed by dr-lee;
    central's API shows each attached to the study with its signer, the final following the preliminary and the
    addendum (its own text only) following the final; the worklist shows the study reported."""
    _browser_or_skip()
    _ohif_or_skip()
    from tests.test_routing import _cstore
    from tests.test_viewer import VIEWER, _central_and_viewer, _history, _local

    central, viewer, admin = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    stack = await deferToThread(ct_stack, 3)
    for ds in stack:
        ds.NamesOfIntendedRecipientsOfResults = VIEWER
    assert await deferToThread(_cstore, listener_port(central, "dicom"), stack) == [0] * 3
    await central.routing.router.kick()
    assert (await viewer.viewer.requestor.kick()).error is None
    for ds in stack:
        assert await _local(viewer, ds.SOPInstanceUID)
    study_uid = stack[0].StudyInstanceUID
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    shots = os.environ.get("MEDD_SCREENSHOTS")
    room = viewer.reading_room

    def end_session(token):
        return blockingCallFromThread(reactor, lambda: ensureDeferred(room.end_session(token)))

    def scenario(page):
        _browser_login(page, "dr-lee", "correct horse")
        unread = page.locator(f'tr[data-study-uid="{study_uid}"]').text_content()
        page.locator(f'tr[data-study-uid="{study_uid}"] a.open-report').click()
        page.wait_for_url(f"**/studies/{study_uid}")
        frame = _wait_for_images(page)
        frame.get_by_text("Skip all").click()
        frame.get_by_text("Confirm and hide").click()
        banner = page.locator("#patient-banner")
        images, panel = page.locator("#images").bounding_box(), page.locator("#report-panel").bounding_box()
        layout = {"banner": banner.bounding_box(), "images": images, "panel": panel}
        banner = banner.inner_text()
        template = page.locator("#report-template").inner_text(), _value(page)
        page.fill("#report-text", FIRST)
        page.wait_for_selector("#draft-status:has-text('Draft saved')")
        page.reload()
        _wait_for_images(page)
        after_reload = _value(page)
        # OHIF has fetched what it shows (else its requests cut off by the ended session are its errors).
        page.wait_for_load_state("networkidle", timeout=90_000)
        # The session ends (expired, or ended elsewhere): the next save is refused, the text stays in the tab.
        session = next(c["value"] for c in page.context.cookies() if c["name"] == "medd_session")
        end_session(session)
        page.locator("#report-text").press("End")
        page.keyboard.type(LATE)
        page.wait_for_selector("#draft-status:has-text('session has ended')")
        page.locator("#draft-login").click()
        page.fill("input[name=username]", "dr-lee")
        page.fill("input[name=password]", "correct horse")
        page.click("button[type=submit]")
        page.wait_for_url(f"**/studies/{study_uid}")
        page.wait_for_selector("#draft-status:has-text('Draft saved')")
        after_login = _value(page)
        page.click("#sign-preliminary")
        page.wait_for_url("**signed=preliminary**", wait_until="domcontentloaded")
        preliminary = page.locator("li.report.preliminary .meta").inner_text(), _value(page)
        if shots:
            _wait_for_images(page)
            page.screenshot(path=os.path.join(shots, "report-panel.png"))
        page.fill("#report-text", FINAL)
        page.click("#sign-final")
        page.wait_for_url("**signed=final**", wait_until="domcontentloaded")
        final = page.locator("li.report.final .meta").inner_text(), _value(page)
        kinds = [b.get_attribute("value") for b in page.locator("#report-form button[name=kind]").all()]
        page.fill("#report-text", ADDENDUM)
        page.click("#sign-addendum")
        page.wait_for_url("**signed=addendum**", wait_until="domcontentloaded")
        addendum = page.locator("li.report.addendum").inner_text()
        page.goto("/worklist")
        reported = page.locator(f'tr[data-study-uid="{study_uid}"]').text_content()
        return (unread, reported), layout, banner, template, after_reload, after_login, preliminary, final, kinds, addendum

    (rows, layout, banner, template, after_reload, after_login, preliminary, final, kinds,
     addendum) = await deferToThread(partial(_drive, viewport=(1600, 900), fails=_unexpected), base, scenario)
    assert "unread" in rows[0] and "reported" not in rows[0] and "reported" in rows[1]
    for shown in ("STACK, TESSA", "P-STACK-1", "1961-04-12", "F", "2024-03-05", "ACC-4711", "CT"):
        assert shown in banner, (shown, banner)
    images, panel, top = layout["images"], layout["panel"], layout["banner"]
    assert panel["x"] >= images["x"] + images["width"] - 1 and images["width"] > panel["width"] > 250
    assert abs(panel["y"] - images["y"]) < 2 and top["y"] + top["height"] <= images["y"] + 1
    assert template[0] == "template CT.txt" and template[1].startswith("CT EXAMINATION")
    assert after_reload == FIRST and after_login == FIRST + LATE
    assert preliminary[0].startswith("Preliminary report · preliminary, signed by dr-lee")
    assert preliminary[1] == FIRST + LATE  # the draft goes on to the final report
    assert final[0].startswith("Final report · signed by dr-lee") and final[1] == "" and kinds == ["addendum"]
    assert ADDENDUM in addendum and FINAL not in addendum

    # Every report is its own SR, sent to central, attached to the study with its signer.
    await viewer.viewer.outgoing.kick()
    assert await viewer.viewer.outgoing.packages.count_waiting() == 0
    await central.routing.router.kick()
    uids = [r["uid"] for r in (await _history(central, admin, stack[0].SOPInstanceUID))["reports"]]
    assert len(uids) == 3
    said = [(await _history(central, admin, uid))["report"] for uid in uids]
    assert [(s["kind"], s["signed_by"], s["source"], s["node"]) for s in said] == [
        (kind, "dr-lee", "viewer", VIEWER) for kind in ("preliminary", "final", "addendum")]
    assert said[0]["predecessor"] is None and said[1]["predecessor"] == uids[0] and said[2]["predecessor"] == uids[1]
    stored = {r.uid: r for r in await room.reports(study_uid)}
    assert stored[uids[2]].text == ADDENDUM and stored[uids[1]].text == FINAL
    ds = pydicom.dcmread(BytesIO(await room.ingest.read_blob((await _local(viewer, uids[2])).digest)))
    assert (ds.PreliminaryFlag, ds.VerificationFlag) == ("FINAL", "VERIFIED")
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == uids[1]
    first = pydicom.dcmread(BytesIO(await room.ingest.read_blob((await _local(viewer, uids[0])).digest)))
    assert (first.PreliminaryFlag, first.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert await room.reporting.draft(study_uid, "dr-lee") is None  # signed: no draft left behind



# --- the panel's endpoints, over a real reading room on loopback ----------------------------------------------

room_site = test_reading_room.room_site  # the fixture: a real reading room with two studies and the user alice


@pytest_twisted.ensureDeferred
async def test_drafts_are_per_user_and_study_and_signing_follows_the_report_workflow(room_site):
    """A draft is saved only with the session's CSRF token and only for a study of the inbox (401 problem JSON
    without a session), is the user's own, and is what the panel starts from; an addendum cannot be signed
    before the final report, nor a second final after it (409, nothing stored)."""
    base, room = room_site.base, room_site.room
    study = "1.2.826.0.1.1"
    await add_user(room.accounts, "bob", "hunter2")

    def check():
        alice, bob = _login(base), _login(base, "bob", "hunter2")
        token = csrf_token(alice.cookies["medd_session"])
        draft = f"{base}/studies/{study}/draft"
        assert requests.post(draft, data={"text": "x"}).status_code == 401
        assert alice.post(draft, data={"text": "x"}).status_code == 403
        assert alice.post(f"{base}/studies/1.2.3.4/draft", data={"text": "x", "csrf": token}).status_code == 404
        saved = alice.post(draft, data={"text": "Alice's findings", "csrf": token})
        assert saved.status_code == 200 and saved.json()["saved_at"]
        assert ">Alice's findings</textarea>" in alice.get(f"{base}/studies/{study}").text
        assert "Alice" not in bob.get(f"{base}/studies/{study}").text
        sign = f"{base}/studies/{study}/report"
        early = alice.post(sign, data={"text": "too early", "kind": "addendum", "csrf": token}, allow_redirects=False)
        assert early.status_code == 409 and "not final yet" in early.text
        assert alice.post(sign, data={"text": "Final.", "kind": "final", "csrf": token},
                          allow_redirects=False).status_code == 303
        again = alice.post(sign, data={"text": "Final again.", "kind": "final", "csrf": token}, allow_redirects=False)
        assert again.status_code == 409 and "add an addendum" in again.text
        assert alice.post(sign, data={"text": "x", "kind": "signed", "csrf": token}).status_code == 400
        # A save from a panel that showed no report yet (still on its way as the final was signed) is refused.
        stale = alice.post(draft, data={"text": "Final.", "reports": "0", "csrf": token})
        assert stale.status_code == 409 and "changed" in stale.json()["detail"]

    await deferToThread(check)
    (final,) = await room.reports(study)
    assert (final.kind, final.signed_by, final.text) == ("final", "alice", "Final.")
    assert await room.reporting.draft(study, "alice") is None
    desk = await room.report_desk(study, "alice")
    assert desk.next_kinds == ("addendum",) and desk.text == "" and desk.template is None
    fresh = await room.report_desk("1.2.826.0.1.2", "alice")  # MR and US: the MR template, first of them
    assert fresh.template == "MR.txt" and fresh.text.startswith("MR EXAMINATION")


def test_upgrade_vouches_for_the_viewers_own_earlier_reports(db_url, tmp_path):
    """Migrating to 0013_reports keeps who made the reports a viewer already holds: those its own reading room made
    (transport local, in its own name) are vouched for by it; one that came from central is vouched for by no
    one (central never said)."""
    import shutil
    from datetime import datetime, timezone

    from sqlalchemy import select

    from medd.storage import migrate
    from medd.storage.database import make_engine
    from medd.storage.index import store_object
    from medd.storage.viewer_tables import viewer_report_sources

    before = tmp_path / "migrations"
    # The scripts up to the one before 0013_reports.
    shutil.copytree(migrate.MIGRATIONS, before, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (n[:4].isdigit() and int(n[:4]) >= 13)])
    engine = make_engine(db_url)
    try:
        migrate.upgrade(engine, before)
        at = datetime(2026, 1, 2, tzinfo=timezone.utc)
        with engine.begin() as conn:
            for uid, transport, origin in (("1.2.3.1", "local", "dr-lee@viewers.example"),
                                           ("1.2.3.2", "pull", "central@central.test")):
                store_object(conn, ObjectRecord(sop_instance_uid=uid, object_type="report", media_type="text/plain",
                                                study_instance_uid="1.2.3", digest=uid.replace(".", "") * 8,
                                                size=1, origin=origin, transport=transport, received_at=at))
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select(viewer_report_sources.c.uid, viewer_report_sources.c.source,
                                                          viewer_report_sources.c.node))]
    finally:
        engine.dispose()
    assert rows == [("1.2.3.1", "viewer", "dr-lee@viewers.example")]


def test_a_templates_folder_that_is_not_there_is_a_config_error(tmp_path):
    """[reading_room] templates names a folder (relative to the config file); a missing one stops the node at start
    (and `medd check-config`) with the file, section and key."""
    from medd.config import ConfigError, load_config
    from medd.viewer.settings import reading_room_settings
    from tests.conftest import write_config

    (tmp_path / "site-templates").mkdir()
    good = load_config(write_config(tmp_path, extra="[reading_room]\ntemplates = site-templates\n", role="viewer"))
    assert reading_room_settings(good).templates == tmp_path / "site-templates"
    bad = load_config(write_config(tmp_path, extra="[reading_room]\ntemplates = nowhere\n", role="viewer"))
    with pytest.raises(ConfigError, match=r"\[reading_room\] templates.*no such folder"):
        reading_room_settings(bad)
