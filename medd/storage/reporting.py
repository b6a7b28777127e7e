"""Report drafts and report sources on a viewer: the :class:`Reporting` connector.

A draft is the text a radiologist is writing for a study, saved as they type
(one per study and user) and kept until they sign it. A report source is who
vouched for a report the viewer holds (``Medd-Report-Source``): written in
the index transaction of the report's package (:func:`record_report_source`),
so a report is never stored without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, select
from sqlalchemy.engine import Connection

from medd.package import ReportSource
from medd.storage.connector import Connector, aware, utc
from medd.storage.viewer_tables import viewer_report_drafts, viewer_report_sources

MAX_DRAFT = 64 * 1024


@dataclass(frozen=True)
class Draft:
    study_uid: str
    user: str
    text: str
    updated_at: datetime


def record_report_source(conn: Connection, uid: str, source: ReportSource, at: datetime) -> None:
    """Keep who vouched for report ``uid`` (the first word stands: a report's source never changes)."""
    t = viewer_report_sources.c
    if conn.execute(select(t.id).where(t.uid == uid)).first() is None:
        conn.execute(viewer_report_sources.insert().values(uid=uid, source=source.source, node=source.node[:255],
                                                           recorded_at=at))


def _draft(conn: Connection, study_uid: str, user: str) -> Draft | None:
    d = viewer_report_drafts.c
    row = conn.execute(select(d.text, d.updated_at).where(and_(d.study_uid == study_uid, d.user == user))).first()
    return Draft(study_uid, user, row.text, aware(row.updated_at)) if row else None


def _save_draft(conn: Connection, study_uid: str, user: str, text: str, at: datetime) -> Draft:
    d = viewer_report_drafts.c
    where = and_(d.study_uid == study_uid, d.user == user)
    if conn.execute(viewer_report_drafts.update().where(where).values(text=text, updated_at=at)).rowcount == 0:
        conn.execute(viewer_report_drafts.insert().values(study_uid=study_uid, user=user, text=text, updated_at=at))
    return Draft(study_uid, user, text, at)


class Reporting(Connector):
    """Drafts and report sources. Every method returns a Deferred."""

    def draft(self, study_uid: str, user: str):
        """Deferred :class:`Draft` of ``user`` on the study, or None."""
        return self.db.run(lambda conn: _draft(conn, study_uid, user))

    def save_draft(self, study_uid: str, user: str, text: str):
        """Deferred :class:`Draft`: the text saved, stamped by the clock."""
        if len(text) > MAX_DRAFT:
            raise ValueError(f"a draft is at most {MAX_DRAFT} characters")
        at = self.now()
        return self.db.run(lambda conn: _save_draft(conn, study_uid, user, text, at))

    def discard_draft(self, study_uid: str, user: str):
        d = viewer_report_drafts.c
        return self.db.run(lambda conn: conn.execute(
            delete(viewer_report_drafts).where(and_(d.study_uid == study_uid, d.user == user))))

    def sources(self, uids: list[str]):
        """Deferred {uid: :class:`~medd.package.ReportSource`} of the reports that have one."""
        t = viewer_report_sources.c

        def thd(conn):
            if not uids:
                return {}
            rows = conn.execute(select(t.uid, t.source, t.node).where(t.uid.in_(list(uids))))
            return {r.uid: ReportSource(r.source, r.node) for r in rows}

        return self.db.run(thd)

    def keeper(self):
        """What the viewer's ingest calls in a report package's index transaction: ``keep(conn, uid,
        source)``, stamped by the clock."""
        return lambda conn, uid, source: record_report_source(conn, uid, source, utc(self.clock.seconds()))
