"""The viewer's inbox: the :class:`Inbox` connector over the object index and
``viewer_opened``, with the dataclasses the reading room shows (worklist rows,
a study with its series and images).

The worklist is paged, filtered and aggregated in one SQL query; nothing
here walks every study in Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.engine import Connection

from medd.objects import GSPS_SOP_CLASS, SR_SOP_CLASS_PREFIX
from medd.storage.connector import Connector, aware
from medd.storage.index import object_by_uid, wildcard_match
from medd.storage.schema import objects, receipts
from medd.storage.viewer_tables import viewer_opened

# Transports by which central's packages reach a viewer: their From is central's address.
CENTRAL_TRANSPORTS = ("pull", "http", "https", "smtp", "tls")


@dataclass(frozen=True)
class WorklistQuery:
    """One page of the worklist as ``user`` sees it, and its filters (an empty filter is no filter)."""

    user: str
    patient: str = ""  # patient ID or name: a case-insensitive substring, or a pattern with * and ?
    modality: str = ""  # a study with at least one image of this modality
    date_from: str = ""  # YYYYMMDD, inclusive
    date_to: str = ""  # YYYYMMDD, inclusive
    status: str = ""  # "read" (the user opened an image of it), "unread", or "" for both
    has_report: bool | None = None
    limit: int = 100
    offset: int = 0
    sort: str = ""  # a key of SORT_KEYS; "" is the default order: priority (STAT first), then newest study
    descending: bool = False


@dataclass(frozen=True)
class StudyAttributes:
    """What a study's objects say of it (taken from its first image)."""

    study_uid: str
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    accession_number: str | None
    institution_name: str | None
    origin: str
    registered_centre: str | None  # as central named it when delivering the study's images

    @property
    def centre(self) -> str:
        """The registered centre central named; before central names one, the Institution Name the images state."""
        return self.registered_centre or self.institution_name or self.origin


@dataclass(frozen=True)
class StudyRow(StudyAttributes):
    """A study in the worklist: its attributes and what the inbox holds of it."""

    modalities: tuple[str, ...]
    images: int
    opened_images: int  # by the query's user
    reports: int
    received_at: datetime | None  # the latest image's arrival
    first_received_at: datetime | None = None
    priority: str = ""  # the most urgent of its images' requests: STAT, HIGH, MEDIUM, ROUTINE, LOW or ""
    patient_sex: str | None = None
    patient_age: str | None = None  # Patient's Age as stated (e.g. 045Y)
    patient_birth_date: str | None = None
    expected_images: int | None = None  # what central said it routes to this viewer, when it said
    opened_by: tuple[str, ...] = ()  # every user who opened an image of it

    @property
    def unread(self) -> bool:
        return self.opened_images == 0

    @property
    def has_report(self) -> bool:
        return self.reports > 0


@dataclass(frozen=True)
class WorklistPage:
    """The studies of one page, newest study first, and how many studies match in all."""

    studies: tuple[StudyRow, ...]
    total: int
    query: WorklistQuery

    @property
    def first(self) -> int:
        """1-based position of the page's first study (0 on an empty page)."""
        return self.query.offset + 1 if self.studies else 0

    @property
    def last(self) -> int:
        return self.query.offset + len(self.studies)

    @property
    def has_next(self) -> bool:
        return self.last < self.total


@dataclass(frozen=True)
class InstanceView:
    """An image of a study as the study page shows it."""

    uid: str
    sop_class_uid: str | None
    instance_number: str | None
    rows: int | None
    columns: int | None
    frames: int
    transfer_syntax_uid: str | None
    overlays: int  # overlays stored on it
    opened: bool  # by the user the study was asked for


@dataclass(frozen=True)
class SeriesView:
    series_uid: str | None
    series_number: str | None
    series_description: str | None
    modality: str | None
    instances: tuple[InstanceView, ...]  # by instance number


@dataclass(frozen=True)
class StudyDetail(StudyAttributes):
    """A study with its series (by series number) and their images."""

    patient_birth_date: str | None
    patient_sex: str | None
    modalities: tuple[str, ...]
    series: tuple[SeriesView, ...]
    reports: int

    @property
    def images(self) -> int:
        return sum(len(s.instances) for s in self.series)


