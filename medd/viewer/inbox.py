"""The local inbox: queries of the viewer's own index for the reading room,
and which images each user has opened. Blocking functions of a connection
(run through ``Database.run``), returning plain dicts."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Connection

from medd.storage.index import now, study_columns
from medd.storage.schema import objects, receipts
from medd.storage.viewer_tables import viewer_opened

# Worklist filters: name -> objects column. Text filters match a case-insensitive
# substring, or a DICOM-style wildcard pattern with * and ?.
TEXT_FILTERS = {
    "patient_id": objects.c.patient_id,
    "patient_name": objects.c.patient_name,
    "accession_number": objects.c.accession_number,
    "study_description": objects.c.study_description,
    "modality": objects.c.modality,
    "institution_name": objects.c.institution_name,
    "origin": objects.c.origin,
}


def _iso(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _like(column, value: str):
    value = value.strip().lower()
    if "*" in value or "?" in value:
        pattern = value.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_").replace("*", "%").replace("?", "_")
    else:
        pattern = "%" + value.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"
    return func.lower(column).like(pattern, escape="\\")


def _num(value) -> tuple:
    """Sort key for IS values kept as text ('10' after '9'; blanks last)."""
    try:
        return (0, int(str(value).strip()), "")
    except (TypeError, ValueError):
        return (1, 0, str(value or ""))


def _study_conditions(filters: dict) -> list:
    c = objects.c
    conditions = []
    for key, column in TEXT_FILTERS.items():
        value = filters.get(key)
        if value:
            conditions.append(_like(column, str(value)))
    if filters.get("patient"):
        conditions.append(or_(_like(c.patient_id, filters["patient"]), _like(c.patient_name, filters["patient"])))
    if filters.get("centre"):
        conditions.append(or_(_like(c.institution_name, filters["centre"]), _like(c.origin, filters["centre"])))
    uid = filters.get("study_uid") or filters.get("study_instance_uid")
    if uid:
        conditions.append(c.study_instance_uid == str(uid))
    date = str(filters.get("study_date") or "").strip()
    if date:
        low, sep, high = date.partition("-") if len(date) != 10 else (date, "", "")
        low, high = low.replace("-", ""), high.replace("-", "")
        if sep:
            if low:
                conditions.append(c.study_date >= low)
            if high:
                conditions.append(c.study_date <= high)
        else:
            conditions.append(c.study_date == low)
    return conditions


def worklist(conn: Connection, filters: dict | None = None) -> list[dict]:
    """One dict per study with images in the inbox, newest study first.

    ``filters`` (all optional): ``user`` (whose read/unread state is shown),
    ``patient`` (id or name), ``patient_id``, ``patient_name``, ``modality``,
    ``centre`` (institution or origin), ``origin``, ``accession_number``,
    ``study_description``, ``study_uid``, ``study_date`` (``YYYYMMDD``,
    ``YYYY-MM-DD`` or a range ``YYYYMMDD-YYYYMMDD``), ``status``
    (``read``/``unread``), ``has_report`` (bool), ``limit``, ``offset``.
    """
    filters = dict(filters or {})
    user = filters.get("user")
    c = objects.c
    images = c.object_type == "image"
    matching = select(c.study_instance_uid).where(and_(images, *_study_conditions(filters))).distinct()
    q = (
        select(
            *study_columns(),
            func.min(c.origin).label("origin"),
            func.count().label("images"),
            func.max(c.received_at).label("received_at"),
        )
        .where(and_(images, c.study_instance_uid.in_(matching)))
        .group_by(c.study_instance_uid)
    )
    studies = {r.study_instance_uid: dict(r._mapping) for r in conn.execute(q)}
    if not studies:
        return []
    uids = list(studies)
    modalities: dict[str, set] = {}
    for uid, modality in conn.execute(select(c.study_instance_uid, c.modality).distinct()
                                      .where(and_(images, c.study_instance_uid.in_(uids)))):
        if modality:
            modalities.setdefault(uid, set()).add(modality)
    reports = dict(conn.execute(
        select(c.study_instance_uid, func.count()).where(and_(c.object_type == "report", c.study_instance_uid.in_(uids)))
        .group_by(c.study_instance_uid)).all())
    opened: dict[str, int] = {}
    if user:
        opened = dict(conn.execute(
            select(c.study_instance_uid, func.count(func.distinct(viewer_opened.c.uid)))
            .join(viewer_opened, viewer_opened.c.uid == c.sop_instance_uid)
            .where(and_(images, viewer_opened.c.user == user, c.study_instance_uid.in_(uids)))
            .group_by(c.study_instance_uid)).all())
    rows = []
    for uid, s in studies.items():
        n_opened = opened.get(uid, 0)
        s.update(
            study_uid=uid,
            modalities=sorted(modalities.get(uid, ())),
            centre=s["institution_name"] or s["origin"],
            number_of_images=s["images"],
            opened_images=n_opened,
            read=n_opened > 0,
            unread=n_opened == 0,
            reports=reports.get(uid, 0),
            has_report=reports.get(uid, 0) > 0,
            received_at=_iso(s["received_at"]),
        )
        rows.append(s)
    status = filters.get("status")
    if status in ("read", "unread"):
        rows = [r for r in rows if r[status]]
    if filters.get("has_report") is not None and filters.get("has_report") != "":
        want = filters["has_report"] not in (False, "false", "0", "no", 0)
        rows = [r for r in rows if r["has_report"] == want]
    rows.sort(key=lambda r: (r["study_date"] or "", r["received_at"] or ""), reverse=True)
    offset = int(filters.get("offset") or 0)
    limit = int(filters.get("limit") or 500)
    return rows[offset:offset + limit]


def study(conn: Connection, study_uid: str, user: str | None = None) -> dict | None:
    """A study with its series and their images (and its overlays' and reports' counts)."""
    c = objects.c
    rows = conn.execute(select(objects).where(c.study_instance_uid == study_uid).order_by(c.id)).all()
    if not rows:
        return None
    images = [r for r in rows if r.object_type == "image"]
    first = images[0] if images else rows[0]
    opened = set()
    if user:
        opened = set(conn.execute(select(viewer_opened.c.uid).where(and_(
            viewer_opened.c.user == user, viewer_opened.c.uid.in_([r.sop_instance_uid for r in images])))).scalars())
    overlay_counts = dict(conn.execute(
        select(c.referenced_image_uid, func.count()).where(and_(c.object_type == "overlay", c.study_instance_uid == study_uid))
        .group_by(c.referenced_image_uid)).all())
    series: dict[str, dict] = {}
    for r in images:
        s = series.setdefault(r.series_instance_uid or "", {
            "series_uid": r.series_instance_uid, "series_instance_uid": r.series_instance_uid,
            "series_number": r.series_number, "series_description": r.series_description, "modality": r.modality,
            "instances": [],
        })
        s["instances"].append({
            "uid": r.sop_instance_uid, "sop_instance_uid": r.sop_instance_uid, "sop_class_uid": r.sop_class_uid,
            "instance_number": r.instance_number, "rows": r.rows, "columns": r.columns,
            "frames": r.number_of_frames or 1, "number_of_frames": r.number_of_frames or 1,
            "transfer_syntax": r.transfer_syntax_uid, "transfer_syntax_uid": r.transfer_syntax_uid,
            "overlays": overlay_counts.get(r.sop_instance_uid, 0), "opened": r.sop_instance_uid in opened,
        })
    for s in series.values():
        s["instances"].sort(key=lambda i: _num(i["instance_number"]))
        s["instance_count"] = len(s["instances"])
    reports = [r for r in rows if r.object_type == "report"]
    return {
        "study_uid": study_uid, "study_instance_uid": study_uid,
        "patient_id": first.patient_id, "patient_name": first.patient_name,
        "patient_birth_date": first.patient_birth_date, "patient_sex": first.patient_sex,
        "study_date": first.study_date, "study_time": first.study_time, "study_description": first.study_description,
        "accession_number": first.accession_number, "institution_name": first.institution_name,
        "origin": first.origin, "centre": first.institution_name or first.origin,
        "modalities": sorted({r.modality for r in images if r.modality}),
        "number_of_images": len(images), "has_report": bool(reports), "reports": len(reports),
        "series": sorted(series.values(), key=lambda s: _num(s["series_number"])),
    }


def study_evidence(conn: Connection, study_uid: str) -> list[tuple[str, str, str]]:
    """(series UID, SOP class UID, SOP instance UID) of the study's images."""
    c = objects.c
    return [tuple(r) for r in conn.execute(
        select(c.series_instance_uid, c.sop_class_uid, c.sop_instance_uid)
        .where(and_(c.study_instance_uid == study_uid, c.object_type == "image")).order_by(c.id))]


