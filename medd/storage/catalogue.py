"""The archive catalogue: which volume holds each archived object, and each volume's state.

:class:`Catalogue` is the connector the archiving service and ``medd archive``
hold; the functions of a connection above it are its internals (each runs
inside the connector's transaction and returns dataclasses).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, literal, or_, select, update
from sqlalchemy.engine import Connection

from medd.storage.archive import Placement, slug, volume_path
from medd.storage.connector import Connector, aware
from medd.storage.routing_tables import centre_aliases, centres, routing_decisions
from medd.storage.schema import archive_volumes, archived_objects, objects

# The folder of objects that belong to no registered centre.
UNREGISTERED = "unregistered"

OPEN, CLOSED, VERIFIED, OFFSITE, DAMAGED = "open", "closed", "verified", "offsite", "damaged"


class CatalogueConflict(Exception):
    """The catalogue changed under an append (another archiver?); the append is not recorded."""


def _from_row(cls, row):
    m = row._mapping
    # Stamps come back aware (UTC) whatever the backend: SQLite drops the zone.
    return cls(**{f.name: aware(m[f.name]) if isinstance(m[f.name], datetime) else m[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class PendingObject:
    """An indexed object that has no archive copy yet."""

    id: int
    sop_instance_uid: str
    digest: str
    size: int
    media_type: str
    origin: str
    modality: str | None
    received_at: datetime
    centre: str = UNREGISTERED  # the registered centre it is filed under


@dataclass(frozen=True)
class Volume:
    id: int
    path: str
    centre: str
    modality: str | None
    sequence: int
    state: str
    size: int
    members: int
    checksum: str | None
    created_at: datetime
    closed_at: datetime | None
    verified_at: datetime | None


@dataclass(frozen=True)
class ArchivedObject:
    sop_instance_uid: str
    digest: str
    volume_id: int
    volume: str
    centre: str
    modality: str | None
    member_name: str
    header_offset: int
    data_offset: int
    size: int
    sha256: str
    archived_at: datetime
    verified_at: datetime | None
    evicted_at: datetime | None


def _archived_select():
    a, v = archived_objects.c, archive_volumes.c
    return select(
        a.sop_instance_uid, a.digest, a.volume_id, v.path.label("volume"), v.centre, v.modality, a.member_name,
        a.header_offset, a.data_offset, a.size, a.sha256, a.archived_at, a.verified_at, a.evicted_at,
    ).join(archive_volumes, archive_volumes.c.id == archived_objects.c.volume_id)


def _archived(conn: Connection, q) -> list[ArchivedObject]:
    return [_from_row(ArchivedObject, r) for r in conn.execute(q)]


# --- archiving -------------------------------------------------------------------------------------


def pending_objects(
    conn: Connection, after_id: int, limit: int, *, centres=(), modalities=(), received_before: datetime | None = None,
) -> list[PendingObject]:
    """Objects without an archive copy, in the order they were indexed, after ``after_id``, each
    with the registered centre it belongs to (its routing decision's: for an overlay or report
    from a viewer, the centre of its study), or ``unregistered``. An object is archived once
    central has decided that, never filed by the AE title or address it came from."""
    o = objects.c
    centre = func.coalesce(routing_decisions.c.centre, literal(UNREGISTERED))
    q = (
        select(o.id, o.sop_instance_uid, o.digest, o.size, o.media_type, o.origin, o.modality, o.received_at,
               centre.label("centre"))
        .join(routing_decisions, routing_decisions.c.uid == o.sop_instance_uid)
        .where(o.id > after_id)
        .where(~exists().where(archived_objects.c.sop_instance_uid == o.sop_instance_uid))
        .order_by(o.id)
        .limit(limit)
    )
    if centres:
        q = q.where(centre.in_(centres))
    if modalities:
        q = q.where(o.modality.in_(modalities))
    if received_before is not None:
        q = q.where(o.received_at <= received_before)
    return [_from_row(PendingObject, r) for r in conn.execute(q)]


def _same_modality(modality: str | None):
    return archive_volumes.c.modality.is_(None) if modality is None else archive_volumes.c.modality == modality


def open_volume(conn: Connection, centre: str, modality: str | None, now: datetime) -> Volume:
    """The open volume for ``centre`` and ``modality``, started if there is none."""
    v = archive_volumes.c
    row = conn.execute(
        select(archive_volumes).where(v.centre == centre, _same_modality(modality), v.state == OPEN).order_by(v.sequence)
    ).first()
    if row is not None:
        return _from_row(Volume, row)
    last = conn.execute(select(func.max(v.sequence)).where(v.centre == centre, _same_modality(modality))).scalar()
    sequence = (last or 0) + 1
    values = dict(
        path=volume_path(centre, modality, sequence), centre=centre, modality=modality, sequence=sequence,
        state=OPEN, size=0, members=0, checksum=None, created_at=now, closed_at=None, verified_at=None,
    )
    new_id = conn.execute(archive_volumes.insert().values(**values)).inserted_primary_key[0]
    return Volume(id=new_id, **values)


def record_append(
    conn: Connection, volume: Volume, appended: list[tuple[str, str, Placement]], now: datetime, verified: bool,
) -> None:
    """Catalogue members appended at ``volume.size``: ``(uid, digest, placement)`` each."""
    v = archive_volumes.c
    new_end = appended[-1][2].end
    done = conn.execute(
        update(archive_volumes)
        .where(v.id == volume.id, v.size == volume.size, v.state == OPEN)
        .values(size=new_end, members=v.members + len(appended))
    )
    if done.rowcount != 1:
        raise CatalogueConflict(f"volume {volume.path} changed while it was being appended to")
    conn.execute(
        archived_objects.insert(),
        [
            dict(
                sop_instance_uid=uid, digest=digest, volume_id=volume.id, member_name=p.name,
                header_offset=p.header_offset, data_offset=p.data_offset, size=p.size, sha256=p.sha256,
                archived_at=now, verified_at=now if verified else None, evicted_at=None,
            )
            for uid, digest, p in appended
        ],
    )


def record_close(conn: Connection, volume: Volume, size: int, checksum: str, now: datetime) -> None:
    v = archive_volumes.c
    done = conn.execute(
        update(archive_volumes)
        .where(v.id == volume.id, v.size == volume.size, v.state == OPEN)
        .values(state=CLOSED, size=size, checksum=checksum, closed_at=now)
    )
    if done.rowcount != 1:
        raise CatalogueConflict(f"volume {volume.path} changed while it was being closed")


def open_volumes(conn: Connection) -> list[Volume]:
    return [_from_row(Volume, r) for r in conn.execute(select(archive_volumes).where(archive_volumes.c.state == OPEN))]


# --- inspecting and verifying ---------------------------------------------------------------------


def _of_centre(conn: Connection, centre: str):
    """Volumes of ``centre``: by its real name or folder, and those filed before volumes went by the
    registered centre, under one of its AE titles or addresses (never rewritten)."""
    v = archive_volumes.c
    aliases = list(conn.execute(
        select(centre_aliases.c.value).join(centres, centres.c.id == centre_aliases.c.centre_id)
        .where(and_(centres.c.name == centre, centre_aliases.c.kind.in_(("ae", "address"))))
    ).scalars())
    return or_(v.centre == centre, v.path.like(slug(centre, empty="centre") + "/%"), v.centre.in_(aliases))


def find_volumes(
    conn: Connection, *, path: str | None = None, centre: str | None = None, modality: str | None = None,
    since: datetime | None = None,
) -> list[Volume]:
    """Volumes by path, centre (real name or folder, or an older volume filed under one of its AE titles
    or addresses), modality, or holding objects archived since ``since``."""
    v = archive_volumes.c
    q = select(archive_volumes).order_by(v.path)
    if path is not None:
        q = q.where(v.path == path)
    if centre is not None:
        q = q.where(_of_centre(conn, centre))
    if modality is not None:
        q = q.where(v.modality == modality)
    if since is not None:
        q = q.where(or_(v.closed_at.is_(None), v.closed_at >= since))
    return [_from_row(Volume, r) for r in conn.execute(q)]


def find_archived(
    conn: Connection, *, centre: str | None = None, modality: str | None = None, since: datetime | None = None,
) -> list[ArchivedObject]:
    v, a = archive_volumes.c, archived_objects.c
    q = _archived_select().order_by(v.path, a.header_offset)
    if centre is not None:
        q = q.where(_of_centre(conn, centre))
    if modality is not None:
        q = q.where(v.modality == modality)
    if since is not None:
        q = q.where(a.archived_at >= since)
    return _archived(conn, q)


def volume_members(conn: Connection, volume_id: int) -> list[ArchivedObject]:
    a = archived_objects.c
    return _archived(conn, _archived_select().where(a.volume_id == volume_id).order_by(a.header_offset))


def record_verify(conn: Connection, volume: Volume, bad_uids: list[str], problems: bool, now: datetime) -> str:
    """Record a verify pass; return the volume's new state."""
    v, a = archive_volumes.c, archived_objects.c
    if bad_uids:
        # A bad archive copy must not license evicting the working copy.
        conn.execute(update(archived_objects).where(a.sop_instance_uid.in_(bad_uids)).values(verified_at=None))
    if problems:
        state = DAMAGED
    elif volume.state in (CLOSED, VERIFIED, DAMAGED):
        state = VERIFIED
    else:
        state = volume.state
    conn.execute(
        update(archive_volumes).where(v.id == volume.id)
        .values(state=state, verified_at=now if not problems else volume.verified_at)
    )
    return state


