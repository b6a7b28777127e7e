"""The worklist: the studies in this viewer, sortable and filterable, with
priority, completeness, who reads what, and "next unread"; and the small
JSON API its script polls and acts through.

``GET /worklist`` is the page (it works without script); ``GET /api/worklist``
is the same rows as JSON, polled by ``/static/worklist.js`` to refresh the
table without a reload. Opening a study is its own request
(``POST /api/studies/{uid}/open``): it claims the study for the user, or
answers 409 with who else is reading it so that the page asks first.
``POST /api/next-unread`` picks and claims the next study to read.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from urllib.parse import quote, urlencode

from twisted.web.template import Tag, tags

from medd.storage.inbox import SORT_KEYS, StudyRow, WorklistPage, WorklistQuery
from medd.viewer.contract import UnknownObject
from medd.viewer.web.errors import WebError
from medd.viewer.web.layout import data, html, page
from medd.viewer.web.ohif import viewer_url
from medd.viewer.web.pages import display_date, patient_name
from medd.viewer.web.serving import ErrorResource, RoomResource, UidResource, json_response, serve, uid_child
from medd.webresource import Response

PAGE_SIZE = 100
MAX_OFFSET = 2**31 - 1
#: Seconds between the page's polls of /api/worklist.
REFRESH = 5

FILTERS = ("patient", "modality", "date_from", "date_to", "status")

#: The columns: (sort key or None, heading).
COLUMNS = (
    ("priority", "Priority"), ("patient", "Patient"), ("age", "Age / sex"), ("accession", "Accession"),
    ("modality", "Modality"), ("centre", "Centre"), ("study_date", "Study date"), ("received", "Received"),
    ("images", "Images"), ("status", "Status"), (None, "Open"),
)


def _digits(value: str | None) -> str:
    return re.sub(r"[^0-9]", "", value or "")[:8]


# --- the query string ------------------------------------------------------------------------------


def worklist_filters(request) -> dict[str, str]:
    """The filters and the sort in the worklist's query string, as the page shows them."""
    filters = {}
    for key in FILTERS + ("sort", "order"):
        value = (request.args.get(key.encode()) or [b""])[0].decode("utf-8", "replace").strip()
        if value:
            filters[key] = value
    return filters


def worklist_query(filters: dict[str, str], user: str, offset: int) -> WorklistQuery:
    """The :class:`WorklistQuery` of the query string, or a 400 naming what is wrong."""
    dates = {}
    for key in ("date_from", "date_to"):
        value = filters.get(key, "")
        if value and len(_digits(value)) != 8:
            raise WebError(400, f"{key.replace('_', ' ')} must be a date (YYYY-MM-DD), not {value!r}")
        dates[key] = _digits(value)
    status = filters.get("status", "")
    if status not in ("", "read", "unread"):
        raise WebError(400, f"status is read or unread, not {status!r}")
    sort, order = filters.get("sort", ""), filters.get("order", "asc")
    if sort and sort not in SORT_KEYS:
        raise WebError(400, f"the worklist sorts by one of {', '.join(SORT_KEYS)}, not {sort[:40]!r}")
    if order not in ("asc", "desc"):
        raise WebError(400, f"order is asc or desc, not {order[:40]!r}")
    return WorklistQuery(user=user, patient=filters.get("patient", ""), modality=filters.get("modality", "").upper(),
                         status=status, limit=PAGE_SIZE, offset=offset, sort=sort, descending=order == "desc",
                         **dates)


def _offset(request) -> int:
    raw = (request.args.get(b"offset") or [b"0"])[0].decode("ascii", "replace").strip() or "0"
    # str.isdigit() would pass "²", which int() refuses; and SQL refuses an offset past 2^63.
    if not re.fullmatch(r"[0-9]{1,10}", raw) or int(raw) > MAX_OFFSET:
        raise WebError(400, f"offset is a number of studies up to {MAX_OFFSET}, not {raw[:40]!r}")
    return int(raw)


# --- a row, as the page and the API show it ------------------------------------------------------------

AGE_UNITS = {"Y": "y", "M": "mo", "W": "wk", "D": "d"}


def display_age(stated: str | None, birth_date: str | None, study_date: str | None) -> str:
    """Patient's Age as stated (``045Y`` -> ``45 y``), else the whole years from birth to the study date."""
    match = re.fullmatch(r"0*(\d{1,3})([YMWD])", (stated or "").strip().upper())
    if match:
        return f"{match.group(1)} {AGE_UNITS[match.group(2)]}"
    born, on = _digits(birth_date), _digits(study_date)
    if len(born) == 8 and len(on) == 8:
        years = int(on[:4]) - int(born[:4]) - ((on[4:] < born[4:]) and 1 or 0)
        if 0 <= years < 150:
            return f"{years} y"
    return ""