@dataclass(frozen=True)
class AttachedObject:
    """An overlay of an image or a report of a study, as indexed (its content is in the blob store)."""

    uid: str
    digest: str
    media_type: str
    origin: str


@dataclass(frozen=True)
class OpenedMark:
    """That ``user`` opened image ``uid`` at ``at``; ``first`` the first time they did."""

    uid: str
    user: str
    at: datetime
    first: bool


def _number(value) -> tuple:
    """Sort key for IS values kept as text ('10' after '9'; blanks last)."""
    try:
        return (0, int(str(value).strip()), "")
    except (TypeError, ValueError):
        return (1, 0, str(value or ""))


#: The requests' priorities, most urgent first (DICOM's Requested Procedure Priority); a study without one
#: sorts after ROUTINE and before LOW.
PRIORITY_ORDER = ("STAT", "HIGH", "MEDIUM", "ROUTINE", "", "LOW")


def _priority_rank(column):
    return case(*[(column == p, i) for i, p in enumerate(PRIORITY_ORDER) if p],
                else_=PRIORITY_ORDER.index(""))


def _sort_keys(c, images, opened, reports, rank, centre):
    """The worklist's sortable columns: name -> the SQL expression its rows sort by (ascending)."""
    return {
        "priority": rank,
        "patient": func.min(c.patient_name),
        "patient_id": func.min(c.patient_id),
        # Age ascending is youngest first: the latest birth date.
        "age": func.max(c.patient_birth_date),
        "sex": func.min(c.patient_sex),
        "accession": func.min(c.accession_number),
        "modality": func.min(case((c.object_type == "image", c.modality))),
        "centre": centre,
        "study_date": func.min(c.study_date),
        "description": func.min(c.study_description),
        "received": func.min(c.received_at),
        "images": images,
        # unread, read, reported
        "status": case((reports > 0, 2), (opened > 0, 1), else_=0),
    }


SORT_KEYS = ("priority", "patient", "patient_id", "age", "sex", "accession", "modality", "centre", "study_date",
             "description", "received", "images", "status")