def move_offsite(conn: Connection, path: str) -> bool:
    """Record that the closed (or verified) volume at ``path`` left the site; False if it is no such volume."""
    v = archive_volumes.c
    done = conn.execute(
        update(archive_volumes).where(v.path == path, v.state.in_((CLOSED, VERIFIED))).values(state=OFFSITE)
    )
    return done.rowcount == 1


# --- retention and restore ------------------------------------------------------------------------


def archived_by_uid(conn: Connection, uids: list[str]) -> list[ArchivedObject]:
    return _archived(conn, _archived_select().where(archived_objects.c.sop_instance_uid.in_(uids)))


def study_uids(conn: Connection, study_uid: str) -> list[str]:
    o = objects.c
    return list(conn.execute(select(o.sop_instance_uid).where(o.study_instance_uid == study_uid).order_by(o.id)).scalars())


def archived_by_digest(conn: Connection, digest: str) -> ArchivedObject | None:
    a = archived_objects.c
    found = _archived(
        conn, _archived_select().where(a.digest == digest).order_by(a.verified_at.is_(None), a.id).limit(1)
    )
    return found[0] if found else None


def evictable(conn: Connection, received_before: datetime, limit: int) -> list[ArchivedObject]:
    """Verified-archived objects older than ``received_before`` whose working copy is still there.

    A blob shared by several objects goes only once every one of them has a
    verified archive copy.
    """
    a, o = archived_objects.c, objects.c
    o2, a2 = objects.alias("o2"), archived_objects.alias("a2")
    unsafe = (
        select(o2.c.id)
        .outerjoin(a2, a2.c.sop_instance_uid == o2.c.sop_instance_uid)
        .where(o2.c.digest == a.digest, a2.c.verified_at.is_(None))
    )
    q = (
        _archived_select()
        .join(objects, o.sop_instance_uid == a.sop_instance_uid)
        .where(a.verified_at.is_not(None), a.evicted_at.is_(None), o.received_at < received_before)
        .where(~exists(unsafe))
        .order_by(a.id)
        .limit(limit)
    )
    return _archived(conn, q)


