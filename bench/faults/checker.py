"""The independent checker: holds the ledger against what the nodes hold, read straight from their
databases (SQLAlchemy Core on the URL, no medd code) and blob folders, and through central's WADO-RS
(dicomweb-client). It trusts nothing medd says about itself."""
from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import create_engine, inspect, text

from .clients import dataset_digest


class Holdings:
    """One node's database and blob store, read directly."""

    def __init__(self, db_url: str, store: Path):
        self.db_url, self.store = db_url, Path(store)

    def rows(self, sql: str, **params) -> list[tuple]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(sql), params)]
        finally:
            engine.dispose()

    def objects(self) -> dict[str, str]:
        """SOP Instance UID -> digest of every indexed object."""
        return dict(self.rows("SELECT sop_instance_uid, digest FROM objects"))

    def blob_path(self, digest: str) -> Path:
        return self.store / "blobs" / digest[:2] / digest[2:4] / digest

    def blob(self, digest: str) -> bytes | None:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def blob_files(self) -> set[str]:
        found = set()
        for root, _, files in os.walk(self.store / "blobs"):
            found.update(files)
        return found

    def referenced(self) -> set[str]:
        """Every digest any table's ``digest`` column holds (the conflicts table records refusals, no blob)."""
        engine = create_engine(self.db_url)
        try:
            tables = [t for t in inspect(engine).get_table_names()
                      if t != "conflicts" and "digest" in {c["name"] for c in inspect(engine).get_columns(t)}]
        finally:
            engine.dispose()
        out: set[str] = set()
        for t in tables:
            out.update(d for (d,) in self.rows(f"SELECT DISTINCT digest FROM {t}"))
        return out

    def orphans(self) -> int:
        return len(self.blob_files() - self.referenced())

    def half_written(self) -> int:
        """Temporary files left in the store's tmp folder (a put that never finished)."""
        tmp = self.store / "tmp"
        return len(os.listdir(tmp)) if tmp.is_dir() else 0

    def rows_without_blob(self) -> int:
        return sum(1 for d in self.objects().values() if not self.blob_path(d).is_file())


def check_acknowledged(ledger: list[dict], node: Holdings) -> dict:
    """Each acknowledgement in ``ledger``: indexed, blob present, blob's SHA-256 its name, data set as sent."""
    objects = node.objects()
    lost, wrong = [], []
    for entry in ledger:
        digest = objects.get(entry["uid"])
        data = node.blob(digest) if digest else None
        if data is None:
            lost.append(entry["uid"])
        elif hashlib.sha256(data).hexdigest() != digest or dataset_digest(data) != entry["digest"]:
            wrong.append(entry["uid"])
    return {"acknowledged": len({e["uid"] for e in ledger}), "lost": lost, "wrong_digest": wrong}


def check_deliveries(central: Holdings, viewer: Holdings, address: str) -> dict:
    """Central's deliveries to ``address`` against what the viewer holds."""
    states = dict(central.rows("SELECT uid, state FROM deliveries WHERE destination = :d AND status IS NULL",
                               d=address))
    per_uid = Counter(uid for (uid,) in central.rows(
        "SELECT uid FROM deliveries WHERE destination = :d AND status IS NULL", d=address))
    held = viewer.objects()
    central_objects = central.objects()
    acked_not_held = [u for u, s in states.items() if s in ("delivered", "opened")
                      and (u not in held or viewer.blob(held[u]) is None)]
    wrong = [u for u, d in held.items() if u in central_objects and d != central_objects[u]]
    receipts = Counter(uid for (uid,) in viewer.rows("SELECT uid FROM receipts"))
    duplicated = sum(n - 1 for n in receipts.values() if n > 1) + sum(n - 1 for n in per_uid.values() if n > 1)
    return {"deliveries": len(states), "delivered": sum(s in ("delivered", "opened") for s in states.values()),
            "acked_not_held": acked_not_held, "wrong_digest": wrong, "duplicated": duplicated,
            "not_delivered": [u for u, s in states.items() if s not in ("delivered", "opened")]}


def wado_sample(base_url: str, token: str, node: Holdings, uids: list[str]) -> list[str]:
    """Fetch each of ``uids`` through WADO-RS; those whose answer is not the stored object (UID and
    pixel data as in the blob read directly)."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url=f"{base_url}/dicomweb", session=session)
    rows = {uid: (study, series, digest) for uid, study, series, digest in node.rows(
        "SELECT sop_instance_uid, study_instance_uid, series_instance_uid, digest FROM objects")}
    bad = []
    for uid in uids:
        study, series, digest = rows[uid]
        got = client.retrieve_instance(study, series, uid)
        stored = pydicom.dcmread(io.BytesIO(node.blob(digest)))
        if got.SOPInstanceUID != uid or got.PixelData != stored.PixelData:
            bad.append(uid)
    session.close()
    return bad
