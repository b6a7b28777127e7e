"""CPU per object of a medd central's C-STORE ingest, two checkouts side by side.

For each repetition and each tree (a checkout with its own ``.venv``), in
alternation so that both share the machine's drifting load: start a fresh
central (routing on), send the corpus with DCMTK ``storescu`` over one
association (or ``--associations N`` storescu processes, each a slice), wait
until every object has its routing decision, and print obj/s (storescu wall
time) and the receiver's user+sys CPU per object (from ``/proc/PID/stat``,
counted until routing is done, so work deferred past the acknowledgement is
not missed). ``--profile DIR`` runs py-spy on the receiver and writes one raw
profile per run (``bench/pyspy_summary.py`` sums it up).

    .venv/bin/python bench/cstore_cpu.py --tree before=/work/wt/perf-before --tree after=. --reps 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meddnode import MeddCentral, dcmtk_tool, log, proc_cpu_s  # noqa: E402


def proc_sys_s(pid: int) -> float:
    """System CPU seconds of a process so far (fsync, writes, sockets)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[12]) / os.sysconf("SC_CLK_TCK")


def corpus_files(corpus: str) -> list[str]:
    out = []
    for root, _, names in os.walk(corpus):
        out += [os.path.join(root, n) for n in sorted(names)]
    return sorted(out)


def send(files: list[str], port: int, associations: int) -> None:
    """storescu processes, each sending its slice of ``files`` over one association, all at once."""
    procs = [subprocess.Popen([dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", "MEDD", "127.0.0.1", str(port),
                               *files[i::associations]],
                              env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(associations)]
    for p in procs:
        if p.wait():
            raise SystemExit(f"storescu failed (rc={p.returncode})")


def one_run(tree: str, files: list[str], port: int, associations: int, profile: str | None, gil: bool = False,
            routed: bool = False, dicom: str = "") -> dict:
    work = tempfile.mkdtemp(prefix="cstore-cpu-")
    node = MeddCentral(work, {"dicom": port}, bin_dir=os.path.join(tree, ".venv", "bin"),
                       dicom=dict(kv.split("=", 1) for kv in dicom.split(",") if kv))
    node.write_config()
    if routed:
        # storescu's AE title is a registered centre's, with a rule to a pull viewer: every
        # object is routed and queued in the outbox (no viewer fetches it here).
        node.cli("centres", "add", "bench-centre", "--ae", "BENCHSCU")
        node.cli("viewers", "add", "dr-bench@viewers.example", "--pull", "--authorise", "bench-centre")
        node.cli("routes", "add", "--centre", "bench-centre", "--to", "dr-bench@viewers.example")
    node.start()
    spy = None
    try:
        if profile:
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(node.proc.pid),
                 "-r", "100", "-f", "raw", "-o", profile, "--threads", "--nonblocking", "-d", "900", *(["--gil"] if gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        c0, s0 = proc_cpu_s(node.proc.pid), proc_sys_s(node.proc.pid)
        t0 = time.monotonic()
        send(files, port, associations)
        wall = time.monotonic() - t0
        acked_cpu = proc_cpu_s(node.proc.pid) - c0
        n = node.stored_count()
        deadline = time.monotonic() + 60
        while node.query("SELECT count(*) FROM routing_decisions")[0][0] < n and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu, sys_cpu = proc_cpu_s(node.proc.pid) - c0, proc_sys_s(node.proc.pid) - s0
        if spy is not None:
            spy.send_signal(2)  # our own child: py-spy writes its profile on SIGINT
            spy.wait()
    finally:
        node.stop()
        subprocess.run(["rm", "-rf", work])
    if n != len(files):
        raise SystemExit(f"{tree}: stored {n} of {len(files)}")
    return {"obj_s": n / wall, "cpu_ms": cpu / n * 1000, "sys_ms": sys_cpu / n * 1000,
            "acked_cpu_ms": acked_cpu / n * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True,
                   help="NAME=PATH of a checkout with .venv; NAME=PATH=KEY=VALUE,... sets [dicom] keys")
    p.add_argument("--corpus", default="/tmp/dicombench/corpus/small")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--associations", type=int, default=1)
    p.add_argument("--port", type=int, default=11319)
    p.add_argument("--profile", help="folder for one py-spy raw profile per run")
    p.add_argument("--routed", action="store_true",
                   help="a registered centre and a rule to a pull viewer (default: no directory, all quarantined)")
    p.add_argument("--gil", action="store_true", help="profile only the thread holding the GIL (py-spy --gil)")
    args = p.parse_args()
    trees = [(t.split("=", 2) + [""])[:3] for t in args.tree]
    files = corpus_files(args.corpus)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in trees}
    for rep in range(args.reps):
        for name, path, extra in (trees if rep % 2 == 0 else trees[::-1]):
            profile = os.path.join(args.profile, f"{name}-{rep}.raw") if args.profile else None
            r = one_run(os.path.abspath(path), files, args.port, args.associations, profile, args.gil, args.routed,
                        extra)
            results[name].append(r)
            log(f"rep {rep} {name:10s} {r['obj_s']:7.1f} obj/s  CPU {r['cpu_ms']:5.2f} ms/obj (sys {r['sys_ms']:4.2f}) "
                f"({r['acked_cpu_ms']:5.2f} until the last ack)  load {os.getloadavg()[0]:.1f}")
    print(f"corpus {args.corpus} ({len(files)} objects), {args.associations} association(s), "
          f"{'routed to a viewer' if args.routed else 'quarantined (no directory)'}, {args.reps} reps; medians")
    print(f"{'tree':10s} {'obj/s':>8s} {'CPU ms/obj':>11s} {'(min-max)':>13s} {'of it sys':>10s}")
    for name, runs in results.items():
        cpu = [r["cpu_ms"] for r in runs]
        print(f"{name:10s} {statistics.median(r['obj_s'] for r in runs):8.1f} {statistics.median(cpu):11.2f} "
              f"{min(cpu):6.2f}-{max(cpu):<6.2f} {statistics.median(r['sys_ms'] for r in runs):10.2f}")


if __name__ == "__main__":
    main()
