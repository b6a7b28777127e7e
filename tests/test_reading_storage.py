"""The reading room's storage and rules below the web: the Inbox connector's worklist (paged, filtered and
aggregated in SQL), the Accounts connector (users, sessions on the injected clock), `medd users`, the one
LIKE translator, and the one annotation validator with its boundary cases."""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import column, select, table
from twisted.internet.task import Clock

from medd.config import load_config
from medd.storage.accounts import SESSION_LIFETIME, Accounts
from medd.storage.database import Database, open_database, resolved
from medd.storage.inbox import Inbox, WorklistQuery
from medd.storage.index import ObjectRecord, Receipt, store_object, wildcard_match
from medd.storage.viewer_tables import viewer_sessions
from medd.viewer.annotations import MAX_ANNOTATIONS, MAX_TEXT, AnnotationError, check_annotations
from medd.viewer.users import UserError, add_user, check_hash
from tests.conftest import write_config

VIEWER = "dr-lee@viewers.example"
START = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def db(tmp_path):
    """An inline database (calls run on the test's thread) on a temporary SQLite file, schema created."""
    database = Database(None, f"sqlite:///{tmp_path / 'viewer.sqlite'}", inline=True)
    database.create_schema()
    yield database
    database.stop()


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(START)
    return clock


# --- accounts ------------------------------------------------------------------------------------------


def test_users_and_passwords(db, clock):
    """A user's password checks right and fails wrong (and for unknown users); the hash is salted per user;
    adding a user twice is refused unless replacing, and a new password ends the old sessions."""
    accounts = Accounts(db, clock)
    resolved(add_user(accounts, "dr-lee", "correct horse"))
    resolved(add_user(accounts, "dr-kim", "correct horse"))
    lee = resolved(accounts.password_hash("dr-lee"))
    assert lee.startswith("scrypt$") and lee != resolved(accounts.password_hash("dr-kim"))
    assert check_hash(lee, "correct horse") and not check_hash(lee, "wrong")
    assert not check_hash(resolved(accounts.password_hash("nobody")), "correct horse")
    with pytest.raises(UserError, match="already exists"):
        resolved(add_user(accounts, "dr-lee", "other"))
    token = resolved(accounts.create_session("dr-lee"))
    resolved(add_user(accounts, "dr-lee", "new one", replace=True))
    assert check_hash(resolved(accounts.password_hash("dr-lee")), "new one")
    assert resolved(accounts.user_for_session(token)) is None
    with pytest.raises(UserError):
        add_user(accounts, "has space", "x")
    with pytest.raises(UserError, match="empty"):
        add_user(accounts, "dr-new", "")
    users = resolved(accounts.users())
    assert [u.name for u in users] == ["dr-kim", "dr-lee"]
    assert users[0].created_at == datetime.fromtimestamp(START, tz=timezone.utc)


def test_sessions_expire_on_the_injected_clock(db, clock):
    """A session token names its user until it ends or the clock passes its lifetime; only its hash is stored."""
    accounts = Accounts(db, clock)
    token = resolved(accounts.create_session("dr-lee"))
    assert resolved(accounts.user_for_session(token)) == "dr-lee"
    assert resolved(accounts.user_for_session(token + "x")) is None
    assert resolved(accounts.user_for_session(None)) is None
    hashes = db.run_sync(lambda c: [r.token_hash for r in c.execute(select(viewer_sessions))])
    assert hashes and token not in hashes
    clock.advance(SESSION_LIFETIME.total_seconds() - 1)
    assert resolved(accounts.user_for_session(token)) == "dr-lee"
    clock.advance(1)
    assert resolved(accounts.user_for_session(token)) is None
    other = resolved(accounts.create_session("dr-lee"))  # clears the expired one
    assert db.run_sync(lambda c: len(c.execute(select(viewer_sessions)).all())) == 1
    resolved(accounts.end_session(other))
    assert resolved(accounts.user_for_session(other)) is None


