#!/usr/bin/env python3
"""C-STORE ingest into a fresh medd central, beside Orthanc and DCMTK storescp.

One run measures, for each repetition, medd on every corpus and then the
baseline receivers (Orthanc, storescp) on the same corpora, interleaved so
that the machine's load drifts over all of them alike. The method is the one
of ``../shared/baselines/bench_ingest.py``, which runs the baselines itself
(it is invoked, not copied): DCMTK ``storescu +sd +r`` with ``TCP_NODELAY=1``
on one association, timed by wall clock, every ``Success`` response counted,
and the receiver's own count checked (for medd: rows in its SQLite
``objects`` table).

medd runs with the shipped defaults: SQLite index (WAL, synchronous=FULL),
fsync'd blobs, full indexing. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meddnode import HOST, REPO, MeddCentral, dcmtk_tool, log, proc_cpu_s  # noqa: E402


def measure_medd(a, corpus: str, rep: int, storescu: str) -> dict:
    cdir = os.path.join(a.corpus, corpus)
    files = sorted(os.listdir(cdir))
    nbytes = sum(os.path.getsize(os.path.join(cdir, f)) for f in files)
    node = MeddCentral(os.path.join(a.work, "medd"), {"dicom": a.medd_port}, bin_dir=os.path.dirname(a.twistd))
    node.write_config()
    node.start()
    try:
        env = dict(os.environ, TCP_NODELAY="1")
        cmd = [storescu, "-v", "-aet", "BENCHSCU", "-aec", "MEDD", "+sd", "+r", HOST, str(a.medd_port), cdir]
        subprocess.run(["sync"], check=False)
        cpu0 = proc_cpu_s(node.proc.pid)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=a.run_timeout)
        dt = time.perf_counter() - t0
        srv_cpu = proc_cpu_s(node.proc.pid) - cpu0
        out = p.stdout.decode(errors="replace")
        with open(os.path.join(a.work, f"storescu_medd_{corpus}_{rep}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n" + out)
        ok = out.count("Received Store Response (Success)")
        assoc = out.count("Requesting Association")
        stored = node.stored_count()
    finally:
        node.stop()
    if p.returncode != 0 or ok != len(files) or stored != len(files) or assoc != 1:
        raise SystemExit(f"medd/{corpus}: storescu rc={p.returncode}, sent {len(files)}, "
                         f"success={ok}, rows={stored}, associations={assoc}")
    log(f"  medd        {corpus:<6} rep {rep}: {dt:6.2f}s {len(files) / dt:7.1f} obj/s "
        f"{nbytes / dt / 1e6:6.1f} MB/s  srv cpu {srv_cpu:5.2f}s")
    return dict(target="medd", corpus=corpus, rep=rep, files=len(files), bytes=nbytes,
                seconds=dt, server_cpu_s=srv_cpu)


def measure_baselines(a, rep: int, storescu: str, storescp: str) -> list[dict]:
    """One repetition of bench_ingest.py for the baseline targets; its raw rows."""
    work = os.path.join(a.work, f"baselines_{rep}")
    cmd = [sys.executable, os.path.join(a.baselines, "bench_ingest.py"), "--corpus", a.corpus,
           "--work", work, "--reps", "1", "--targets", a.targets, "--corpora", a.corpora,
           "--no-refs", "--nagle-subset", "0", "--storescu-bin", storescu, "--storescp-bin", storescp]
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "bench_ingest.log"), "wb") as logf:
        p = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=a.run_timeout * 4)
    if p.returncode != 0:
        raise SystemExit(f"bench_ingest.py failed (rc={p.returncode}); see {work}/bench_ingest.log")
    with open(os.path.join(work, "results.json")) as f:
        raw = json.load(f)["raw"]
    for r in raw:
        r["rep"] = rep
        log(f"  {r['target']:<11} {r['corpus']:<6} rep {rep}: {r['seconds']:6.2f}s "
            f"{r['files'] / r['seconds']:7.1f} obj/s {r['bytes'] / r['seconds'] / 1e6:6.1f} MB/s")
    return raw


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["target"], r["corpus"]), []).append(r)
    summary = {}
    for key, rs in out.items():
        ops = [r["files"] / r["seconds"] for r in rs]
        mbs = [r["bytes"] / r["seconds"] / 1e6 for r in rs]
        summary[key] = dict(n=len(rs), files=rs[0]["files"], mb=rs[0]["bytes"] / 1e6,
                            ops=statistics.median(ops), ops_min=min(ops), ops_max=max(ops),
                            mbs=statistics.median(mbs),
                            cpu_ms=statistics.median(r["server_cpu_s"] for r in rs) / rs[0]["files"] * 1e3)
    return summary


def print_table(summary: dict, corpora: list[str], targets: list[str]) -> None:
    print(f"{'target':<10} {'corpus':<6} {'n':>2} {'files':>5} {'MB':>6} {'obj/s med':>9} "
          f"{'(min-max)':>15} {'MB/s med':>8} {'srvCPU ms/obj':>13}")
    for t in ["medd", *targets]:
        for c in corpora:
            s = summary.get((t, c))
            if s:
                rng = f"({s['ops_min']:.0f}-{s['ops_max']:.0f})"
                print(f"{t:<10} {c:<6} {s['n']:>2} {s['files']:>5} {s['mb']:>6.1f} {s['ops']:>9.1f} "
                      f"{rng:>15} {s['mbs']:>8.1f} {s['cpu_ms']:>13.2f}")
    print()
    for c in corpora:
        m = summary.get(("medd", c))
        if not m:
            continue
        ratios = [f"medd/{t} = {m['ops'] / summary[(t, c)]['ops']:.2f}" for t in targets if (t, c) in summary]
        if ratios:
            print(f"{c:<6} obj/s ratio: " + "   ".join(ratios))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/dicombench/corpus",
                    help="folder with small/ and large/ (built by make_corpus.py if missing)")
    ap.add_argument("--baselines", default=os.path.join(os.path.dirname(REPO), "shared", "baselines"),
                    help="folder of bench_ingest.py and make_corpus.py")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder, removed after)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--corpora", default="small,large")
    ap.add_argument("--targets", default="orthanc,storescp", help="baseline targets of bench_ingest.py ('' = none)")
    ap.add_argument("--medd-port", type=int, default=11119)
    ap.add_argument("--twistd", default=os.path.join(REPO, ".venv", "bin", "twistd"))
    ap.add_argument("--run-timeout", type=float, default=300)
    ap.add_argument("--json", help="also write the raw rows and summary here")
    a = ap.parse_args()

    storescu, storescp = dcmtk_tool("storescu"), dcmtk_tool("storescp")
    if not os.path.exists(os.path.join(a.corpus, "manifest.json")):
        log(f"building the corpus in {a.corpus}")
        subprocess.run([sys.executable, os.path.join(a.baselines, "make_corpus.py"), "--out", a.corpus,
                        "--force"], check=True, stdout=subprocess.DEVNULL)
    own_work = a.work is None
    a.work = a.work or tempfile.mkdtemp(prefix="medd-bench-")
    os.makedirs(a.work, exist_ok=True)
    corpora = [c for c in a.corpora.split(",") if c]
    targets = [t for t in a.targets.split(",") if t]

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    rows: list[dict] = []
    t_start = time.perf_counter()
    try:
        for rep in range(1, a.reps + 1):
            for c in corpora:
                rows.append(measure_medd(a, c, rep, storescu))
            if targets:
                rows.extend(measure_baselines(a, rep, storescu, storescp))
    finally:
        if own_work:
            shutil.rmtree(a.work, ignore_errors=True)
    summary = summarize(rows)
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL).stdout.decode().strip()
    print(f"# medd {head}; {a.reps} reps; obj/s = files / storescu wall time, MB = 1e6 bytes; "
          f"{time.perf_counter() - t_start:.0f}s; load avg {os.getloadavg()[0]:.2f}")
    print_table(summary, corpora, targets)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"raw": rows, "summary": [dict(target=t, corpus=c, **s) for (t, c), s in summary.items()]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
