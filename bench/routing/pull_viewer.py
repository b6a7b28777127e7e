#!/usr/bin/env python3
"""A pull viewer as fast as one HTTP client can be: GET /outbox, then GET and
POST .../ack every listed package, again and again, until ``--expect``
packages are acknowledged (or ``--timeout``). Run in its own process by
``bench_routing.py``; writes what it saw as JSON.

Wall-clock times (``time.time()``) so that the driver can compare them with
its own; all processes run on the same machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True, help="central's HTTP base URL, e.g. http://127.0.0.1:18080")
    p.add_argument("--token", required=True, help="the viewer's bearer token")
    p.add_argument("--expect", type=int, required=True, help="stop after this many acknowledgements")
    p.add_argument("--idle", type=float, default=0.01, help="seconds to wait after an empty listing")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args()

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {a.token}"
    acked: dict[int, float] = {}
    listings = []  # (wall time, packages listed, seconds the listing took)
    fetch_s = ack_s = 0.0
    fetched_bytes = 0
    t_end = time.time() + a.timeout
    ready = True
    while len(acked) < a.expect and time.time() < t_end:
        t0 = time.time()
        r = session.get(f"{a.url}/outbox")
        r.raise_for_status()
        waiting = r.json()
        listings.append((t0, len(waiting), time.time() - t0))
        if ready:
            print("listing", flush=True)  # tells the driver the viewer is up
            ready = False
        todo = [w for w in waiting if w["id"] not in acked]
        if not todo:
            time.sleep(a.idle)
            continue
        for item in todo:
            t1 = time.time()
            r = session.get(f"{a.url}{item['url']}")
            r.raise_for_status()
            fetched_bytes += len(r.content)
            t2 = time.time()
            r = session.post(f"{a.url}{item['url']}/ack")
            r.raise_for_status()
            t3 = time.time()
            fetch_s += t2 - t1
            ack_s += t3 - t2
            acked[item["id"]] = t3
    with open(a.out, "w") as f:
        json.dump(dict(acked=acked, listings=listings, fetch_s=fetch_s, ack_s=ack_s,
                       fetched_bytes=fetched_bytes, complete=len(acked) >= a.expect), f)
    return 0 if len(acked) >= a.expect else 1


if __name__ == "__main__":
    sys.exit(main())
