#!/usr/bin/env python3
"""Central routing under load: C-STORE in, routed by rule, pulled by a viewer.

For each repetition and corpus, two fresh centrals are measured one after
the other, started with ``twistd -n --pidfile= medd --config <ini>`` (DICOM
and HTTP listeners on loopback, SQLite, a temporary folder):

* ``ingest``: plain C-STORE ingest, no directory and no rules (every object
  is quarantined, as on a fresh site). The reference.
* ``routing``: a centre registered for storescu's calling AE title, a pull
  viewer authorised for it and a rule centre -> viewer, all made with the
  ``medd`` CLI against the same ini; a pull viewer (``pull_viewer.py``, its own
  process) lists, fetches and acknowledges as fast as it can while storescu
  sends the corpus.

Both send with the baselines' command (``TCP_NODELAY=1 storescu +sd +r``, one
association). Routing throughput = objects / (last acknowledgement - start of
storescu). Latency per object = its 'delivered' event time minus its
``objects.received_at``, both read from central's SQLite. See README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from meddnode import HOST, REPO, MeddCentral, dcmtk_tool, log, proc_cpu_s  # noqa: E402

CALLING_AE = "BENCHSCU"
CENTRE = "bench-centre"
VIEWER = "dr-bench@viewers.example"


def _utc(dt: datetime) -> float:
    """Epoch seconds of a DateTime read back from SQLite (written in UTC, read back naive)."""
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def fresh_central(a, work: str) -> MeddCentral:
    """A fresh central with DICOM and HTTP listeners and a short outbox poll."""
    node = MeddCentral(work, {"dicom": a.dicom_port, "http": a.http_port},
                       extra=f"[delivery]\npoll_interval = {a.poll_interval}\n", bin_dir=os.path.dirname(a.twistd))
    node.write_config()
    return node


def run_storescu(a, central: MeddCentral, cdir: str, logpath: str) -> tuple[float, float, subprocess.CompletedProcess]:
    env = dict(os.environ, TCP_NODELAY="1")
    cmd = [a.storescu, "-v", "-aet", CALLING_AE, "-aec", "MEDD", "+sd", "+r", HOST, str(central.listen["dicom"]), cdir]
    subprocess.run(["sync"], check=False)
    t0 = time.time()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=a.run_timeout)
    t1 = time.time()
    out = p.stdout.decode(errors="replace")
    with open(logpath, "w") as f:
        f.write(" ".join(cmd) + "\n" + out)
    ok = out.count("Received Store Response (Success)")
    assoc = out.count("Requesting Association")
    files = len(os.listdir(cdir))
    if p.returncode != 0 or ok != files or assoc != 1:
        raise SystemExit(f"storescu rc={p.returncode}, sent {files}, success={ok}, associations={assoc}; see {logpath}")
    return t0, t1, p


def measure_ingest(a, corpus: str, rep: int) -> dict:
    cdir = os.path.join(a.corpus, corpus)
    n = len(os.listdir(cdir))
    central = fresh_central(a, os.path.join(a.work, f"ingest_{corpus}_{rep}"))
    central.start()
    try:
        cpu0 = proc_cpu_s(central.proc.pid)
        t0, t1, _ = run_storescu(a, central, cdir, os.path.join(central.work, "storescu.log"))
        cpu = proc_cpu_s(central.proc.pid) - cpu0
        stored = central.stored_count()
    finally:
        central.stop()
    if stored != n:
        raise SystemExit(f"ingest/{corpus}: {stored} rows for {n} objects")
    r = dict(kind="ingest", corpus=corpus, rep=rep, files=n, seconds=t1 - t0, server_cpu_s=cpu)
    log(f"  ingest  {corpus:<6} rep {rep}: {r['seconds']:6.2f}s {n / r['seconds']:7.1f} obj/s  srv cpu {cpu:5.2f}s")
    return r


def measure_routing(a, corpus: str, rep: int) -> dict:
    cdir = os.path.join(a.corpus, corpus)
    n = len(os.listdir(cdir))
    central = fresh_central(a, os.path.join(a.work, f"routing_{corpus}_{rep}"))
    # The directory, with the same CLI an administrator uses, before the node starts.
    central.cli("centres", "add", CENTRE, "--ae", CALLING_AE)
    token = central.cli("viewers", "add", VIEWER, "--pull", "--authorise", CENTRE).strip().splitlines()[0]
    central.cli("routes", "add", "--centre", CENTRE, "--to", VIEWER)
    central.start()
    viewer_out = os.path.join(central.work, "viewer.json")
    viewer = None
    try:
        viewer = subprocess.Popen(
            [a.python, os.path.join(HERE, "pull_viewer.py"), "--url", f"http://{HOST}:{central.listen['http']}",
             "--token", token, "--expect", str(n), "--idle", str(a.idle), "--timeout", str(a.run_timeout),
             "--out", viewer_out],
            stdout=subprocess.PIPE, stderr=open(os.path.join(central.work, "viewer.log"), "wb"), text=True)
        if viewer.stdout.readline().strip() != "listing":
            raise SystemExit(f"the pull viewer did not start; see {central.work}/viewer.log")
        cpu0 = proc_cpu_s(central.proc.pid)
        t0, t1, _ = run_storescu(a, central, cdir, os.path.join(central.work, "storescu.log"))
        rc = viewer.wait(timeout=a.run_timeout)
        cpu = proc_cpu_s(central.proc.pid) - cpu0
        with open(viewer_out) as f:
            seen = json.load(f)
        if rc != 0 or not seen["complete"]:
            raise SystemExit(f"routing/{corpus}: the viewer acknowledged {len(seen['acked'])} of {n}")
        rows = central.query("""
            SELECT o.received_at, q.at, s.at, e.at
            FROM objects o
            JOIN deliveries d ON d.uid = o.sop_instance_uid
            JOIN delivery_events q ON q.delivery_id = d.id AND q.state = 'queued'
            JOIN delivery_events s ON s.delivery_id = d.id AND s.state = 'sent'
            JOIN delivery_events e ON e.delivery_id = d.id AND e.state = 'delivered'
            ORDER BY o.id""")
        held = central.query("SELECT count(*) FROM quarantine")[0][0]
    finally:
        if viewer is not None and viewer.poll() is None:
            viewer.kill()  # our own child, by PID
            viewer.wait()
        central.stop()
    if len(rows) != n or held:
        raise SystemExit(f"routing/{corpus}: {len(rows)} delivered rows for {n} objects, {held} quarantined")
    recv = [_utc(datetime.fromisoformat(r[0])) for r in rows]
    queued = [_utc(datetime.fromisoformat(r[1])) for r in rows]
    sent = [_utc(datetime.fromisoformat(r[2])) for r in rows]
    done = [_utc(datetime.fromisoformat(r[3])) for r in rows]
    latency = [d - r for r, d in zip(recv, done)]
    to_queue = [q - r for r, q in zip(recv, queued)]
    to_fetch = [s - q for q, s in zip(queued, sent)]
    last_ack = max(seen["acked"].values())
    listings = seen["listings"]
    r = dict(
        kind="routing", corpus=corpus, rep=rep, files=n, seconds=last_ack - t0, storescu_seconds=t1 - t0,
        drain_after_storescu_s=last_ack - t1, server_cpu_s=cpu,
        lat_p50=pct(latency, 50), lat_p99=pct(latency, 99), lat_max=max(latency),
        route_p50=pct(to_queue, 50), route_p99=pct(to_queue, 99),
        fetch_wait_p50=pct(to_fetch, 50), fetch_wait_p99=pct(to_fetch, 99),
        listings=len(listings), listed_max=max(x[1] for x in listings),
        listing_ms_p50=pct([x[2] for x in listings], 50) * 1e3,
        listing_ms_max=max(x[2] for x in listings) * 1e3,
        viewer_fetch_ms=seen["fetch_s"] / n * 1e3, viewer_ack_ms=seen["ack_s"] / n * 1e3,
    )
    log(f"  routing {corpus:<6} rep {rep}: {r['seconds']:6.2f}s {n / r['seconds']:7.1f} obj/s "
        f"(storescu {r['storescu_seconds']:.2f}s, drain +{r['drain_after_storescu_s']:.2f}s)  "
        f"latency p50 {r['lat_p50'] * 1e3:.0f} ms p99 {r['lat_p99'] * 1e3:.0f} ms  "
        f"route p50 {r['route_p50'] * 1e3:.0f} ms p99 {r['route_p99'] * 1e3:.0f} ms  "
        f"listings {r['listings']} (max {r['listed_max']} rows, p50 {r['listing_ms_p50']:.1f} ms, "
        f"max {r['listing_ms_max']:.0f} ms)  srv cpu {cpu:5.2f}s")
    return r


def med(rows: list[dict], key) -> tuple[float, float, float]:
    values = [key(r) for r in rows]
    return statistics.median(values), min(values), max(values)


def print_table(results: list[dict], corpora: list[str]) -> None:
    def fmt(m, lo, hi, f="{:.0f}"):
        return f"{f.format(m)} ({f.format(lo)}-{f.format(hi)})"

    print(f"{'corpus':<6} {'reps':>4} {'ingest obj/s':>18} {'routing obj/s':>18} {'ratio':>16} "
          f"{'latency p50 ms':>18} {'latency p99 ms':>18} {'storescu obj/s (routing)':>25}")
    for c in corpora:
        ing = [r for r in results if r["kind"] == "ingest" and r["corpus"] == c]
        rou = [r for r in results if r["kind"] == "routing" and r["corpus"] == c]
        if not ing or not rou:
            continue
        ratios = [(x["files"] / x["seconds"]) / (y["files"] / y["seconds"])
                  for x, y in zip(sorted(rou, key=lambda r: r["rep"]), sorted(ing, key=lambda r: r["rep"]))]
        print(f"{c:<6} {len(rou):>4} "
              f"{fmt(*med(ing, lambda r: r['files'] / r['seconds'])):>18} "
              f"{fmt(*med(rou, lambda r: r['files'] / r['seconds'])):>18} "
              f"{fmt(statistics.median(ratios), min(ratios), max(ratios), '{:.2f}'):>16} "
              f"{fmt(*med(rou, lambda r: r['lat_p50'] * 1e3)):>18} "
              f"{fmt(*med(rou, lambda r: r['lat_p99'] * 1e3)):>18} "
              f"{fmt(*med(rou, lambda r: r['files'] / r['storescu_seconds'])):>25}")
    print("ratio = routing obj/s / ingest obj/s of the same repetition; median (min-max) over repetitions")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="/tmp/dicombench/corpus")
    p.add_argument("--corpora", default="small", help="comma-separated subfolders of --corpus (small,large)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dicom-port", type=int, default=11129)
    p.add_argument("--http-port", type=int, default=18089)
    p.add_argument("--poll-interval", type=float, default=0.1, help="[delivery] poll_interval of central")
    p.add_argument("--idle", type=float, default=0.01, help="the viewer's pause after an empty listing (s)")
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--work", help="keep everything here (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the raw rows here")
    a = p.parse_args()
    venv = os.path.join(REPO, ".venv", "bin")
    a.twistd, a.medd, a.python = (os.path.join(venv, x) for x in ("twistd", "medd", "python"))
    a.storescu = dcmtk_tool("storescu")
    corpora = a.corpora.split(",")
    for c in corpora:
        if not os.path.isdir(os.path.join(a.corpus, c)):
            raise SystemExit(f"no corpus {a.corpus}/{c}: build it with the baselines harness (bench/README.md) "
                             f"(or its make_corpus.py) first")
    keep = bool(a.work)
    a.work = a.work or tempfile.mkdtemp(prefix="medd-routing-bench-")
    log(f"work folder {a.work}; load average {os.getloadavg()}")
    results = []
    try:
        for rep in range(1, a.reps + 1):
            for c in corpora:
                results.append(measure_ingest(a, c, rep))
                results.append(measure_routing(a, c, rep))
    finally:
        if not keep:
            shutil.rmtree(a.work, ignore_errors=True)
    log(f"load average {os.getloadavg()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print_table(results, corpora)
    return 0


if __name__ == "__main__":
    sys.exit(main())
