"""The fault campaign (issue 13): real nodes, real clients, a ledger, faults, an independent checker,
one table. ``python -m bench.faults.campaign --help``; bench/faults/README.md says what each phase
does and holds the long run's figures."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from .checker import Holdings, check_acknowledged, check_deliveries, wado_sample
from .clients import (CStoreSender, Ledger, SmtpSender, StowSender, TlsSocketSender, corpus,
                      start_reactor_thread)
from .nodes import Node, CENTRE, CENTRE_ADDRESS, PULL_VIEWER, PUSH_VIEWER, Pki, central_node, gateway_node, viewer_node
from .powerloss import strace_order
from .postgres import PrivatePostgres


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """Central, a pull viewer, a push viewer and a gateway, registered with each other."""

    def __init__(self, work: Path, db_url: str | None, store: Path | None):
        self.work = work
        self.pki = Pki(work / "pki")
        self.central = central_node(work / "central", self.pki, db_url, store)
        self.central.start()
        # One CLI call for the administrator; the rest through central's admin API (each CLI start
        # costs seconds of CPU on a loaded machine).
        self.admin_token = self.central.medd("admins", "add", "checker")
        self.centre_token = self.api("centres", name=CENTRE, ae=["CT1"], address=[CENTRE_ADDRESS], token=True)["token"]
        self.tokens = {}
        self.pull = viewer_node(work / "pull", PULL_VIEWER, self.central, lambda: self.tokens[PULL_VIEWER])
        self.push = viewer_node(work / "push", PUSH_VIEWER, self.central, lambda: self.tokens[PUSH_VIEWER])
        self.push.ports["http"] = free_port()
        self.tokens[PULL_VIEWER] = self.api("viewers", address=PULL_VIEWER, authorise=[CENTRE])["token"]
        self.tokens[PUSH_VIEWER] = self.api("viewers", address=PUSH_VIEWER, push=f"{self.push.url()}/packages",
                                            authorise=[CENTRE])["token"]
        for viewer in (PULL_VIEWER, PUSH_VIEWER):
            self.api("routes", centre=CENTRE, to=viewer)
        self.gateway = gateway_node(work / "gateway", self.central, self.pki)
        starting = [threading.Thread(target=n.start) for n in (self.pull, self.push, self.gateway)]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        if not all(n.running for n in (self.pull, self.push, self.gateway)):
            raise RuntimeError("a viewer or the gateway did not start")
        self.nodes = [self.central, self.pull, self.push, self.gateway]

    def api(self, collection: str, **body) -> dict:
        answer = requests.post(f"{self.central.url()}/api/{collection}", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {self.admin_token}"})
        answer.raise_for_status()
        return answer.json()

    def holdings(self, node) -> Holdings:
        return Holdings(node.db_url, node.store)

    def senders(self, items, ledger, gateway_share: float = 0.2) -> list:
        """One sender per transport over its share of ``items`` (C-STORE, STOW-RS, SMTP, TLS, and
        C-STORE into the gateway)."""
        kw = dict(token=self.centre_token, ca=self.pki.cert, client_cert=self.pki.client)
        n = len(items)
        cut = int(n * gateway_share)
        gw, rest = items[:cut], items[cut:]
        shares = [rest[i::4] for i in range(4)]
        central_ports = lambda: self.central.ports  # noqa: E731
        return [CStoreSender(shares[0], ledger, central_ports, **kw), StowSender(shares[1], ledger, central_ports, **kw),
                SmtpSender(shares[2], ledger, central_ports, **kw), TlsSocketSender(shares[3], ledger, central_ports, **kw),
                CStoreSender(gw, ledger, lambda: self.gateway.ports, called="GATEWAY", node="gateway", **kw)]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def wait_for(what: str, condition, timeout: float, every: float = 0.5) -> float:
    """Blocking: poll ``condition`` until true; the seconds it took. Raises on timeout."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def drained(site: Site) -> bool:
    """Every object on central routed to both viewers and delivered, and everything the gateway
    holds forwarded to central. (Routing is a pass of its own: an object may be indexed with no
    delivery row yet.)"""
    central = site.holdings(site.central)
    on_central = central.objects()
    rows = dict(central.rows("SELECT destination, count(*) FROM deliveries WHERE status IS NULL"
                             " AND state IN ('delivered', 'opened') GROUP BY destination"))
    gateway = site.holdings(site.gateway).objects()
    return (all(rows.get(v, 0) == len(on_central) for v in (PULL_VIEWER, PUSH_VIEWER))
            and set(gateway) <= set(on_central))


