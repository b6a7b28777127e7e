"""Who made a report, as central vouches for it.

Central knows who sent each report package: a registered viewer,
authenticated (the sender policy admits a viewer's name only with that
viewer's credential; a DICOM calling AE title never names a viewer), or
anyone else (an imaging centre's own report on its study). It says so in the
``Medd-Report-Source`` header of every report package it delivers, built
here from its own records; a header the sender wrote is never read, since
central builds each delivered package afresh. A viewer shows "signed by"
only for what this header says a registered viewer sent.
"""
from __future__ import annotations

from medd.package import ReportSource
from medd.report_documents import read_report
from medd.storage.index import ObjectRecord


def sent_by_viewer(record: ObjectRecord, is_viewer: bool) -> bool:
    """Whether the object came in a registered viewer's name (``is_viewer``: its origin is one), which
    the sender policy let in only from that viewer authenticated."""
    return record.transport != "dicom" and is_viewer


async def report_source(directory, record: ObjectRecord) -> ReportSource:
    """Central's word on who sent report ``record`` (``directory``: the Directory connector)."""
    origin = (record.origin or "").strip().lower()
    viewer = await directory.viewer(origin) if origin else None
    return ReportSource("viewer" if sent_by_viewer(record, viewer is not None) else "centre", origin or "unknown")


async def report_summary(api, directory, record: ObjectRecord) -> dict:
    """A report as the admin API lists it: who vouched (``source``, ``node``) and, what the report says,
    its kind, signer and time, and the report it follows. ``signed_by`` is set only for a report a
    registered viewer sent (its logged-in radiologist signed it, preliminary or final)."""
    source = await report_source(directory, record)
    data = await api.read_blob(record.digest)
    said = await api.run_blocking(read_report, data, record.media_type)
    return {"source": source.source, "node": source.node, "kind": said["kind"],
            "signed_by": said["signer"] if source.source == "viewer" else None,
            "author": said["signer"], "signed_at": said["signed_at"], "predecessor": said["predecessor"]}
