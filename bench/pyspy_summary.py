"""Sum up a raw py-spy profile (``py-spy record -f raw --threads``, as bench/cstore_cpu.py
--profile writes): samples per thread, then per function inclusive (the function anywhere in
the stack, counted once per sample) and self (the innermost frame). The reactor's idle
``epoll`` wait is left out. With ``--objects N`` it also puts every sample in one of the
parts of the C-STORE path below (first match wins) and prints each part in ms per object
(samples / ``--rate`` / N): with ``py-spy --gil``, the time each part holds the GIL.

    .venv/bin/python bench/pyspy_summary.py /tmp/prof/after-0.raw --top 60 --objects 2000
"""
from __future__ import annotations

import argparse
import collections


def frame_name(frame: str) -> str:
    """``function file.py`` of a py-spy frame ``function (path/file.py:line)``."""
    function = frame.split(" (")[0]
    where = frame.split("/")[-1].split(":")[0] if "/" in frame else ""
    return f"{function} {where}".strip()


# (part, what a stack must contain); the thread name is the first frame.
PARTS = (
    ("start-up (schema, imports; not per object)", lambda st: st.startswith("thread") and "MainThread" in st.split(";")[0]
     and "mainLoop" not in st),
    ("association set-up (once)", lambda st: "process_request_thread" in st),
    ("parse + check, key information (pydicom)", lambda st: "parse_part10" in st),
    ("blob write (sha256, write, fsync file + dirs)", lambda st: "FileBlobStore.put" in st),
    ("C-STORE bytes + file meta", lambda st: "dicom.py:" in st and ("part10 (" in st or "encoded_dataset" in st)),
    ("index transaction (object row, audit row)", lambda st: "ObjectIndex.store_object" in st),
    ("routing pass (decisions, quarantine, outbox)", lambda st: "route_undecided" in st),
    ("database pool: batching, commit", lambda st: "medd-db" in st.split(";")[0]),
    ("parsing pool: hand-offs", lambda st: "medd-parse" in st.split(";")[0]),
    ("pynetdicom DUL thread (PDUs in and out)", lambda st: "run_reactor)" in st.split(";")[0]),
    ("pynetdicom association thread (DIMSE, C-STORE-RSP, waiting)", lambda st: "AcceptorThread" in st.split(";")[0]),
    ("reactor (ingest coroutine, Deferreds, hooks)", lambda st: "mainLoop" in st),
    ("pynetdicom acceptor (housekeeping)", lambda st: "medd-dicom-acceptor" in st.split(";")[0]),
)


def parts(raw: str) -> dict[str, int]:
    """Samples per part of :data:`PARTS` ("other" for the rest)."""
    found: dict[str, int] = dict.fromkeys([name for name, _ in PARTS] + ["other"], 0)
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or ("doPoll" in stack and "epoll" in stack.split(";")[-1]):
                continue
            name = next((name for name, test in PARTS if test(stack)), "other")
            found[name] += int(count)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--objects", type=int, help="objects sent: print the parts of the path in ms per object")
    p.add_argument("--rate", type=float, default=100, help="py-spy's samples per second (-r)")
    args = p.parse_args()
    if args.objects:
        for name, n in parts(args.raw).items():
            print(f"{n / args.rate / args.objects * 1000:6.3f} ms/obj  {n:6d}  {name}")
        return
    threads, inclusive, own = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    with open(args.raw) as f:
        for line in f:
            line = line.rstrip()
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            n = int(count)
            frames = stack.split(";")
            if "doPoll" in stack and "epoll" in frames[-1]:
                continue
            total += n
            threads[frames[0].split(":")[-1]] += n
            for name in {frame_name(fr) for fr in frames[1:]}:
                inclusive[name] += n
            own[frame_name(frames[-1])] += n
    print("samples", total)
    for title, counter, top in (("threads", threads, 10), ("inclusive", inclusive, args.top), ("self", own, 30)):
        print(f"-- {title}")
        for name, n in counter.most_common(top):
            print(f"{n:6d} {100 * n / max(total, 1):5.1f}% {name}")


if __name__ == "__main__":
    main()
