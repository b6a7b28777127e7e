"""The reading screen, ``/studies/{uid}``: one screen with the patient banner
across the top, the study's images in OHIF on the left and its report on
the right.

OHIF runs in an iframe of this same origin (its page is
``/ohif/viewer?StudyInstanceUIDs=…``, framed by this site only). The
prebuilt ``@ohif/app`` takes panels only from extensions compiled into its
bundle, so a medd panel inside OHIF would mean building OHIF ourselves; the
iframe keeps the npm-published app as it is, and the report form stays a
medd page (server-rendered, CSRF-protected, no OHIF code involved).

The report panel lists the study's reports with who vouched for each (only a
registered viewer's authenticated user's report reads "signed by"), starts a
new report from the user's draft or the template of the study's modality,
saves the draft as the radiologist types (``/static/report-panel.js``) and
signs it preliminary, final or as an addendum.
"""
from __future__ import annotations

import re
from datetime import date
from urllib.parse import quote, urlencode

from twisted.logger import Logger
from twisted.web.template import Tag, tags

from medd.viewer.contract import ReportDesk, ReportView, StudyDetail, UnknownObject
from medd.viewer.reports import KINDS, ReportError
from medd.viewer.web.errors import WebError
from medd.viewer.web.layout import data, html, page
from medd.viewer.web.ohif import viewer_url
from medd.viewer.web.pages import display_date, patient_name
from medd.viewer.web.measurements import WithdrawMeasurements
from medd.viewer.web.serving import ErrorResource, RoomResource, UidResource, json_response, redirect, serve, uid_child
from medd.viewer.web.session import CSRF_FIELD, Session
from medd.webresource import Response

log = Logger()

MAX_REPORT = 64 * 1024
# The reading screen frames OHIF (this site) and runs its own script; nothing else.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SIGN_LABELS = {"preliminary": "Sign preliminary", "final": "Sign final", "addendum": "Sign addendum"}


def reading_url(study_uid: str) -> str:
    """The reading screen of a study."""
    return f"/studies/{quote(study_uid)}"


class StudiesResource(RoomResource):
    def getChild(self, path, request):
        uid = uid_child(path)
        if uid is None:
            return ErrorResource(404, "that is not a study UID")
        return ReadingScreen(self.room, uid)


def _age(birth: str | None, on: str | None) -> str:
    """The patient's age on the study date (e.g. ``62 y``), or ''."""
    b, d = re.sub(r"\D", "", birth or ""), re.sub(r"\D", "", on or "")
    if len(b) != 8 or len(d) != 8:
        return ""
    try:
        born, then = date(int(b[:4]), int(b[4:6]), int(b[6:8])), date(int(d[:4]), int(d[4:6]), int(d[6:8]))
    except ValueError:
        return ""
    years = then.year - born.year - ((then.month, then.day) < (born.month, born.day))
    return f"{years} y" if years >= 0 else ""


def patient_banner(study: StudyDetail) -> Tag:
    """Who and what this screen shows: name, ID, birth date and age, sex, study date, accession, modality."""
    def item(label, value, cls):
        return tags.span(tags.span(label, class_="label"), value or "—", class_=cls)

    born = display_date(study.patient_birth_date)
    age = _age(study.patient_birth_date, study.study_date)
    return tags.div(
        tags.strong(patient_name(study.patient_name) or "(no name)", class_="patient"),
        item("ID ", study.patient_id, "patient-id"),
        item("Born ", f"{born} ({age})" if born and age else born, "birth-date"),
        item("Sex ", study.patient_sex, "sex"),
        item("Study ", display_date(study.study_date), "study-date"),
        item("Acc ", study.accession_number, "accession"),
        item("", " ".join(study.modalities), "modality"),
        item("", study.study_description, "description"),
        class_="patient-banner", id="patient-banner", role="banner",
    )


def _when(value: str | None) -> str:
    return (value or "")[:19].replace("T", " ")


def _provenance(r: ReportView, here: str) -> Tag:
    """Who vouched for the report, in words: signed only for a registered viewer's authenticated user."""
    if r.signed_by is not None:
        where = "" if r.node == here else f" on {r.node}"
        verb = "preliminary, signed by" if r.kind == "preliminary" else "signed by"
        return tags.span(f"{verb} {r.signed_by}{where}", " · ", tags.time(_when(r.signed_at)), class_="signed")
    if r.vouched == "centre":
        return tags.span(f"from centre {r.node}, unverified here", class_="unverified")
    return tags.span("unverified: no registered viewer vouches for it", class_="unverified")


def _report(r: ReportView, here: str) -> Tag:
    title = {"preliminary": "Preliminary report", "final": "Final report", "addendum": "Addendum"}[r.kind]
    return tags.li(
        tags.div(tags.strong(title), " · ", _provenance(r, here), class_="meta"),
        tags.p(f"to report {r.predecessor}", class_="follows uid") if r.kind == "addendum" and r.predecessor else "",
        tags.pre(r.text, class_="report-text"),
        class_=f"report {r.kind}", **data(report_uid=r.uid, kind=r.kind),
    )