def kill_loop(site: Site, rng: random.Random, counts: dict[str, int], senders, figures: dict) -> None:
    """SIGKILL the nodes at random instants while the senders run; restart each at once."""
    targets = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(targets)
    nodes = {"central": site.central, "viewer": None, "gateway": site.gateway}
    recover: list[float] = []
    for i, target in enumerate(targets):
        time.sleep(rng.uniform(0.2, 1.5))
        node = nodes[target] or rng.choice([site.pull, site.push])
        node.kill()
        recover.append(node.start())
        figures["faults"][f"kill -9 {target}"] = figures["faults"].get(f"kill -9 {target}", 0) + 1
        if i % 10 == 9:
            log(f"{i + 1}/{len(targets)} kills; acknowledged so far {sum(s.sent_ok for s in senders)}")
        if all(s.done for s in senders):
            log("every sender is done; stopping the kills early")
            break
        if time.monotonic() > figures["deadline"]:
            log(f"--max-seconds reached after {i + 1} kills")
            break
    figures["recover_max_s"] = max(recover + [figures.get("recover_max_s", 0)])
    figures["recover_median_s"] = sorted(recover)[len(recover) // 2] if recover else 0


def run_senders_until(senders, condition) -> None:
    for s in senders:
        s.start()
    try:
        condition()
    finally:
        for s in senders:
            s.stop.set()
        for s in senders:
            s.join(timeout=60)


def full_store(site: Site, items, ledger, store_mount: Path, figures: dict) -> None:
    """Fill central's blob store (a tmpfs the harness mounted) with a ballast file: new objects get
    temporary refusals, nothing half-written stays, WADO-RS reads and deliveries go on; then free it
    and the same senders get through without a restart."""
    ballast = store_mount / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    log(f"store full: {shutil.disk_usage(store_mount).free} bytes free")
    senders = site.senders(items, ledger, gateway_share=0)
    for s in senders:
        s.start()
    central = site.holdings(site.central)
    try:
        temporary = lambda: sum(ledger.temporary.values())  # noqa: E731
        before = temporary()
        wait_for("temporary refusals on a full store", lambda: temporary() >= before + 4, 60, 0.2)
        figures["full_store_temporary_refusals"] = temporary() - before
        figures["full_store_half_written"] = central.half_written()
        uid = next(iter(central.objects()))
        figures["full_store_wado_failures"] = len(wado_sample(site.central.url(), site.admin_token, central, [uid]))
        time.sleep(1)
    finally:
        ballast.unlink()
    t0 = time.monotonic()
    try:
        wait_for("ingest resumes after space returns", lambda: all(s.done for s in senders), 600)
    finally:
        for s in senders:
            s.stop.set()
            s.join(timeout=60)
    figures["full_store_resume_s"] = round(time.monotonic() - t0, 2)
    figures["faults"]["store full"] = 1


def viewer_offline(site: Site, items, ledger, figures: dict, max_delay: float) -> None:
    """Stop the push viewer while ``items`` queue for it, watch central's backoff, start it again:
    each delivered once, in queue order."""
    site.push.kill()
    sender = CStoreSender(items, ledger, lambda: site.central.ports, token=site.centre_token)
    central = site.holdings(site.central)
    longest = 0.0
    sender.start()
    while not sender.done:
        time.sleep(0.5)
    sender.join()
    for _ in range(6):  # watch a few rounds of retries
        time.sleep(1)
        for next_at, updated in central.rows(
                "SELECT next_attempt_at, updated_at FROM deliveries WHERE destination = :d AND state = 'failed'",
                d=PUSH_VIEWER):
            if next_at and updated:
                longest = max(longest, (_when(next_at) - _when(updated)))
    site.push.start()
    t0 = time.monotonic()
    wait_for("the queue for the push viewer drains", lambda: drained(site), args_drain_seconds(len(ledger.entries)))
    figures["offline_drain_s"] = round(time.monotonic() - t0, 1)
    figures["offline_queued"] = len(items)
    figures["offline_longest_backoff_s"] = round(longest, 2)
    figures["offline_backoff_max_s"] = max_delay
    queue_order = [u for (u,) in central.rows("SELECT uid FROM deliveries WHERE destination = :d AND status IS NULL"
                                              " ORDER BY id", d=PUSH_VIEWER)]
    viewer_order = [u for (u,) in site.holdings(site.push).rows("SELECT sop_instance_uid FROM objects ORDER BY id")]
    wanted = {i.uid for i in items}
    figures["offline_out_of_order"] = int([u for u in queue_order if u in wanted] != [u for u in viewer_order if u in wanted])
    figures["faults"]["viewer offline"] = 1


def args_drain_seconds(objects: int) -> float:
    """How long a drain may take: ten minutes, plus a second per object it may have to deliver
    (deliveries ran at 1.4-1.9 objects/s per viewer on 2 busy cores)."""
    return 600 + objects


def _when(value) -> float:
    from datetime import datetime, timezone
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def postgres_faults(site: Site, pg: PrivatePostgres, items, ledger, rng, n: int, figures: dict) -> None:
    """While the senders run: terminate central's backends (pg_terminate_backend) and restart the
    server (pg_ctl restart -m immediate: a crash of PostgreSQL), ``n`` faults in all."""
    senders = site.senders(items, ledger, gateway_share=0)

    def faults():
        for i in range(n):
            time.sleep(rng.uniform(0.5, 2.0))
            if i % 3 == 2:
                pg.restart()
                figures["faults"]["postgres restart"] = figures["faults"].get("postgres restart", 0) + 1
            else:
                pg.terminate_backends()
                figures["faults"]["pg_terminate_backend"] = figures["faults"].get("pg_terminate_backend", 0) + 1
        wait_for("senders finish after the database faults", lambda: all(s.done for s in senders), 300)

    run_senders_until(senders, faults)
    figures["postgres_reconnected"] = int(site.central.running)
    figures["pg_acknowledged"] = sum(s.sent_ok for s in senders)


def campaign(args) -> dict:
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="medd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)  # the private PostgreSQL runs as its own user
    t_start = time.monotonic()
    figures: dict = {"faults": {}, "deadline": t_start + args.max_seconds}
    start_reactor_thread()
    mount = None
    pg = None
    if os.geteuid() == 0 and args.full_store:
        mount = work / "central-store"
        mount.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.store_mb}m", "tmpfs", str(mount)], check=True)
    try:
        db_url = None
        if args.postgres:
            pg = PrivatePostgres()
            pg.start()
            db_url = pg.url
        site = Site(work, db_url, mount)
        ledger = Ledger(work / "ledger.jsonl")
        n = args.objects
        items = corpus(work / "corpus", n, "k")
        log(f"site up in {time.monotonic() - t_start:.1f} s; {n} objects; kills {args.central_kills} central, "
            f"{args.viewer_kills} viewer, {args.gateway_kills} gateway")
        senders = site.senders(items, ledger)
        counts = {"central": args.central_kills, "viewer": args.viewer_kills, "gateway": args.gateway_kills}
        run_senders_until(senders, lambda: kill_loop(site, rng, counts, senders, figures))
        central = site.holdings(site.central)
        figures["orphans_before_sweep"] = central.orphans()
        if pg is not None and args.pg_faults:
            postgres_faults(site, pg, corpus(work / "corpus", args.pg_objects, "p"), ledger, rng, args.pg_faults,
                            figures)
        if mount is not None:
            full_store(site, corpus(work / "corpus", args.full_store_objects, "f"), ledger, mount, figures)
        if args.offline_objects:
            viewer_offline(site, corpus(work / "corpus", args.offline_objects, "o"), ledger, figures, 1.0)
        t0 = time.monotonic()
        wait_for("deliveries and forwarding drain", lambda: drained(site), args_drain_seconds(len(ledger.entries)))
        figures["drain_s"] = round(time.monotonic() - t0, 1)
        time.sleep(8)  # > sweep_grace + sweep_interval: every orphan of the run is old enough now
        figures["orphans_after_sweep"] = central.orphans()
        figures["swept_by_central"] = sum(p.read_text(errors="replace").count("swept the unreferenced blob")
                                          for p in site.central.folder.glob("twistd-*.log"))
        ledger.close()
        entries = ledger.entries
        central_acks = [e for e in entries if e["node"] == "central"]
        gateway_acks = [e for e in entries if e["node"] == "gateway"]
        result = check_acknowledged(central_acks, central)
        gw_result = check_acknowledged(gateway_acks, site.holdings(site.gateway))
        forwarded = check_acknowledged(gateway_acks, central)  # the gateway's, once forwarded, are on central too
        figures["acknowledged"] = result["acknowledged"] + gw_result["acknowledged"]
        figures["acknowledged_by_transport"] = {t: sum(e["transport"] == t for e in entries)
                                                for t in sorted({e["transport"] for e in entries})}
        figures["lost"] = len(result["lost"]) + len(gw_result["lost"]) + len(forwarded["lost"])
        figures["wrong_digest"] = len(result["wrong_digest"]) + len(gw_result["wrong_digest"])
        figures["lost_uids"] = (result["lost"] + gw_result["lost"] + forwarded["lost"])[:20]
        figures["rows_without_blob"] = sum(site.holdings(n).rows_without_blob() for n in site.nodes)
        figures["half_written"] = sum(site.holdings(n).half_written() for n in site.nodes)
        dup = 0
        acked_not_held = 0
        not_delivered = 0
        for viewer, address in ((site.pull, PULL_VIEWER), (site.push, PUSH_VIEWER)):
            d = check_deliveries(central, site.holdings(viewer), address)
            dup += d["duplicated"]
            acked_not_held += len(d["acked_not_held"]) + len(d["wrong_digest"])
            not_delivered += len(d["not_delivered"])
            figures[f"delivered_to_{viewer.name.split('@')[0]}"] = d["delivered"]
        figures["duplicated_deliveries"] = dup
        figures["delivery_acked_not_held"] = acked_not_held
        figures["not_delivered"] = not_delivered
        sample = rng.sample([e["uid"] for e in central_acks], min(args.wado_sample, len(central_acks)))
        figures["wado_mismatch"] = len(wado_sample(site.central.url(), site.admin_token, central, sample))
        figures["wado_checked"] = len(sample)
        figures["false_successes"] = figures["lost"] + figures["wrong_digest"] + figures["delivery_acked_not_held"]
        figures["temporary_refusals"] = dict(ledger.temporary)
        figures["client_errors"] = dict(ledger.errors)
        site.stop()
        if args.strace:
            figures["fsync_order"] = strace_order(work / "strace", 3)
        figures["seconds"] = round(time.monotonic() - t_start, 1)
        return figures
    finally:
        Node.kill_all()
        if pg is not None:
            pg.stop()
        if mount is not None:
            subprocess.run(["umount", "-l", str(mount)])
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


