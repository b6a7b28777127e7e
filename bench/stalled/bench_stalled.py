#!/usr/bin/env python3
"""A modality's C-STORE rate into a central node, unloaded and while 200
stalled or drip-feeding connections sit on each of its listeners (DICOM,
HTTP, TLS socket, SMTP). Issue 9 item 4: loaded/unloaded >= 0.90.

See README.md beside this file.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from meddnode import HOST, MeddCentral, dcmtk_tool, log, proc_cpu_s  # noqa: E402


def make_corpus(folder: Path, count: int, tag: str) -> int:
    """``count`` copies of pydicom's CT_small.dcm, each with its own SOP Instance UID; their total size."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    total = 0
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        path = folder / f"{tag}-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def store(a, node: MeddCentral, corpus: Path, storescu: str) -> dict:
    files = len(list(corpus.iterdir()))
    cmd = [storescu, "-v", "-aet", "MODALITY", "-aec", "MEDD", "+sd", "+r", HOST, str(a.dicom_port), str(corpus)]
    before = node.stored_count()
    cpu0 = proc_cpu_s(node.proc.pid)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=a.run_timeout)
    seconds = time.perf_counter() - t0
    cpu = proc_cpu_s(node.proc.pid) - cpu0
    out = p.stdout.decode(errors="replace")
    ok = out.count("Received Store Response (Success)")
    stored = node.stored_count() - before
    if p.returncode != 0 or ok != files or stored != files:
        (Path(a.work) / f"storescu-{corpus.name}.log").write_text(out)
        raise SystemExit(f"{corpus.name}: storescu rc={p.returncode}, sent {files}, success={ok}, rows={stored}; "
                         f"see {a.work}")
    return {"files": files, "seconds": seconds, "rate": files / seconds, "server_cpu_s": cpu}


class Attacker:
    """attacker.py as a child process; its latest counters."""

    def __init__(self, a, ports: dict[str, int]):
        args = [sys.executable, str(HERE / "attacker.py"), "--per-listener", str(a.per_listener),
                "--drip-interval", str(a.drip_interval), "--per-address", str(a.per_address)]
        for name, port in ports.items():
            args += [f"--{name}", str(port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.latest: dict = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.latest = json.loads(line)

    def wait_full(self, per_listener: int, timeout: float) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"attacker.py exited (rc={self.proc.returncode})")
            opened = self.latest.get("open", {})
            if opened and all(v >= per_listener for v in opened.values()):
                return self.latest
            time.sleep(0.2)
        return self.latest

    def stop(self) -> dict:
        self.proc.terminate()  # our own child, by PID
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return self.latest


def established(port: int) -> int:
    """Established TCP connections to ``port`` on loopback, seen from the node's side."""
    p = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], stdout=subprocess.PIPE,
                       text=True)
    return len(p.stdout.splitlines())


def per_peer_cap(ports: dict[str, int], attempts: int, source: str = "127.0.0.250") -> dict[str, int]:
    """How many of ``attempts`` connections from one address each listener keeps after 2 s."""
    kept = {}
    for name, port in ports.items():
        socks = []
        for _ in range(attempts):
            s = socket.socket()
            s.bind((source, 0))
            try:
                s.connect((HOST, port))
                socks.append(s)
            except OSError:
                s.close()
        time.sleep(2.0)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1  # nothing to read and not closed
            except OSError:
                pass
            s.close()
        kept[name] = alive
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--files", type=int, default=300, help="objects the modality stores per run")
    p.add_argument("--per-listener", type=int, default=200)
    p.add_argument("--per-address", type=int, default=30)
    p.add_argument("--drip-interval", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds under load before the loaded run")
    p.add_argument("--base-port", type=int, default=11131, help="DICOM, HTTP, TLS, SMTP on this and the next three")
    p.add_argument("--run-timeout", type=float, default=600)
    p.add_argument("--work", default=None, help="folder for the node and corpora (default: a fresh temporary one)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args()
    storescu = dcmtk_tool("storescu")
    a.work = a.work or tempfile.mkdtemp(prefix="medd-stalled-")
    work = Path(a.work)
    ports = {"dicom": a.base_port, "http": a.base_port + 1, "tls": a.base_port + 2, "smtp": a.base_port + 3}
    a.dicom_port = ports["dicom"]
    node_dir = work / "central"
    node = MeddCentral(str(node_dir), ports, extra=f"""
        [tls]
        certificate = {node_dir}/tls/cert.pem
        private_key = {node_dir}/tls/key.pem
        """)
    node.write_config()
    from medd.tlscert import make_self_signed

    (node_dir / "tls").mkdir()
    make_self_signed(node_dir / "tls" / "cert.pem", node_dir / "tls" / "key.pem", "central.bench")
    log(f"work folder {work}; corpora of {a.files} objects per run")
    node.start()
    rows = []
    try:
        for rep in range(1, a.reps + 1):
            corpus = work / f"unloaded-{rep}"
            make_corpus(corpus, a.files, corpus.name)
            unloaded = store(a, node, corpus, storescu)
            log(f"rep {rep}: unloaded {unloaded['rate']:6.1f} obj/s ({unloaded['seconds']:.2f} s, "
                f"server cpu {unloaded['server_cpu_s']:.2f} s)")
            corpus = work / f"loaded-{rep}"
            make_corpus(corpus, a.files, corpus.name)
            attacker = Attacker(a, ports)
            try:
                full = attacker.wait_full(a.per_listener, timeout=120)
                time.sleep(a.settle)
                held = {name: established(port) for name, port in ports.items()}
                loaded = store(a, node, corpus, storescu)
                held_after = {name: established(port) for name, port in ports.items()}
            finally:
                counters = attacker.stop()
            log(f"rep {rep}: loaded   {loaded['rate']:6.1f} obj/s ({loaded['seconds']:.2f} s, "
                f"server cpu {loaded['server_cpu_s']:.2f} s); attacker open {full.get('open')}, "
                f"established at the node before/after the run {held} / {held_after}; "
                f"closed by the node so far {counters.get('closed_by_node')}")
            rows.append({"rep": rep, "unloaded": unloaded, "loaded": loaded, "attacker_open": full.get("open"),
                         "established_before": held, "established_after": held_after, "attacker": counters})
            time.sleep(2.0)  # let the node see the attacker's connections go
        cap = per_peer_cap(ports, 200)
        log(f"per-peer cap: of 200 connections from one address, each listener kept {cap}")
    finally:
        node.stop()
    unloaded = statistics.median(r["unloaded"]["rate"] for r in rows)
    loaded = statistics.median(r["loaded"]["rate"] for r in rows)
    ratio = statistics.median(r["loaded"]["rate"] / r["unloaded"]["rate"] for r in rows)
    log(f"median: unloaded {unloaded:.1f} obj/s, loaded {loaded:.1f} obj/s, "
        f"ratio (median of per-rep ratios) {ratio:.3f} (aim >= 0.90)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "unloaded": unloaded, "loaded": loaded, "ratio": ratio,
                                            "per_peer_cap": cap}, indent=2))


if __name__ == "__main__":
    main()