def first_image_of_study(conn: Connection, study_uid: str):
    c = objects.c
    row = conn.execute(select(c.sop_instance_uid, c.digest).where(and_(
        c.study_instance_uid == study_uid, c.object_type == "image", c.media_type == "application/dicom"))
        .order_by(c.id).limit(1)).first()
    return (row.sop_instance_uid, row.digest) if row else None


def attached(conn: Connection, object_type: str, *, image_uid: str | None = None, study_uid: str | None = None):
    """(uid, digest, media type, origin) of overlays of an image or reports of a study, oldest first."""
    c = objects.c
    q = select(c.sop_instance_uid, c.digest, c.media_type, c.origin).where(c.object_type == object_type)
    if image_uid is not None:
        q = q.where(c.referenced_image_uid == image_uid)
    if study_uid is not None:
        q = q.where(c.study_instance_uid == study_uid)
    return [tuple(r) for r in conn.execute(q.order_by(c.id))]


def mark_opened(conn: Connection, uid: str, user: str, at: datetime | None = None) -> bool:
    """Record that ``user`` opened image ``uid``; True the first time."""
    at = at or now()
    row = conn.execute(select(viewer_opened.c.id).where(and_(viewer_opened.c.uid == uid, viewer_opened.c.user == user))).first()
    if row:
        conn.execute(viewer_opened.update().where(viewer_opened.c.id == row.id).values(opened_at=at))
        return False
    conn.execute(viewer_opened.insert().values(uid=uid, user=user, first_opened_at=at, opened_at=at))
    return True


def central_address_seen(conn: Connection) -> str | None:
    """The From of the latest package central sent this viewer (pull or push)."""
    row = conn.execute(select(receipts.c.origin).where(receipts.c.transport.in_(("pull", "http", "smtp", "tls")))
                       .order_by(receipts.c.id.desc()).limit(1)).first()
    return row.origin if row else None