def test_medd_users_add_cli(tmp_path):
    """`medd users add NAME --password-file FILE` stores a user whose password then checks; `medd users list`
    lists it; adding it again is refused with status 2."""
    ini = write_config(tmp_path, role="viewer", name=VIEWER,
                       extra="[central]\nurl = http://127.0.0.1:8080\ntoken = t\npoll_interval = 1\n")
    (tmp_path / "pw").write_text("s3cret\n")
    medd = str(Path(sys.executable).parent / "medd")
    command = [medd, "users", "add", "dr-lee", "--password-file", str(tmp_path / "pw"), "--config", str(ini)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    listed = subprocess.run([medd, "users", "list", "--config", str(ini)], capture_output=True, text=True)
    assert listed.stdout.split() == ["dr-lee"]
    database = open_database(load_config(ini))
    try:
        stored = resolved(Accounts(database, Clock()).password_hash("dr-lee"))
        assert check_hash(stored, "s3cret") and not check_hash(stored, "s3cret\n")
    finally:
        database.stop()


# --- the worklist in SQL -------------------------------------------------------------------------------


def _image(n: int, study: int, *, modality="CT", patient=("DOE^JANE", "P001"), date="20240105", series=1,
           object_type="image") -> ObjectRecord:
    return ObjectRecord(
        sop_instance_uid=f"1.2.3.{study}.{series}.{n}", object_type=object_type, media_type="application/dicom",
        study_instance_uid=f"1.2.3.{study}", series_instance_uid=f"1.2.3.{study}.{series}", digest=f"{study:04d}{n:060d}",
        size=1, origin="central@central", transport="pull", received_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        modality=modality, patient_name=patient[0], patient_id=patient[1], study_date=date,
        series_number=str(series), instance_number=str(n), rows=8, columns=8,
    )


@pytest.fixture
def inbox(db, clock):
    """An inbox of five studies: study k dated 2024-01-0k, P00k, k CT images (study 5 also an MR series), a report
    on study 2, and study 3's patient named with SQL's wildcards."""
    def fill(conn):
        for k in range(1, 6):
            patient = ("50%_OFF^X", "P003") if k == 3 else (f"PAT{k}^A", f"P00{k}")
            for n in range(1, k + 1):
                store_object(conn, _image(n, k, patient=patient, date=f"2024010{k}"))
        store_object(conn, _image(9, 5, modality="MR", series=2, date="20240105", patient=("PAT5^A", "P005")))
        store_object(conn, _image(1, 2, object_type="report", series=3, patient=(None, None), date=None),
                     Receipt("<r@x>", "report", "1.2.3.2.3.1", "dr@v", "central@c", "local"))

    db.run_sync(fill)
    return Inbox(db, clock)


def test_worklist_pages_newest_first_with_aggregates(inbox):
    """A page is LIMIT/OFFSET over the studies, newest study first, with the total; each row counts the study's
    images and reports and lists its modalities."""
    page = resolved(inbox.worklist(WorklistQuery(user="dr-lee", limit=2)))
    assert [s.study_uid for s in page.studies] == ["1.2.3.5", "1.2.3.4"]
    assert (page.total, page.first, page.last, page.has_next) == (5, 1, 2, True)
    five = page.studies[0]
    assert (five.images, five.modalities, five.reports, five.unread) == (6, ("CT", "MR"), 0, True)
    last = resolved(inbox.worklist(WorklistQuery(user="dr-lee", limit=2, offset=4)))
    assert [s.study_uid for s in last.studies] == ["1.2.3.1"] and not last.has_next and last.total == 5
    beyond = resolved(inbox.worklist(WorklistQuery(user="dr-lee", limit=2, offset=10)))
    assert beyond.studies == () and beyond.total == 5
    (two,) = resolved(inbox.worklist(WorklistQuery(user="dr-lee", has_report=True))).studies
    assert two.study_uid == "1.2.3.2" and two.images == 2 and two.reports == 1 and two.has_report


def test_worklist_filters_in_sql(inbox):
    """Patient (substring or wildcard, case-insensitive, SQL wildcards literal), modality, date range and read
    state for the user filter in the query, and the total counts only what matches."""
    def uids(**kw):
        page = resolved(inbox.worklist(WorklistQuery(user="dr-lee", **kw)))
        assert page.total == len(page.studies)
        return [s.study_uid for s in page.studies]

    assert uids(patient="pat4") == ["1.2.3.4"]
    assert uids(patient="p00?") == ["1.2.3.5", "1.2.3.4", "1.2.3.3", "1.2.3.2", "1.2.3.1"]
    assert uids(patient="50%") == ["1.2.3.3"] and uids(patient="0%x") == []
    assert uids(patient="%") == ["1.2.3.3"] and uids(patient="_") == ["1.2.3.3"]  # not every study
    assert uids(modality="MR") == ["1.2.3.5"]
    assert uids(date_from="20240102", date_to="20240103") == ["1.2.3.3", "1.2.3.2"]
    assert uids(date_from="20240104") == ["1.2.3.5", "1.2.3.4"]
    mark = resolved(inbox.mark_opened("1.2.3.4.1.2", "dr-lee"))
    assert mark.first and mark.at == inbox.now()
    assert not resolved(inbox.mark_opened("1.2.3.4.1.2", "dr-lee")).first
    assert uids(status="read") == ["1.2.3.4"]
    assert "1.2.3.4" not in uids(status="unread") and len(uids(status="unread")) == 4
    (row,) = resolved(inbox.worklist(WorklistQuery(user="dr-lee", status="read"))).studies
    assert row.opened_images == 1 and row.images == 4
    assert resolved(inbox.worklist(WorklistQuery(user="dr-kim", status="read"))).studies == ()
    assert resolved(inbox.modalities()) == ["CT", "MR"]


def test_study_detail_series_and_opened(inbox):
    """A study lists its series by number and their images by instance number, with what the user opened."""
    resolved(inbox.mark_opened("1.2.3.5.2.9", "dr-lee"))
    study = resolved(inbox.study("1.2.3.5", "dr-lee"))
    assert [s.series_number for s in study.series] == ["1", "2"] and study.modalities == ("CT", "MR")
    assert [i.instance_number for i in study.series[0].instances] == ["1", "2", "3", "4", "5"]
    assert [i.opened for i in study.series[1].instances] == [True] and study.images == 6
    assert resolved(inbox.study("9.9.9", "dr-lee")) is None


def test_one_like_translator_for_qido_and_the_worklist():
    """DICOM * and ? become % and _; SQL's own % and _ and the escape character match themselves; a substring
    search wraps only a value without wildcards."""
    name = column("name")
    t = table("t", name)

    def pattern(value, **kw):
        clause = wildcard_match(t.c.name, value, **kw)
        return clause.right.value

    assert pattern("DOE*") == "DOE%" and pattern("D?E") == "D_E"
    assert pattern("50%_*") == r"50\%\_%" and pattern("a\\b*") == "a\\\\b%"
    assert pattern("doe", substring=True) == "%doe%" and pattern("do*", substring=True) == "do%"
    assert pattern("DoE", substring=True, ignore_case=True) == "%doe%"


# --- annotations: one validator ---------------------------------------------------------------------------


def _one(kind, n, **extra):
    return [{"type": kind, "points": [[i, i] for i in range(n)], **extra}]


@pytest.mark.parametrize("kind, good, bad", [
    ("arrow", [2], [1, 3]),
    ("line", [2, 3, 1000], [0, 1, 1001]),
    ("ellipse", [2, 4], [1, 3, 5]),
    ("text", [1], [0, 2]),
])
def test_annotation_point_counts_at_their_boundaries(kind, good, bad):
    """Each type takes exactly its point counts (an ellipse 2 corners or 4 axis ends), the same for the overlay
    API and the GSPS builder, which both call check_annotations."""
    for n in good:
        (a,) = check_annotations(_one(kind, n, text="t"))
        assert a.type == kind and len(a.points) == n
    for n in bad:
        with pytest.raises(AnnotationError, match=f"{kind} has"):
            check_annotations(_one(kind, n, text="t"))


def test_annotation_values_at_their_boundaries():
    """Points are finite numbers (not booleans), rounded to 1/100 pixel; a frame is an int from 1; a text
    annotation needs its text, of at most MAX_TEXT characters; an overlay has 1 to MAX_ANNOTATIONS annotations."""
    (a,) = check_annotations([{"type": "text", "points": [[1.234, 5]], "text": " hi ", "frame": 1}])
    assert a.as_json() == {"type": "text", "points": [[1.23, 5.0]], "text": "hi", "frame": 1}
    assert check_annotations([a]) == [a]
    assert len(check_annotations(_one("arrow", 2) * MAX_ANNOTATIONS)) == MAX_ANNOTATIONS
    assert check_annotations(_one("text", 1, text="x" * MAX_TEXT))[0].text == "x" * MAX_TEXT
    for bad, message in [
        (_one("arrow", 2) * (MAX_ANNOTATIONS + 1), "at most"),
        ([], "nothing to save"),
        ({"annotations": []}, "must be a list"),
        ([{"type": "polygon", "points": [[1, 1]]}], "type must be one of"),
        ([{"type": "line", "points": [[1, "x"], [2, 2]]}], "a point is"),
        ([{"type": "line", "points": [[1, float("nan")], [2, 2]]}], "a point is"),
        ([{"type": "line", "points": [[True, 1], [2, 2]]}], "a point is"),
        ([{"type": "line", "points": [[1, 1, 1], [2, 2]]}], "a point is"),
        (_one("text", 1, text=" "), "needs its text"),
        (_one("text", 1, text="x" * (MAX_TEXT + 1)), "longer than"),
        (_one("arrow", 2, frame=0), "frame is a frame number"),
        (_one("arrow", 2, frame=True), "frame is a frame number"),
        (["arrow"], "not an object"),
    ]:
        with pytest.raises(AnnotationError, match=message):
            check_annotations(bad)


def test_the_gsps_builder_uses_the_same_check():
    """build_presentation_state refuses what check_annotations refuses, and a frame the image does not have."""
    from medd.viewer.overlays import build_presentation_state
    from tests.conftest import testdata

    image = testdata("CT_small.dcm")
    with pytest.raises(AnnotationError, match="an ellipse has"):
        build_presentation_state(image, _one("ellipse", 3), user="u", overlay_uid="2.25.1", device="d")
    with pytest.raises(AnnotationError, match="outside 1..1"):
        build_presentation_state(image, _one("arrow", 2, frame=2), user="u", overlay_uid="2.25.1", device="d")
    assert build_presentation_state(image, _one("ellipse", 4), user="u", overlay_uid="2.25.1", device="d")