def worklist(conn: Connection, query: WorklistQuery) -> WorklistPage:
    """One page of studies with images: see :class:`WorklistQuery`."""
    c = objects.c
    is_image = c.object_type == "image"
    study_level = [is_image]
    if query.patient:
        study_level.append(or_(wildcard_match(c.patient_id, query.patient, substring=True, ignore_case=True),
                               wildcard_match(c.patient_name, query.patient, substring=True, ignore_case=True)))
    if query.date_from:
        study_level.append(c.study_date >= query.date_from)
    if query.date_to:
        study_level.append(c.study_date <= query.date_to)
    where = c.object_type.in_(("image", "report"))
    if len(study_level) > 1:
        # Study-level filters pick studies by their images; a study's report rows are counted whatever they carry.
        where = and_(where, c.study_instance_uid.in_(select(c.study_instance_uid).where(and_(*study_level))))
    images = func.count(case((is_image, 1)))
    reports = func.count(case((c.object_type == "report", 1)))
    opened = func.count(viewer_opened.c.id)  # one row at most per image (uid, user is unique)
    having = [images > 0]
    if query.modality:
        having.append(func.count(case((and_(is_image, c.modality == query.modality), 1))) > 0)
    if query.status == "read":
        having.append(opened > 0)
    elif query.status == "unread":
        having.append(opened == 0)
    if query.has_report is not None:
        having.append(reports > 0 if query.has_report else reports == 0)
    joined = objects.outerjoin(viewer_opened, and_(
        viewer_opened.c.uid == c.sop_instance_uid, viewer_opened.c.user == query.user, is_image))
    study_date, study_time = func.min(c.study_date), func.min(c.study_time)
    rank = func.min(case((is_image, _priority_rank(c.priority)), else_=len(PRIORITY_ORDER)))
    centre = func.coalesce(func.min(c.centre), func.min(c.institution_name), func.min(c.origin))
    keys = _sort_keys(c, images, opened, reports, rank, centre)
    if query.sort and query.sort not in keys:
        raise ValueError(f"cannot sort the worklist by {query.sort!r}")
    order = [rank, study_date.desc().nulls_last(), study_time.desc().nulls_last(), c.study_instance_uid]
    if query.sort:
        key = keys[query.sort]
        order.insert(0, key.desc().nulls_last() if query.descending else key.asc().nulls_last())
    q = (
        select(
            c.study_instance_uid,
            func.min(c.patient_id).label("patient_id"), func.min(c.patient_name).label("patient_name"),
            study_date.label("study_date"), study_time.label("study_time"),
            func.min(c.study_description).label("study_description"),
            func.min(c.accession_number).label("accession_number"),
            func.min(c.institution_name).label("institution_name"), func.min(c.origin).label("origin"),
            images.label("images"), opened.label("opened_images"), reports.label("reports"),
            func.max(c.received_at).label("received_at"), func.min(c.received_at).label("first_received_at"),
            rank.label("rank"), centre.label("centre"), func.min(c.centre).label("registered_centre"),
            func.min(c.patient_sex).label("patient_sex"), func.min(c.patient_age).label("patient_age"),
            func.min(c.patient_birth_date).label("patient_birth_date"),
            func.max(c.study_images).label("expected_images"),
            func.count().over().label("total"),  # after GROUP BY and HAVING: the matching studies
        )
        .select_from(joined)
        .where(where)
        .group_by(c.study_instance_uid)
        .having(and_(*having))
        .order_by(*order)
        .limit(query.limit)
        .offset(query.offset)
    )
    rows = conn.execute(q).all()
    if not rows:
        total = 0
        if query.offset:
            total = conn.execute(select(func.count()).select_from(q.limit(None).offset(None).subquery())).scalar_one()
        return WorklistPage((), total, query)
    uids = [r.study_instance_uid for r in rows]
    modalities: dict[str, set] = {}
    for uid, modality in conn.execute(select(c.study_instance_uid, c.modality).distinct()
                                      .where(and_(is_image, c.study_instance_uid.in_(uids)))):
        if modality:
            modalities.setdefault(uid, set()).add(modality)
    readers = _readers_of(conn, uids)
    studies = tuple(
        StudyRow(
            study_uid=r.study_instance_uid, patient_id=r.patient_id, patient_name=r.patient_name,
            study_date=r.study_date, study_time=r.study_time, study_description=r.study_description,
            accession_number=r.accession_number, institution_name=r.institution_name, origin=r.origin,
            modalities=tuple(sorted(modalities.get(r.study_instance_uid, ()))), images=r.images,
            opened_images=r.opened_images, reports=r.reports, received_at=aware(r.received_at),
            first_received_at=aware(r.first_received_at), priority=PRIORITY_ORDER[min(r.rank, len(PRIORITY_ORDER) - 1)],
            registered_centre=r.registered_centre, patient_sex=r.patient_sex, patient_age=r.patient_age,
            patient_birth_date=r.patient_birth_date, expected_images=r.expected_images,
            opened_by=tuple(sorted(readers.get(r.study_instance_uid, ()))),
        )
        for r in rows
    )
    return WorklistPage(studies, rows[0].total, query)


def _readers_of(conn: Connection, study_uids: list[str]) -> dict[str, set[str]]:
    """Study UID -> the users who opened an image of it."""
    c, o = objects.c, viewer_opened.c
    found: dict[str, set[str]] = {}
    q = (select(c.study_instance_uid, o.user).distinct()
         .select_from(viewer_opened.join(objects, c.sop_instance_uid == o.uid))
         .where(c.study_instance_uid.in_(study_uids)))
    for study_uid, user in conn.execute(q):
        found.setdefault(study_uid, set()).add(user)
    return found