def table(figures: dict) -> str:
    rows = [
        ("faults injected", ", ".join(f"{k}: {v}" for k, v in figures["faults"].items())),
        ("objects acknowledged", f"{figures['acknowledged']} ({', '.join(f'{k} {v}' for k, v in figures['acknowledged_by_transport'].items())})"),
        ("lost (must be 0)", figures["lost"]),
        ("wrong digest (must be 0)", figures["wrong_digest"]),
        ("index rows without blob (must be 0)", figures["rows_without_blob"]),
        ("duplicated deliveries (must be 0)", figures["duplicated_deliveries"]),
        ("deliveries acked, not held (must be 0)", figures["delivery_acked_not_held"]),
        ("false successes (must be 0)", figures["false_successes"]),
        ("orphans before sweep / after sweep", f"{figures['orphans_before_sweep']} / {figures['orphans_after_sweep']} "
                                                f"(swept by central: {figures['swept_by_central']})"),
        ("time to recover (median / max, s)", f"{figures['recover_median_s']:.2f} / {figures['recover_max_s']:.2f}"),
        ("WADO-RS checked / mismatched", f"{figures['wado_checked']} / {figures['wado_mismatch']}"),
    ]
    if "full_store_temporary_refusals" in figures:
        rows.append(("full store: temporary refusals / half-written / WADO failures / resume s",
                     f"{figures['full_store_temporary_refusals']} / {figures['full_store_half_written']} / "
                     f"{figures['full_store_wado_failures']} / {figures['full_store_resume_s']}"))
    if "offline_queued" in figures:
        rows.append(("viewer offline: queued / out of order / longest backoff (max)",
                     f"{figures['offline_queued']} / {figures['offline_out_of_order']} / "
                     f"{figures['offline_longest_backoff_s']} ({figures['offline_backoff_max_s']})"))
    if "fsync_order" in figures:
        rows.append(("fsync order (blob fsync, rename, dir fsync, db commit, ack)",
                     f"{figures['fsync_order']['in_order']}/{figures['fsync_order']['objects']} objects in order"))
    rows.append(("temporary refusals seen by clients", json.dumps(figures["temporary_refusals"])))
    rows.append(("wall time (s)", figures["seconds"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)} | {value}" for name, value in rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--central-kills", type=int, default=200)
    p.add_argument("--viewer-kills", type=int, default=50)
    p.add_argument("--gateway-kills", type=int, default=50)
    p.add_argument("--objects", type=int, default=6000, help="objects offered during the kills")
    p.add_argument("--postgres", action="store_true", help="central on a private PostgreSQL cluster (initdb)")
    p.add_argument("--pg-faults", type=int, default=30)
    p.add_argument("--pg-objects", type=int, default=400)
    p.add_argument("--full-store", action=argparse.BooleanOptionalAction, default=True,
                   help="central's blob store on a tmpfs, filled once (root only)")
    p.add_argument("--store-mb", type=int, default=1024)
    p.add_argument("--full-store-objects", type=int, default=40, help="offered while the store is full")
    p.add_argument("--offline-objects", type=int, default=5000)
    p.add_argument("--wado-sample", type=int, default=300)
    p.add_argument("--strace", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-seconds", type=float, default=3600, help="stop injecting kills after this long")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--work", help="keep everything in this folder")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="write the figures here")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    figures = campaign(args)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    bad = figures["lost"] + figures["false_successes"] + figures["duplicated_deliveries"] + figures["rows_without_blob"]
    return 1 if bad or figures["orphans_after_sweep"] else 0


if __name__ == "__main__":
    sys.exit(main())
