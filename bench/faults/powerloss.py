"""What a power loss would keep: the order of the system calls that make an object durable, read
from ``strace -f -y`` of a real central while a modality C-STOREs a few objects. For each object:
the blob's fsync, its rename into place, the fsync of its directory, the database commit (SQLite's
fsync of its write-ahead log) and only then the C-STORE response on the association's socket."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

from .clients import CStoreSender, Ledger, corpus
from .nodes import Pki, central_node

LINE = re.compile(r"^(\d+)\s+(?:\d+:\d+:\d+\.\d+\s+)?(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")


def parse(trace: str) -> list[tuple[str, str]]:
    """(syscall, its arguments as written) in the order the calls completed; an interrupted call
    ("unfinished") counts where it resumed, with the arguments of its first half."""
    started: dict[tuple[str, str], str] = {}
    calls = []
    for line in trace.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        pid, resumed, name, rest = m.groups()
        if resumed:
            calls.append((resumed, started.pop((pid, resumed), "") + rest))
        elif rest.endswith("<unfinished ...>"):
            started[(pid, name)] = rest
        else:
            calls.append((name, rest))
    return calls


def order_of(calls: list[tuple[str, str]], digest: str, port: int) -> list[str] | None:
    """The durability steps of the blob ``digest`` in the order they happened, or None if its rename
    is not in the trace. The ack is the first write to the association's socket (the node's DICOM
    ``port``) after the commit."""
    rename = next((i for i, (n, a) in enumerate(calls) if n.startswith("rename") and digest in a), None)
    if rename is None:
        return None
    tmp = re.search(r"(/[^<>\"]*/tmp/put-[^<>\"]+)", calls[rename][1]).group(1)
    steps = {"rename": rename}
    steps["blob fsync"] = max((i for i, (n, a) in enumerate(calls[:rename]) if n in ("fsync", "fdatasync")
                               and tmp in a), default=-1)
    parent = f"/blobs/{digest[:2]}/{digest[2:4]}>"
    steps["dir fsync"] = next((i for i, (n, a) in enumerate(calls) if i > rename and n == "fsync" and parent in a), -1)
    steps["db commit"] = next((i for i, (n, a) in enumerate(calls) if i > steps["dir fsync"] >= 0
                               and n in ("fsync", "fdatasync") and "index.sqlite" in a), -1)
    steps["ack"] = next((i for i, (n, a) in enumerate(calls) if i > steps["db commit"] >= 0
                         and n in ("sendto", "write", "sendmsg") and f"TCP:[127.0.0.1:{port}->" in a), -1)
    if any(v < 0 for v in steps.values()):
        return [k for k, v in steps.items() if v < 0]  # what is missing
    return sorted(steps, key=steps.get)


EXPECTED = ["blob fsync", "rename", "dir fsync", "db commit", "ack"]


def strace_order(folder: Path, n: int) -> dict:
    """Run a fresh central under strace, C-STORE ``n`` objects, and check each one's order."""
    strace = shutil.which("strace")
    if strace is None:
        return {"objects": 0, "in_order": 0, "skipped": "strace not installed"}
    folder.mkdir(parents=True, exist_ok=True)
    central = central_node(folder / "central", Pki(folder / "pki"))
    out = folder / "strace.txt"
    items = corpus(folder / "corpus", n, "s")
    central.start(timeout=120)
    # Attached to the running node (every thread, and any it starts): what the ingest path does.
    tracer = subprocess.Popen([strace, "-f", "-yy", "-tt", "-o", str(out), "-p", str(central.proc.pid),
                               "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,sendto,write,sendmsg"],
                              stderr=subprocess.PIPE)
    _wait_attached(tracer)
    try:
        ledger = Ledger(folder / "ledger.jsonl")
        sender = CStoreSender(items, ledger, lambda: central.ports)
        sender.batch = 1
        sender.run()  # on this thread
        ledger.close()
    finally:
        tracer.send_signal(signal.SIGINT)  # detach, then stop the node ourselves
        tracer.wait(timeout=30)
        central.stop()
    calls = parse(out.read_text(errors="replace"))
    digests = central_digests(central)
    orders = {uid: order_of(calls, d, central.ports["dicom"]) for uid, d in digests.items()}
    return {"objects": len(orders), "in_order": sum(o == EXPECTED for o in orders.values()),
            "orders": {u: o for u, o in orders.items()}, "trace": str(out)}


def _wait_attached(tracer: subprocess.Popen) -> None:
    """strace says "Process N attached" on stderr for each thread; the first one is enough to go on."""
    line = tracer.stderr.readline()
    if b"attached" not in line:
        raise RuntimeError(f"strace did not attach: {line!r}")


def central_digests(central) -> dict[str, str]:
    from .checker import Holdings
    return Holdings(central.db_url, central.store).objects()
