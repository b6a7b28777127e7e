#!/usr/bin/env python3
"""The reading room as a radiologist feels it: time to first image and
stack-scroll rate of a CT stack in OHIF, served by a medd viewer node over
loopback, optionally through a proxy that adds latency.

One process: a fresh viewer node (temporary folder, SQLite) on the reactor,
the stack ingested into its inbox as central's requestor would, a reading-room
user, and headless Debian Chromium driven by Playwright in a worker thread.

  time to first image   from the navigation to OHIF's viewer URL (logged in)
                        until the slice indicator shows 1/N and the first
                        frame's response has arrived
  stack scroll          once every frame has been fetched (OHIF prefetches
                        the stack), N-1 mouse-wheel steps (Playwright's, real
                        input events), each awaited until the indicator shows
                        the next slice; slices per second over the whole stack
                        (Playwright's round trips included)

``--latency S`` puts a TCP proxy in front of the node that holds every chunk
for S seconds in each direction (so a request/response pays 2*S more).

``--metadata-only`` skips the browser: it times the series' WADO-RS metadata
request (what OHIF waits for before the first image) ``--reps`` times, wall
and this process's CPU milliseconds (the node and a client that only reads
the bytes). ``MEDD_TREE=DIR`` runs another checkout's medd (e.g. main, to
compare before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(os.environ.get("MEDD_TREE") or Path(__file__).resolve().parents[2]).resolve()
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# In the page: the slice the indicator shows ("I:12 (12/400)"), for wait_for_function (polled each frame).
SLICE_IS = r"""
(n) => [...document.querySelectorAll('.viewport-overlay')].some(o => {
  const m = o.innerText.match(/\((\d+)\/(\d+)\)/);
  return m && Number(m[1]) === n;
})
"""


def ini(folder: Path, port: int) -> Path:
    path = folder / "viewer.ini"
    path.write_text(f"""[node]
role = viewer
name = bench@viewer.bench.localhost
[database]
url = sqlite:///{folder / 'index.sqlite'}
[storage]
path = {folder / 'store'}
[listen]
http = tcp:{port}:interface=127.0.0.1
[central]
# Nothing answers here: the stack is put into the inbox directly.
url = http://127.0.0.1:9
token = bench
poll_interval = 3600
""")
    return path


def delaying_proxy(reactor, listen_port: int, target_port: int, latency: float):
    """A TCP proxy on ``listen_port`` that holds every chunk ``latency`` seconds each way."""
    from twisted.internet import protocol

    class Half(protocol.Protocol):
        peer = None

        def dataReceived(self, data):
            reactor.callLater(latency, lambda: self.peer.transport.write(data) if self.peer else None)

        def connectionLost(self, reason):
            if self.peer is not None:
                reactor.callLater(latency, self.peer.transport.loseConnection)

    class Client(Half):
        def connectionMade(self):
            self.peer = self.factory.server
            self.peer.peer = self
            self.peer.transport.resumeProducing()

    class Server(Half):
        def connectionMade(self):
            self.transport.pauseProducing()
            factory = protocol.ClientFactory()
            factory.protocol = Client
            factory.server = self
            reactor.connectTCP("127.0.0.1", target_port, factory)

    factory = protocol.ServerFactory()
    factory.protocol = Server
    return reactor.listenTCP(listen_port, factory, interface="127.0.0.1")


def drive(base: str, study_uid: str, slices: int) -> dict:
    """Blocking (a worker thread): log in, open the study in OHIF, time the first image and the scroll."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base).new_page()
            frames = []
            page.on("requestfinished", lambda r: frames.append(time.perf_counter()) if "/frames/" in r.url else None)
            page.goto("/")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", "bench")
            page.click("button[type=submit]")
            page.wait_for_url("**/worklist")
            # OHIF's first-visit notices, out of the way before anything is timed.
            page.goto(f"/ohif/viewer?StudyInstanceUIDs={study_uid}")
            page.get_by_text("Skip all").click()
            page.get_by_text("Confirm and hide").click()
            frames.clear()
            t0 = time.perf_counter()
            page.goto(f"/ohif/viewer?StudyInstanceUIDs={study_uid}")
            page.get_by_text(f"(1/{slices})").wait_for(timeout=60_000)
            while not frames:
                page.wait_for_timeout(5)
            first_image = max(time.perf_counter(), frames[0]) - t0
            deadline = time.perf_counter() + 300
            while len(frames) < slices and time.perf_counter() < deadline:
                page.wait_for_timeout(20)
            all_frames = frames[-1] - t0 if len(frames) >= slices else None
            webgl = page.evaluate("() => !!document.createElement('canvas').getContext('webgl2')")
            box = page.locator(".cornerstone-canvas").first.bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            t1 = time.perf_counter()
            for n in range(2, slices + 1):
                page.mouse.wheel(0, 100)
                page.wait_for_function(SLICE_IS, arg=n, polling=5, timeout=10_000)
            scroll_s = time.perf_counter() - t1
            # Back to the top as fast as the wheel turns: every event queued at once, then the last slice awaited.
            t2 = time.perf_counter()
            for _ in range(slices - 1):
                page.mouse.wheel(0, -100)
            page.wait_for_function(SLICE_IS, arg=1, polling=5, timeout=60_000)
            flick_s = time.perf_counter() - t2
            return {"first_image_s": round(first_image, 3), "all_frames_s": all_frames and round(all_frames, 3),
                    "frames_fetched": len(frames), "webgl2": webgl, "scroll_s": round(scroll_s, 3),
                    "slices_per_s": round((slices - 1) / scroll_s, 1), "flick_s": round(flick_s, 3),
                    "flick_slices_per_s": round((slices - 1) / flick_s, 1)}
        finally:
            browser.close()