def _stamp(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if value else ""


def row_data(room, row: StudyRow, user: str) -> dict:
    """What the worklist shows of a study: the same dict renders the page's row and answers the API."""
    readers = room.being_read_by(row.study_uid, other_than=user)
    expected = max(row.expected_images or 0, row.images)
    complete = room.is_complete(row)
    if row.has_report:
        status = "reported"
    elif not row.unread:
        status = "read"
    else:
        status = "unread"
    return {
        "study_uid": row.study_uid,
        "priority": row.priority,
        "patient": patient_name(row.patient_name) or "(no name)",
        "patient_id": row.patient_id or "",
        "age_sex": " ".join(x for x in (display_age(row.patient_age, row.patient_birth_date, row.study_date),
                                        (row.patient_sex or "").strip()) if x),
        "accession": row.accession_number or "",
        "modalities": ", ".join(row.modalities),
        "description": row.study_description or "",
        "centre": row.centre,
        "centre_registered": bool(row.registered_centre),
        "study_date": display_date(row.study_date),
        "received": _stamp(row.first_received_at),
        "last_received": _stamp(row.received_at),
        "images": row.images,
        "expected": expected,
        "complete": complete,
        "status": status,
        "opened_by": list(row.opened_by),
        "being_read_by": readers,
        "images_url": viewer_url(row.study_uid),
        "study_url": f"/studies/{quote(row.study_uid)}",
    }


def _images_cell(d: dict) -> Tag:
    count = f"{d['images']} / {d['expected']}"
    mark = (tags.span("✓ complete", class_="complete") if d["complete"]
            else tags.span("receiving…", class_="incomplete"))
    return tags.td(count, " ", mark, class_="images num")


def _status_cell(d: dict) -> Tag:
    badge = tags.span(d["status"], class_=f"badge {d['status']}")
    reading = ""
    if d["being_read_by"]:
        reading = tags.span(f"being read by {', '.join(d['being_read_by'])}", class_="being-read")
    return tags.td(badge, " ", reading, class_="status")


def row_tag(d: dict) -> Tag:
    priority = d["priority"] or "—"
    centre = tags.td(d["centre"], class_="centre")
    if not d["centre_registered"]:
        centre(title="as the images state it (Institution Name); central has not named the registered centre")
    return tags.tr(
        tags.td(tags.span(priority, class_=f"priority {d['priority'].lower() or 'none'}")),
        tags.td(tags.a(d["patient"], href=d["study_url"], class_="patient"), tags.br(),
                tags.span(d["patient_id"], class_="patient-id")),
        tags.td(d["age_sex"]),
        tags.td(d["accession"]),
        tags.td(d["modalities"]),
        centre,
        tags.td(d["study_date"], tags.br(), tags.span(d["description"], class_="description")),
        tags.td(d["received"], class_="received"),
        _images_cell(d),
        _status_cell(d),
        tags.td(tags.a("Images", href=d["images_url"], class_="open-images button", **data(study_uid=d["study_uid"])),
                " ", tags.a("Report", href=d["study_url"], class_="open-report button secondary")),
        class_=f"study {d['status']}", **data(study_uid=d["study_uid"], complete="yes" if d["complete"] else "no"),
    )


def page_data(room, found: WorklistPage, user: str) -> dict:
    return {
        "studies": [row_data(room, s, user) for s in found.studies],
        "total": found.total, "first": found.first, "last": found.last, "has_next": found.has_next,
    }


# --- the page -----------------------------------------------------------------------------------------


class WorklistResource(RoomResource):
    """``/worklist``: the studies in this viewer, filterable by patient, modality, study date and read status,
    sortable by every column, a page at a time; refreshed by its script without a reload."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        filters = worklist_filters(request)
        found = await self.room.reading_room.worklist(worklist_query(filters, session.user, _offset(request)))
        modalities = set(await self.room.reading_room.modalities())
        if "modality" in filters:
            modalities.add(filters["modality"].upper())
        rows = page_data(self.room.reading_room, found, session.user)
        actions = tags.div(
            tags.button("Next unread", type="button", id="next-unread", class_="next-unread"),
            tags.span("", id="worklist-message", role="status", class_="hint"),
            class_="worklist-actions",
        )
        return await html(200, page("Worklist", session, self._filter_form(filters, sorted(modalities)), actions,
                                    self._table(rows, filters), self._pages(found, filters),
                                    tags.script(src="/static/worklist.js", defer="defer"),
                                    body_class="worklist-page", body_data=data(refresh=str(REFRESH))))

    @staticmethod
    def _filter_form(filters: dict, modalities: list[str]) -> Tag:
        def option(value, label, current):
            o = tags.option(label, value=value)
            if value == current:
                o(selected="selected")
            return o

        modality = tags.select(option("", "any", filters.get("modality", "").upper()), name="modality", id="f-modality")
        for m in modalities:
            modality(option(m, m, filters.get("modality", "").upper()))
        status = tags.select(*[option(v, label, filters.get("status", "")) for v, label in
                               (("", "all"), ("unread", "unread"), ("read", "read"))], name="status", id="f-status")
        keep = [tags.input(type="hidden", name=k, value=filters[k]) for k in ("sort", "order") if k in filters]
        return tags.form(
            tags.label("Patient", tags.input(name="patient", id="f-patient", value=filters.get("patient", ""),
                                             placeholder="name or ID", type="search")),
            tags.label("Modality", modality),
            tags.label("From", tags.input(name="date_from", id="f-date-from", type="date",
                                          value=display_date(filters.get("date_from", "")))),
            tags.label("To", tags.input(name="date_to", id="f-date-to", type="date",
                                        value=display_date(filters.get("date_to", "")))),
            tags.label("Status", status),
            *keep,
            tags.button("Filter", type="submit"),
            tags.a("Clear", href="/worklist", class_="button secondary"),
            method="get", action="/worklist", class_="filters",
        )

    @staticmethod
    def _heading(key: str | None, label: str, filters: dict) -> Tag:
        """A column heading; a sortable one is a link (keyboard reachable) that sorts by it, and again reversed."""
        if key is None:
            return tags.th(label, scope="col")
        current = filters.get("sort") == key
        descending = current and filters.get("order") == "desc"
        order = "asc" if descending or not current else "desc"
        query = {k: v for k, v in filters.items() if k not in ("sort", "order")}
        link = tags.a(label, " ", tags.span("▼" if descending else "▲" if current else "", class_="arrow"),
                      href="/worklist?" + urlencode({**query, "sort": key, "order": order}), class_="sort",
                      id=f"sort-{key}")
        th = tags.th(link, scope="col", **data(sort=key))
        if current:
            th(**{"aria-sort": "descending" if descending else "ascending"})
        return th

    def _table(self, rows: dict, filters: dict) -> Tag:
        header = tags.tr(*[self._heading(key, label, filters) for key, label in COLUMNS])
        empty = "No studies match these filters." if set(filters) - {"sort", "order"} else \
            "No studies have arrived in this viewer yet."
        notice = tags.p(empty, class_="empty", id="worklist-empty")
        table = tags.table(tags.thead(header), tags.tbody(*[row_tag(d) for d in rows["studies"]]),
                           class_="worklist", id="worklist")
        # Both are on the page: the refresh shows the table when the first study arrives.
        (notice if rows["studies"] else table)(hidden="hidden")
        return tags.div(notice, table)

    @staticmethod
    def _pages(found: WorklistPage, filters: dict) -> Tag | str:
        offset, limit = found.query.offset, found.query.limit
        if not found.studies or (offset == 0 and not found.has_next):
            return ""

        def link(label, to, rel):
            return tags.a(label, href="/worklist?" + urlencode({**filters, "offset": str(to)}), rel=rel,
                          class_="button secondary", id=f"page-{rel}")

        return tags.nav(
            link("← Previous", max(offset - limit, 0), "prev") if offset else "",
            tags.span(f"{found.first}–{found.last} of {found.total}", class_="page-position"),
            link("Next →", offset + limit, "next") if found.has_next else "",
            class_="pages",
        )


# --- the API the page's script uses -----------------------------------------------------------------------


class WorklistApi(RoomResource):
    """``GET /api/worklist?…``: the rows of the worklist page with the same query string, as JSON."""

    isLeaf = True

    def render_GET(self, request):
        return serve(request, self._get, api=True)

    async def _get(self, request) -> Response:
        session = await self.room.session(request)
        found = await self.room.reading_room.worklist(
            worklist_query(worklist_filters(request), session.user, _offset(request)))
        return json_response(200, page_data(self.room.reading_room, found, session.user))


class StudiesApi(RoomResource):
    def getChild(self, path, request):
        uid = uid_child(path)
        if uid is None:
            return ErrorResource(404, "that is not a study UID")
        return StudyApi(self.room, uid)


class StudyApi(UidResource):
    @property
    def below(self):
        return {b"open": OpenStudy}


class OpenStudy(UidResource):
    """``POST /api/studies/{uid}/open`` (``confirmed=yes`` to read a study someone else is reading): claims the
    study for the user and answers where its images open; 409 with ``being_read_by`` when another user reads it
    and the user has not confirmed."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request) -> Response:
        form, session = await self.room.posted(request)
        confirmed = form.get("confirmed") == "yes"
        try:
            others = await self.room.reading_room.open_study(self.uid, session.user, confirmed=confirmed)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        if others and not confirmed:
            return json_response(409, {"study_uid": self.uid, "being_read_by": others,
                                       "error": f"this study is being read by {', '.join(others)}"})
        return json_response(200, {"study_uid": self.uid, "url": viewer_url(self.uid), "also_read_by": others})


class NextUnread(RoomResource):
    """``POST /api/next-unread``: claims the next study to read (STAT first, then the oldest unread one nobody
    is reading) and answers where its images open; 404 when there is none."""

    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request) -> Response:
        form, session = await self.room.posted(request)
        room = self.room.reading_room
        for _ in range(3):  # another user may claim it between the pick and the claim
            study_uid = await room.next_unread(session.user)
            if study_uid is None:
                break
            if not await room.open_study(study_uid, session.user):
                return json_response(200, {"study_uid": study_uid, "url": viewer_url(study_uid)})
        raise WebError(404, "there is no unread study that nobody is reading")


def api_resources(room) -> dict[bytes, RoomResource]:
    """The worklist's API, under ``/api``."""
    return {b"worklist": WorklistApi(room), b"studies": StudiesApi(room), b"next-unread": NextUnread(room)}

