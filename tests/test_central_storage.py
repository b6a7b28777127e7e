"""Central's storage connectors on SQLite and PostgreSQL: one method is one transaction (a refused
change leaves nothing behind), stamps come from the injected clock, results are dataclasses; and
the inline database the CLI uses runs the very same methods."""
from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from medd.central.storage import CentralStorage
from medd.config import load_config
from medd.storage.connector import utc
from medd.storage.database import Database, open_database, resolved
from medd.storage.directory import DirectoryError, NewViewer, Viewer
from tests.conftest import write_config


@pytest.fixture
def storage(db_url):
    database = Database(reactor, db_url)
    database.create_schema()
    database.start()
    clock = Clock()
    clock.advance(1_600_000_000)
    yield CentralStorage.over(database, clock)
    database.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_directory_change_leaves_nothing(storage):
    """Adding a viewer with an authorisation for an unknown centre fails as a whole: no viewer remains;
    with the centre added, the same call succeeds and returns dataclasses stamped by the clock."""
    directory = storage.directory
    with pytest.raises(DirectoryError, match="no imaging centre centre-a"):
        await directory.add_viewer("dr@viewers.example", None, ["centre-a:CT"])
    assert await directory.viewers() == []
    await directory.add_centre("centre-a", aes=["CT1"], addresses=["CT@Centre-A.example"])
    added = await directory.add_viewer("Dr@Viewers.example", None, ["centre-a:ct"])
    assert isinstance(added, NewViewer) and isinstance(added.viewer, Viewer)
    assert added.viewer.address == "dr@viewers.example" and added.viewer.authorisations == ("centre-a:CT",)
    assert await directory.viewer_by_token(added.token) == added.viewer
    assert (await directory.centre("centre-a")).aliases == (("ae", "CT1"), ("address", "ct@centre-a.example"))
    with pytest.raises(DirectoryError, match="already identifies another centre"):
        await directory.add_centre("centre-b", aes=["CT1"])
    assert [c.name for c in await directory.centres()] == ["centre-a"]
    with pytest.raises(DirectoryError, match="has no authorisation"):
        await directory.revoke("dr@viewers.example", "centre-a")
    await directory.revoke("dr@viewers.example", "centre-a:CT")
    assert (await directory.viewer("dr@viewers.example")).authorisations == ()
    claim = await directory.claimants("dr@viewers.example", added.token)
    assert claim.named == claim.authenticated


def test_the_cli_runs_the_same_connectors_inline(tmp_path):
    """open_database without a reactor runs a connector's transaction on the calling thread:
    resolved() takes its result or raises its error, as the CLI does."""
    config = load_config(write_config(tmp_path))
    database = open_database(config)
    try:
        clock = Clock()
        clock.advance(1_600_000_000)
        storage = CentralStorage.over(database, clock)
        rule = resolved(storage.directory.add_rule("dr@viewers.example", centre="centre-a", modality="mr"))
        assert dataclasses.asdict(rule) == {"id": rule.id, "centre": "centre-a", "modality": "MR", "object_type": "",
                                            "destination": "dr@viewers.example"}
        with pytest.raises(DirectoryError, match="at least one of"):
            resolved(storage.directory.add_rule("dr@viewers.example"))
        assert resolved(storage.routing.quarantined()) == []
        assert resolved(storage.tracking.track("1.2.3")) == []
        assert utc(clock.seconds()) == storage.directory.now()
    finally:
        database.stop()