def unread_studies(conn: Connection, limit: int = 50) -> list[str]:
    """Studies with images that no user opened and no report covers, most urgent first, then oldest
    arrival first: the candidates for "next unread"."""
    c = objects.c
    is_image = c.object_type == "image"
    rank = func.min(case((is_image, _priority_rank(c.priority)), else_=len(PRIORITY_ORDER)))
    q = (
        select(c.study_instance_uid)
        .select_from(objects.outerjoin(viewer_opened, and_(viewer_opened.c.uid == c.sop_instance_uid, is_image)))
        .where(c.object_type.in_(("image", "report")))
        .group_by(c.study_instance_uid)
        .having(and_(func.count(case((is_image, 1))) > 0, func.count(viewer_opened.c.id) == 0,
                     func.count(case((c.object_type == "report", 1))) == 0))
        .order_by(rank, func.min(c.received_at), c.study_instance_uid)
        .limit(limit)
    )
    return list(conn.execute(q).scalars())


def modalities(conn: Connection) -> list[str]:
    """Every modality of an image in the inbox, sorted (the worklist's modality filter offers these)."""
    c = objects.c
    q = select(c.modality).distinct().where(and_(c.object_type == "image", c.modality.is_not(None))).order_by(c.modality)
    return [m for m in conn.execute(q).scalars() if m]


def study(conn: Connection, study_uid: str, user: str | None = None) -> StudyDetail | None:
    """A study with its series and their images; which of them ``user`` opened; None if not in the inbox."""
    c = objects.c
    rows = conn.execute(select(objects).where(c.study_instance_uid == study_uid).order_by(c.id)).all()
    if not rows:
        return None
    images = [r for r in rows if r.object_type == "image"]
    first = images[0] if images else rows[0]
    opened = set()
    if user and images:
        opened = set(conn.execute(select(viewer_opened.c.uid).where(and_(
            viewer_opened.c.user == user, viewer_opened.c.uid.in_([r.sop_instance_uid for r in images])))).scalars())
    overlay_counts = dict(conn.execute(
        select(c.referenced_image_uid, func.count())
        .where(and_(c.object_type == "overlay", c.sop_class_uid == GSPS_SOP_CLASS, c.study_instance_uid == study_uid))
        .group_by(c.referenced_image_uid)).all())
    by_series: dict[str, list] = {}
    for r in images:
        by_series.setdefault(r.series_instance_uid or "", []).append(r)
    series = []
    for members in by_series.values():
        head = members[0]
        instances = sorted((
            InstanceView(uid=r.sop_instance_uid, sop_class_uid=r.sop_class_uid, instance_number=r.instance_number,
                         rows=r.rows, columns=r.columns, frames=r.number_of_frames or 1,
                         transfer_syntax_uid=r.transfer_syntax_uid,
                         overlays=overlay_counts.get(r.sop_instance_uid, 0), opened=r.sop_instance_uid in opened)
            for r in members), key=lambda i: (_number(i.instance_number), i.uid))
        series.append(SeriesView(series_uid=head.series_instance_uid, series_number=head.series_number,
                                 series_description=head.series_description, modality=head.modality,
                                 instances=tuple(instances)))
    series.sort(key=lambda s: _number(s.series_number))
    return StudyDetail(
        study_uid=study_uid, patient_id=first.patient_id, patient_name=first.patient_name,
        patient_birth_date=first.patient_birth_date, patient_sex=first.patient_sex, study_date=first.study_date,
        study_time=first.study_time, study_description=first.study_description,
        accession_number=first.accession_number, institution_name=first.institution_name, origin=first.origin,
        registered_centre=next((r.centre for r in images if r.centre), None),
        modalities=tuple(sorted({r.modality for r in images if r.modality})), series=tuple(series),
        reports=sum(1 for r in rows if r.object_type == "report"),
    )


def study_evidence(conn: Connection, study_uid: str) -> list[tuple[str, str, str]]:
    """(series UID, SOP class UID, SOP instance UID) of the study's images."""
    c = objects.c
    return [tuple(r) for r in conn.execute(
        select(c.series_instance_uid, c.sop_class_uid, c.sop_instance_uid)
        .where(and_(c.study_instance_uid == study_uid, c.object_type == "image")).order_by(c.id))]


def first_image_of_study(conn: Connection, study_uid: str) -> str | None:
    """The UID of the study's first DICOM image, or None."""
    c = objects.c
    return conn.execute(select(c.sop_instance_uid).where(and_(
        c.study_instance_uid == study_uid, c.object_type == "image", c.media_type == "application/dicom"))
        .order_by(c.id).limit(1)).scalar()


