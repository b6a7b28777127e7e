"""The metadata cache connector: each stored object's WADO-RS metadata
(dicom+json bytes, without pixel data) by its blob's digest, so that serving
a 400-image series' metadata reads 400 rows instead of parsing 400 objects.
Blobs are content-addressed, so a digest's metadata never changes."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from medd.storage.connector import Connector
from medd.storage.viewer_tables import object_metadata

# Digests per query: far inside every database's limit on bound parameters.
BATCH = 500
_INSERT_IF_NEW = {
    "sqlite": sqlite_insert(object_metadata).on_conflict_do_nothing(index_elements=[object_metadata.c.digest]),
    "postgresql": postgresql_insert(object_metadata).on_conflict_do_nothing(index_elements=[object_metadata.c.digest]),
}


def documents(conn: Connection, digests: list[str]) -> dict[str, bytes]:
    m = object_metadata.c
    out: dict[str, bytes] = {}
    for i in range(0, len(digests), BATCH):
        for digest, document in conn.execute(select(m.digest, m.document).where(m.digest.in_(digests[i:i + BATCH]))):
            out[digest] = document.encode("utf-8")
    return out


def put(conn: Connection, rows: dict[str, bytes]) -> None:
    if rows:
        conn.execute(_INSERT_IF_NEW[conn.dialect.name], [{"digest": d, "document": doc.decode("utf-8")}
                                                          for d, doc in rows.items()])


class MetadataCache(Connector):
    """Every method returns a Deferred."""

    def documents(self, digests: list[str]):
        """Deferred ``{digest: dicom+json bytes}`` of those digests that are cached."""
        return self.db.run(lambda conn: documents(conn, list(digests)))

    def put(self, rows: dict[str, bytes]):
        """Cache ``{digest: dicom+json bytes}``; a digest already cached is left as it is."""
        return self.db.run(lambda conn: put(conn, rows))
