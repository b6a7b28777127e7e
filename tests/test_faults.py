"""The short fault campaign (issue 13; the long one is bench/faults/README.md): real twistd nodes
(central, a pull viewer, a push viewer, a gateway), real clients on every transport keeping a ledger
of what was acknowledged, SIGKILLs at random instants, a full blob store, a viewer away while its
queue grows, PostgreSQL's backends terminated and the server crashed, and an independent checker
that reads the databases and blob folders directly and fetches through WADO-RS."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.faults.powerloss import EXPECTED, order_of, parse

ROOT = Path(__file__).resolve().parent.parent


def _can_mount_tmpfs(tmp_path) -> bool:
    target = tmp_path / "probe"
    target.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                                           capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(target)])
    return True


def _run(tmp_path, *argv: str) -> dict:
    """The campaign in a process of its own (its TLS client needs a reactor of its own, not the
    test session's); its figures."""
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "bench.faults.campaign", "--work", str(tmp_path / "campaign"),
                           "--json", str(out), *argv], cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, done.stderr[-5000:])
    assert out.exists(), done.stderr[-5000:]
    return json.loads(out.read_text())


def _holds(figures: dict) -> None:
    """What every campaign must show: nothing acknowledged is lost or wrong, nothing duplicated, no
    row without its blob, no delivery acknowledged that the viewer lacks, every queued delivery
    made, no orphan left after the sweep."""
    assert figures["acknowledged"] > 0
    for transport in ("cstore", "stow", "smtp", "tls"):  # every client got acknowledgements
        assert figures["acknowledged_by_transport"].get(transport, 0) > 0, figures["acknowledged_by_transport"]
    assert figures["lost"] == 0, figures["lost_uids"]
    assert figures["wrong_digest"] == 0
    assert figures["rows_without_blob"] == 0
    assert figures["half_written"] == 0
    assert figures["duplicated_deliveries"] == 0
    assert figures["delivery_acked_not_held"] == 0
    assert figures["not_delivered"] == 0
    assert figures["false_successes"] == 0
    assert figures["orphans_after_sweep"] == 0
    assert figures["wado_checked"] > 0 and figures["wado_mismatch"] == 0


# Each node start costs a few seconds of CPU (twistd, imports); on 2 shared cores this test takes 2-4 min.
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (make test-tools installs it)")
def test_kills_full_store_viewer_offline_and_fsync_order(tmp_path):
    """Eight SIGKILLs (central, the viewers, the gateway) under C-STORE, STOW-RS, SMTP and TLS load,
    then central's blob store (a tmpfs) filled up, then the push viewer away while objects queue,
    then a central under strace: the ledger holds (see _holds); the full store gave temporary
    refusals only, left nothing half-written, still served WADO-RS, and took objects again by
    itself once space came back; the viewer got its whole queue in order with central's backoff
    never above its maximum; and each traced object went blob fsync, rename, directory fsync,
    database commit, then the C-STORE response."""
    full = _can_mount_tmpfs(tmp_path)
    figures = _run(tmp_path, "--central-kills", "4", "--viewer-kills", "2", "--gateway-kills", "2",
                   "--objects", "200", "--offline-objects", "30", "--full-store-objects", "20", "--store-mb", "64", "--wado-sample", "20",
                   *([] if full else ["--no-full-store"]))
    _holds(figures)
    assert sum(v for k, v in figures["faults"].items() if k.startswith("kill -9")) >= 4
    assert figures["delivered_to_pull"] > 0 and figures["delivered_to_push"] > 0
    assert figures["offline_queued"] == 30 and figures["offline_out_of_order"] == 0
    assert 0 < figures["offline_longest_backoff_s"] <= figures["offline_backoff_max_s"]
    assert figures["fsync_order"]["objects"] == 3
    assert figures["fsync_order"]["in_order"] == 3, figures["fsync_order"]["orders"]
    if full:
        assert figures["full_store_temporary_refusals"] > 0
        assert figures["full_store_half_written"] == 0
        assert figures["full_store_wado_failures"] == 0


def _initdb() -> str | None:
    return shutil.which("initdb") or next(iter(sorted(
        str(p) for p in Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)


@pytest.mark.timeout(900)
@pytest.mark.skipif(_initdb() is None or os.geteuid() != 0,
                    reason="needs PostgreSQL's server binaries (initdb; make test-tools installs them) and root "
                           "to run a private cluster as the postgres user")
def test_postgres_outages_under_load(tmp_path):
    """Central on a private PostgreSQL cluster: its backends terminated and the server crashed and
    restarted (pg_ctl restart -m immediate) while every transport sends: no false success (each
    acknowledged object is indexed with its blob), and central takes objects again by itself."""
    figures = _run(tmp_path, "--postgres", "--central-kills", "0", "--viewer-kills", "0", "--gateway-kills", "0",
                   "--objects", "20", "--pg-faults", "6", "--pg-objects", "120", "--no-full-store",
                   "--offline-objects", "0", "--no-strace", "--wado-sample", "10")
    _holds(figures)
    assert figures["faults"]["pg_terminate_backend"] == 4 and figures["faults"]["postgres restart"] == 2
    assert figures["postgres_reconnected"] == 1
    assert figures["pg_acknowledged"] == 120  # every sender got through after the outages, no restart of central


def test_fsync_order_reader_spots_an_ack_before_the_commit():
    """The strace reader is not a rubber stamp: a trace where the C-STORE response went out before
    the database's fsync is reported out of order."""
    digest = "ab" * 32
    trace = "\n".join([
        '10 12:00:00.000001 fsync(7</s/store/tmp/put-x>) = 0',
        f'10 12:00:00.000002 rename("/s/store/tmp/put-x", "/s/store/blobs/ab/ab/{digest}") = 0',
        '10 12:00:00.000003 fsync(8</s/store/blobs/ab/ab>) = 0',
        '11 12:00:00.000004 sendto(9<TCP:[127.0.0.1:104->127.0.0.1:5000]>, "\\4", 1, 0, NULL, 0) = 1',
        '12 12:00:00.000005 fsync(5</s/index.sqlite-wal> <unfinished ...>',
        '12 12:00:00.000006 <... fsync resumed>) = 0',
        '11 12:00:00.000007 sendto(9<TCP:[127.0.0.1:104->127.0.0.1:5000]>, "\\4", 1, 0, NULL, 0) = 1',
    ])
    calls = parse(trace)
    assert order_of(calls, digest, 104) == EXPECTED  # the reply after the commit is found
    late = parse(trace.rsplit("\n", 1)[0])  # only the early reply: no ack after the commit
    assert order_of(late, digest, 104) == ["ack"]
    early_commit = trace.replace("12 12:00:00.000005 fsync(5</s/index.sqlite-wal> <unfinished ...>\n"
                                 "12 12:00:00.000006 <... fsync resumed>) = 0\n", "")
    assert order_of(parse(early_commit), digest, 104) == ["db commit", "ack"]