def mark_evicted(conn: Connection, digests: list[str], now: datetime) -> None:
    a = archived_objects.c
    conn.execute(update(archived_objects).where(and_(a.digest.in_(digests), a.evicted_at.is_(None))).values(evicted_at=now))


def mark_restored(conn: Connection, digest: str) -> None:
    conn.execute(update(archived_objects).where(archived_objects.c.digest == digest).values(evicted_at=None))


class Catalogue(Connector):
    """The archive catalogue of a central node. Every method returns a Deferred;
    every stamp (created, appended, closed, verified, evicted) and every age
    (minimum age to archive, retention) is measured on the injected clock."""

    # -- archiving --

    def pending_objects(
        self, after_id: int, limit: int, *, centres=(), modalities=(), min_age: timedelta | None = None,
    ):
        """Deferred list of :class:`PendingObject` after ``after_id``, received at least ``min_age`` ago."""
        received_before = self.now() - min_age if min_age else None
        return self.db.run(lambda conn: pending_objects(
            conn, after_id, limit, centres=centres, modalities=modalities, received_before=received_before))

    def open_volume(self, centre: str, modality: str | None):
        """Deferred :class:`Volume`: the open one for ``centre`` and ``modality``, started if there is none."""
        at = self.now()
        return self.db.run(lambda conn: open_volume(conn, centre, modality, at))

    def record_append(self, volume: Volume, appended: list[tuple[str, str, Placement]], *, verified: bool):
        """Deferred None once the members are catalogued; fails with :class:`CatalogueConflict`."""
        at = self.now()
        return self.db.run(lambda conn: record_append(conn, volume, appended, at, verified))

    def record_close(self, volume: Volume, size: int, checksum: str):
        at = self.now()
        return self.db.run(lambda conn: record_close(conn, volume, size, checksum, at))

    def open_volumes(self):
        """Deferred list of the open :class:`Volume` s (the ones an interrupted append may have torn)."""
        return self.db.run(open_volumes)

    # -- inspecting and verifying --

    def find_volumes(self, *, path: str | None = None, centre: str | None = None, modality: str | None = None,
                     since: datetime | None = None):
        """Deferred list of :class:`Volume`; see :func:`find_volumes`."""
        return self.db.run(lambda conn: find_volumes(conn, path=path, centre=centre, modality=modality, since=since))

    def find_archived(self, *, centre: str | None = None, modality: str | None = None, since: datetime | None = None):
        """Deferred list of :class:`ArchivedObject`; see :func:`find_archived`."""
        return self.db.run(lambda conn: find_archived(conn, centre=centre, modality=modality, since=since))

    def volume_members(self, volume_id: int):
        return self.db.run(lambda conn: volume_members(conn, volume_id))

    def record_verify(self, volume: Volume, bad_uids: list[str], problems: bool):
        """Deferred new state of ``volume`` after a verify pass."""
        at = self.now()
        return self.db.run(lambda conn: record_verify(conn, volume, bad_uids, problems, at))

    def move_offsite(self, path: str):
        """Deferred True if the closed (or verified) volume at ``path`` is now recorded as off site."""
        return self.db.run(lambda conn: move_offsite(conn, path))

    # -- retention and restore --

    def archived_by_uid(self, uids: list[str]):
        return self.db.run(lambda conn: archived_by_uid(conn, uids))

    def archived_by_digest(self, digest: str):
        """Deferred :class:`ArchivedObject` holding ``digest`` (a verified copy first), or None."""
        return self.db.run(lambda conn: archived_by_digest(conn, digest))

    def study_uids(self, study_uid: str):
        return self.db.run(lambda conn: study_uids(conn, study_uid))

    def evictable(self, retention: timedelta, limit: int):
        """Deferred list of verified-archived objects received more than ``retention`` ago; see :func:`evictable`."""
        received_before = self.now() - retention
        return self.db.run(lambda conn: evictable(conn, received_before, limit))

    def mark_evicted(self, digests: list[str]):
        at = self.now()
        return self.db.run(lambda conn: mark_evicted(conn, digests, at))

    def mark_restored(self, digest: str):
        return self.db.run(lambda conn: mark_restored(conn, digest))
