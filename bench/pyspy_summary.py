"""Sum up a raw py-spy profile (``py-spy record -f raw --threads``, as bench/cstore_cpu.py
--profile writes): samples per thread, then per function inclusive (the function anywhere in
the stack, counted once per sample) and self (the innermost frame). The reactor's idle
``epoll`` wait is left out.

    .venv/bin/python bench/pyspy_summary.py /tmp/prof/after-0.raw --top 60
"""
from __future__ import annotations

import argparse
import collections


def frame_name(frame: str) -> str:
    """``function file.py`` of a py-spy frame ``function (path/file.py:line)``."""
    function = frame.split(" (")[0]
    where = frame.split("/")[-1].split(":")[0] if "/" in frame else ""
    return f"{function} {where}".strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--top", type=int, default=60)
    args = p.parse_args()
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