def report_panel(study_uid: str, session: Session, desk: ReportDesk, here: str, signed: str) -> Tag:
    items = [_report(r, here) for r in desk.reports]
    notice = ""
    if signed in KINDS:
        notice = tags.p(f"{signed.capitalize()} report signed and sent to central.", class_="notice", role="status",
                        id="report-saved")
    buttons = [tags.button(SIGN_LABELS[k], type="submit", name="kind", value=k, id=f"sign-{k}",
                           class_="secondary" if k == "preliminary" else "") for k in desk.next_kinds]
    label = "Addendum" if desk.next_kinds == ("addendum",) else "Report"
    return tags.section(
        tags.h2("Report"),
        notice,
        tags.ol(*items, class_="reports", id="reports") if items else tags.p("No report yet.", class_="empty"),
        tags.form(
            tags.input(type="hidden", name=CSRF_FIELD, value=session.csrf),
            tags.label(label, tags.span(f"template {desk.template}", class_="template", id="report-template")
                       if desk.template else "",
                       tags.textarea(desk.text, name="text", id="report-text", rows="18", required="required",
                                     maxlength=str(MAX_REPORT), spellcheck="true")),
            tags.div(
                tags.span("", class_="hint", id="draft-status", role="status"),
                *buttons,
                class_="buttons",
            ),
            method="post", action=f"{reading_url(study_uid)}/report", class_="report-form", id="report-form",
            **data(draft_url=f"{reading_url(study_uid)}/draft", study_uid=study_uid, reports=str(len(desk.reports)),
                   draft_saved_at=desk.draft_saved_at or "", login_url="/?" + urlencode({"next": reading_url(study_uid)})),
        ),
        class_="report-panel", id="report-panel",
    )


class ReadingScreen(UidResource):
    """``/studies/{uid}``: the patient banner, the images (OHIF) and the report panel."""

    @property
    def below(self):
        return {b"report": SignAction, b"draft": DraftAction, b"withdraw-measurements": WithdrawMeasurements}

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        try:
            study = await self.room.reading_room.study(self.uid, session.user)
            desk = await self.room.reading_room.report_desk(self.uid, session.user)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        signed = (request.args.get(b"signed") or [b""])[0].decode("ascii", "replace")
        name = patient_name(study.patient_name)
        here = self.room.reading_room.node_name
        images = tags.iframe(src=viewer_url(self.uid), title=f"Images of {name or self.uid} (OHIF)", id="images",
                             class_="images", allow="fullscreen")
        body = page(f"Reading {name or self.uid}", session,
                    patient_banner(study),
                    tags.div(images, report_panel(self.uid, session, desk, here, signed), class_="reading-layout"),
                    tags.script(src="/static/report-panel.js", defer="defer"),
                    body_class="reading-page")
        response = await html(200, body)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response


class SignAction(UidResource):
    """``POST /studies/{uid}/report``: sign the text as the study's preliminary or final report, or an
    addendum, by the logged-in user (a Basic Text SR, sent to central)."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post)

    async def _post(self, request) -> Response:
        form, session = await self.room.posted(request)
        text = form.get("text", "").replace("\r\n", "\n").strip()
        kind = form.get("kind", "final")
        if kind not in KINDS:
            raise WebError(400, f"a report is signed as {', '.join(KINDS)}, not {kind[:40]!r}")
        if not text:
            raise WebError(400, "the report is empty; write the report before signing it")
        if len(text) > MAX_REPORT:
            raise WebError(413, f"the report is longer than {MAX_REPORT} characters")
        try:
            report_uid = await self.room.reading_room.save_report(self.uid, session.user, text, kind)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        except ReportError as e:
            raise WebError(409, f"the report was not signed: {e}") from e
        log.info("{kind} report {report} on study {study} signed by {user}", kind=kind, report=report_uid,
                 study=self.uid, user=session.user)
        return redirect(f"{reading_url(self.uid)}?signed={kind}#report-saved")


class DraftAction(UidResource):
    """``POST /studies/{uid}/draft``: keep the user's unsigned text (the panel's script sends it every few
    seconds while it changes, on blur and when the page is left, with the number of reports the panel shows);
    JSON ``{"saved_at": …}``, 409 when the study's reports changed since."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request) -> Response:
        form, session = await self.room.posted(request)
        text = form.get("text", "").replace("\r\n", "\n")
        if len(text) > MAX_REPORT:
            raise WebError(413, f"the draft is longer than {MAX_REPORT} characters")
        seen = form.get("reports", "")
        if seen and not re.fullmatch(r"[0-9]{1,6}", seen):
            raise WebError(400, f"reports is the number of reports the panel shows, not {seen[:20]!r}")
        try:
            saved_at = await self.room.reading_room.save_draft(self.uid, session.user, text,
                                                               int(seen) if seen else None)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        except ReportError as e:
            raise WebError(409, str(e)) from e
        return json_response(200, {"saved_at": saved_at})