def attached(conn: Connection, object_type: str, *, image_uid: str | None = None,
             study_uid: str | None = None, sop_class_uid: str | None = None,
             sop_class_prefix: str | None = None) -> list[AttachedObject]:
    """Overlays of an image or reports of a study, oldest first (of one SOP class, or of a class prefix)."""
    c = objects.c
    q = select(c.sop_instance_uid, c.digest, c.media_type, c.origin).where(c.object_type == object_type)
    if sop_class_uid is not None:
        q = q.where(c.sop_class_uid == sop_class_uid)
    if sop_class_prefix is not None:
        q = q.where(c.sop_class_uid.startswith(sop_class_prefix))
    if image_uid is not None:
        q = q.where(c.referenced_image_uid == image_uid)
    if study_uid is not None:
        q = q.where(c.study_instance_uid == study_uid)
    return [AttachedObject(*r) for r in conn.execute(q.order_by(c.id))]


def mark_opened(conn: Connection, uid: str, user: str, at: datetime) -> bool:
    """Record that ``user`` opened image ``uid`` at ``at``; True the first time."""
    o = viewer_opened.c
    row = conn.execute(select(o.id).where(and_(o.uid == uid, o.user == user))).first()
    if row:
        conn.execute(viewer_opened.update().where(o.id == row.id).values(opened_at=at))
        return False
    conn.execute(viewer_opened.insert().values(uid=uid, user=user, first_opened_at=at, opened_at=at))
    return True


def central_address_seen(conn: Connection) -> str | None:
    """The From of the latest package central sent this viewer (pull or push)."""
    r = receipts.c
    return conn.execute(select(r.origin).where(r.transport.in_(CENTRAL_TRANSPORTS))
                        .order_by(r.id.desc()).limit(1)).scalar()


class Inbox(Connector):
    """The viewer's inbox queries. Every method returns a Deferred."""

    def worklist(self, query: WorklistQuery):
        """Deferred :class:`WorklistPage`."""
        return self.db.run(lambda conn: worklist(conn, query))

    def unread_studies(self, limit: int = 50):
        """Deferred list of study UIDs: see :func:`unread_studies`."""
        return self.db.run(lambda conn: unread_studies(conn, limit))

    def modalities(self):
        """Deferred sorted list of the modalities of the inbox's images."""
        return self.db.run(modalities)

    def study(self, study_uid: str, user: str | None = None):
        """Deferred :class:`StudyDetail`, or None."""
        return self.db.run(lambda conn: study(conn, study_uid, user))

    def record(self, uid: str):
        """Deferred :class:`~medd.storage.index.ObjectRecord` of any object in the inbox, or None."""
        return self.db.run(lambda conn: object_by_uid(conn, uid))

    def study_evidence(self, study_uid: str):
        return self.db.run(lambda conn: study_evidence(conn, study_uid))

    def first_image_of_study(self, study_uid: str):
        return self.db.run(lambda conn: first_image_of_study(conn, study_uid))

    def overlays_of(self, image_uid: str):
        """Deferred list of :class:`AttachedObject`: the image's overlays (presentation states), oldest first."""
        return self.db.run(lambda conn: attached(conn, "overlay", image_uid=image_uid, sop_class_uid=GSPS_SOP_CLASS))

    def measurements_of(self, study_uid: str):
        """Deferred list of :class:`AttachedObject`: the study's measurement reports (SRs filed as overlays), oldest
        first."""
        return self.db.run(lambda conn: attached(conn, "overlay", study_uid=study_uid,
                                                 sop_class_prefix=SR_SOP_CLASS_PREFIX))

    def reports_of(self, study_uid: str):
        """Deferred list of :class:`AttachedObject`: the study's reports, oldest first."""
        return self.db.run(lambda conn: attached(conn, "report", study_uid=study_uid))

    def mark_opened(self, uid: str, user: str):
        """Deferred :class:`OpenedMark`, stamped by the clock."""
        at = self.now()
        return self.db.run(lambda conn: OpenedMark(uid, user, at, mark_opened(conn, uid, user, at)))

    def central_address_seen(self):
        return self.db.run(central_address_seen)
