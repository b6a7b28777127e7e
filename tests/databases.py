"""Database URLs for the storage-backend suite: SQLite always, PostgreSQL where it runs."""
from __future__ import annotations

import os
import uuid

import pytest

PG_URL = os.environ.get("MEDD_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def postgres_schema_url() -> tuple[str, str]:
    """A URL whose search_path is a fresh schema (tests and concurrent runs don't collide)."""
    try:
        import psycopg2  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError:
        pytest.skip("psycopg2 is not installed")
    engine = create_engine(PG_URL)
    schema = "medd_test_" + uuid.uuid4().hex[:12]
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # no server here
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {type(e).__name__}")
    finally:
        engine.dispose()
    return f"{PG_URL}?options=-csearch_path%3D{schema}", schema


def drop_schema(schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Each storage test runs against SQLite (a file) and PostgreSQL (skipped with a reason if absent)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite'}"
        return
    url, schema = postgres_schema_url()
    yield url
    drop_schema(schema)