def time_metadata(base: str, stack, reps: int) -> dict:
    """Blocking (a worker thread): the series metadata request ``reps`` times; wall and process CPU ms each."""
    import re

    import requests

    s = requests.Session()
    form = s.get(base + "/").text
    nonce = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    s.post(base + "/login", data={"username": "bench", "password": "bench", "csrf": nonce}, allow_redirects=False)
    url = f"{base}/dicomweb/studies/{stack[0].StudyInstanceUID}/series/{stack[0].SeriesInstanceUID}/metadata"
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        r = s.get(url)
        body = r.content
        wall.append(round((time.perf_counter() - t0) * 1000, 1))
        cpu.append(round((time.process_time() - c0) * 1000, 1))
        assert r.status_code == 200 and body.count(b'"00080018"') == len(stack), (r.status_code, body[:200])
    return {"metadata_wall_ms": wall, "metadata_cpu_ms": cpu, "bytes": len(body), "tree": str(REPO)}


async def run(reactor, a) -> dict:
    from twisted.internet.threads import deferToThread

    from medd.config import load_config
    from medd.demo import ct_stack
    from medd.service import make_node
    from medd.viewer.users import add_user

    folder = Path(tempfile.mkdtemp(prefix="medd-bench-reading-"))
    node = make_node(reactor, load_config(ini(folder, a.port)))
    node.startService()
    try:
        stack = await deferToThread(ct_stack, a.slices)
        for ds in stack:
            out = BytesIO()
            ds.save_as(out, enforce_file_format=True)
            await node.ingest.receive_dicom(out.getvalue(), transport="pull", origin="central@bench.localhost")
        await add_user(node.reading_room.accounts, "bench", "bench")
        if a.metadata_only:
            return {"slices": a.slices, **await deferToThread(time_metadata, f"http://127.0.0.1:{a.port}", stack, a.reps)}
        port = a.port
        proxy = None
        if a.latency:
            proxy = delaying_proxy(reactor, a.port + 1, a.port, a.latency)
            port = a.port + 1
        try:
            result = await deferToThread(drive, f"http://127.0.0.1:{port}", stack[0].StudyInstanceUID, a.slices)
        finally:
            if proxy is not None:
                await proxy.stopListening()
        return {"slices": a.slices, "latency_s": a.latency, **result}
    finally:
        await node.stopService()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=400)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added each way by a delaying proxy")
    p.add_argument("--port", type=int, default=18091, help="the viewer's HTTP port (the proxy takes the next)")
    p.add_argument("--metadata-only", action="store_true", help="time the series metadata request, no browser")
    p.add_argument("--reps", type=int, default=5, help="metadata requests with --metadata-only")
    a = p.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    outcome = {}

    def done(result):
        outcome["result"] = result
        reactor.stop()

    def failed(failure):
        outcome["error"] = failure
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(reactor, a)).addCallbacks(done, failed))
    reactor.run()
    if "error" in outcome:
        print(outcome["error"].getTraceback(), file=sys.stderr)
        return 1
    print(json.dumps(outcome["result"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
