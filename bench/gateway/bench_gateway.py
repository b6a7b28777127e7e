#!/usr/bin/env python3
"""C-STORE into a gateway that forwards to central over mutual TLS, against
plain central ingest, in one run.

Each repetition times DCMTK ``storescu +sd +r`` (``TCP_NODELAY=1``, one
association) of the corpus into (a) a fresh plain central and (b) a fresh
gateway whose ``[gateway] central`` is a fresh central's ``tls://`` listener
(client certificate issued from central's CA). Reported: intake obj/s of
both (files / storescu wall time) and the gateway's forward rate (files /
time from the start of storescu to the last object's arrival in central's
SQLite index, polled every 20 ms), each also as a ratio to plain central
intake. See README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from meddnode import HOST, VENV_BIN, MeddCentral, dcmtk_tool, log, pinned, proc_cpu_s  # noqa: E402


class MeddGateway(MeddCentral):
    """A fresh gateway node, forwarding to ``central_url`` with the given CA and client certificate."""

    def __init__(self, work: str, port: int, central_url: str, ca: str, client_cert: str, bin_dir: str = VENV_BIN):
        super().__init__(work, {"dicom": port}, bin_dir=bin_dir)
        self.ini = os.path.join(work, "gateway.ini")
        self.extra = textwrap.dedent(f"""\
            [gateway]
            address = gateway@centre-a.bench
            central = {central_url}
            central_name = central.bench
            ca = {ca}
            client_cert = {client_cert}
            """)

    def write_config(self) -> None:
        super().write_config()
        with open(self.ini) as f:
            text = f.read().replace("role = central", "role = gateway").replace("name = central.bench",
                                                                                  "name = gateway.bench")
        with open(self.ini, "w") as f:
            f.write(text)


def make_pki(folder: str) -> dict:
    """Central's self-signed certificate, also the CA (and its key the signer) of centres' client certificates."""
    from pathlib import Path

    from medd.tlscert import make_self_signed

    os.makedirs(folder, exist_ok=True)
    cert, key = (os.path.join(folder, n) for n in ("central.pem", "central.key"))
    make_self_signed(Path(cert), Path(key))
    return {"cert": cert, "key": key}


#: With --pin: the node under test (plain central, or the gateway) on CPU 0; storescu and the
#: central behind the gateway on CPU 1, as if the gateway and central were hosts of their own.
UNDER_TEST, OTHERS = {0}, {1}


def storescu_run(storescu: str, port: int, cdir: str, n: int, timeout: float, cpus: set[int] | None = None) -> float:
    """Time one storescu of the corpus; checks every object got Success on one association."""
    cmd = [storescu, "-v", "-aet", "BENCHSCU", "-aec", "MEDD", "+sd", "+r", HOST, str(port), cdir]
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, preexec_fn=pinned(cpus))
    dt = time.perf_counter() - t0
    out = p.stdout.decode(errors="replace")
    ok, assoc = out.count("Received Store Response (Success)"), out.count("Requesting Association")
    if p.returncode != 0 or ok != n or assoc != 1:
        raise SystemExit(f"storescu into {port}: rc={p.returncode}, success={ok}/{n}, associations={assoc}")
    return dt


@contextmanager
def profiled(a, name: str, *nodes: tuple[str, MeddCentral]):
    """With ``--profile DIR``: py-spy (``-r 100 -f raw --threads``) on each node while the block runs,
    one raw profile per node, ``DIR/NAME-ROLE-REP.raw`` (bench/pyspy_summary.py sums one up)."""
    spies = []
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
        for role, node in nodes:
            out = os.path.join(a.profile, f"{name}-{role}-{a.rep}.raw")
            spies.append(subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(node.proc.pid),
                 "-r", "100", "-f", "raw", "-o", out, "--threads", "--nonblocking", "-d", "900"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(2)  # our own child: py-spy writes its profile on SIGINT
            spy.wait()


def timed_intake(a, name: str, role: str, node: MeddCentral, cdir: str, n: int, storescu: str) -> tuple[float, float]:
    """storescu of the corpus into ``node`` alone: (wall seconds, the node's CPU seconds)."""
    with profiled(a, name, (role, node)):
        cpu0 = proc_cpu_s(node.proc.pid)
        dt = storescu_run(storescu, a.port, cdir, n, a.timeout, OTHERS if a.pin else None)
        return dt, proc_cpu_s(node.proc.pid) - cpu0


def measure_central(a, cdir: str, n: int, storescu: str) -> tuple[float, float]:
    """(storescu wall seconds, central's CPU seconds over the run)."""
    node = MeddCentral(os.path.join(a.work, "central"), {"dicom": a.port}, bin_dir=a.bin)
    node.cpus = UNDER_TEST if a.pin else None
    node.write_config()
    node.start()
    try:
        dt, cpu = timed_intake(a, "central", "central", node, cdir, n, storescu)
        if node.stored_count() != n:
            raise SystemExit(f"plain central stored {node.stored_count()} of {n}")
    finally:
        node.stop()
    return dt, cpu


def gateway_pair(a, pki: dict, gateway_extra: str = "") -> tuple[MeddCentral, "MeddGateway"]:
    """A fresh central with a ``tls`` listener requiring client certificates, the centre registered
    on it as a site does (central issues the gateway's client certificate), and a fresh gateway
    forwarding to it; configs written, nothing started."""
    central = MeddCentral(os.path.join(a.work, "fwd-central"), {"tls": a.tls_port}, bin_dir=a.bin,
                          extra=f"[tls]\ncertificate = {pki['cert']}\nprivate_key = {pki['key']}\n"
                                f"client_ca = {pki['cert']}\nclient_ca_key = {pki['key']}\n")
    client = os.path.join(a.work, "centre-a.pem")
    gateway = MeddGateway(os.path.join(a.work, "gateway"), a.port, f"tls://{HOST}:{a.tls_port}", pki["cert"],
                          client, bin_dir=a.bin)
    gateway.extra += gateway_extra
    if a.pin:
        gateway.cpus, central.cpus = UNDER_TEST, OTHERS
    central.write_config()
    central.cli("centres", "add", "centre-a", "--address", "gateway@centre-a.bench", "--client-cert", client)
    gateway.write_config()
    return central, gateway


def wait_answered(a, gateway: "MeddGateway", n: int) -> None:
    """Until central has answered for every object: stored, or refused for good (an SR of a study
    with no image of the centre's is not taken as the centre's report). Polled every 20 ms."""
    deadline = time.monotonic() + a.timeout
    answered = "SELECT count(*) FROM gateway_forwarding WHERE state != 'waiting'"
    while gateway.query(answered)[0][0] < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"central answered for {gateway.query(answered)[0][0]} of {n} within {a.timeout}s")
        time.sleep(0.02)


def checked_sent(gateway: "MeddGateway", central: MeddCentral) -> int:
    """How many the gateway marked sent; central must hold exactly those, once each. What it
    refused is printed with the reason."""
    sent = gateway.query("SELECT count(*) FROM gateway_forwarding WHERE state = 'sent'")[0][0]
    refused = gateway.query("SELECT last_error, count(*) FROM gateway_forwarding WHERE state != 'sent' "
                            "GROUP BY last_error")
    for reason, count in refused:
        log(f"  {count} not forwarded: {reason}")
    if central.query("SELECT count(distinct sop_instance_uid), count(*) FROM objects")[0] != (sent, sent):
        raise SystemExit(f"central does not hold the {sent} objects the gateway sent, once each")
    return sent


def measure_gateway(a, cdir: str, n: int, storescu: str, pki: dict) -> tuple[float, float, float, float]:
    """(intake s, forwarded s, the gateway's CPU s, the central behind it's CPU s) until central answered for all."""
    central, gateway = gateway_pair(a, pki)
    central.start()
    gateway.start()
    try:
        with profiled(a, "gateway", ("gateway", gateway), ("behind", central)):
            cpu0 = proc_cpu_s(gateway.proc.pid), proc_cpu_s(central.proc.pid)
            t0 = time.perf_counter()
            intake = storescu_run(storescu, a.port, cdir, n, a.timeout, OTHERS if a.pin else None)
            wait_answered(a, gateway, n)
            forwarded = time.perf_counter() - t0
            cpu = proc_cpu_s(gateway.proc.pid) - cpu0[0], proc_cpu_s(central.proc.pid) - cpu0[1]
        checked_sent(gateway, central)
    finally:
        gateway.stop()
        central.stop()
    return intake, forwarded, *cpu


def measure_split(a, cdir: str, n: int, storescu: str, pki: dict) -> dict:
    """With ``--split``: the gateway takes the corpus while central is down (its forwarder retries
    every 2 s at most, finding no one), then central starts and the gateway forwards it all. Each
    node's CPU is then its own part alone: the gateway's intake, the gateway's forwarding, and
    central's per package received over TLS."""
    central, gateway = gateway_pair(a, pki, "retry_max_delay = 2\n")
    gateway.start()
    try:
        intake, intake_cpu = timed_intake(a, "split-intake", "gateway", gateway, cdir, n, storescu)
        central.start()
        with profiled(a, "split-forward", ("gateway", gateway), ("behind", central)):
            cpu0 = proc_cpu_s(gateway.proc.pid), proc_cpu_s(central.proc.pid)
            t0 = time.perf_counter()
            wait_answered(a, gateway, n)
            forwarded = time.perf_counter() - t0
            forward_cpu, behind_cpu = proc_cpu_s(gateway.proc.pid) - cpu0[0], proc_cpu_s(central.proc.pid) - cpu0[1]
        sent = checked_sent(gateway, central)
    finally:
        gateway.stop()
        central.stop()
    return dict(split_intake_s=intake, split_forward_s=forwarded, split_intake_cpu_s=intake_cpu,
                split_forward_cpu_s=forward_cpu, split_behind_cpu_s=behind_cpu, split_sent=sent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/dicombench/corpus/small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=11121, help="DICOM port of the plain central, then the gateway")
    ap.add_argument("--tls-port", type=int, default=11122, help="TLS port of the central behind the gateway")
    ap.add_argument("--bin", default=VENV_BIN, help="folder holding twistd and medd")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the raw rows and the summary here")
    ap.add_argument("--profile", help="folder for raw py-spy profiles of every node, one per run (needs py-spy)")
    ap.add_argument("--split", action="store_true",
                    help="also: the gateway's intake with central down, then its forwarding alone (CPU of each part)")
    ap.add_argument("--pin", action="store_true",
                    help="the node under test on CPU 0; storescu and the central behind the gateway on CPU 1")
    a = ap.parse_args()
    storescu = dcmtk_tool("storescu")
    files = [f for f in os.listdir(a.corpus) if os.path.isfile(os.path.join(a.corpus, f))]
    n = len(files)
    with tempfile.TemporaryDirectory(prefix="medd-bench-gateway-") as work:
        a.work = work
        pki = make_pki(os.path.join(work, "pki"))
        rows = []
        for rep in range(1, a.reps + 1):
            a.rep = rep
            central, central_cpu = measure_central(a, a.corpus, n, storescu)
            intake, forwarded, gateway_cpu, behind_cpu = measure_gateway(a, a.corpus, n, storescu, pki)
            row = dict(rep=rep, files=n, central_s=central, gateway_intake_s=intake, forwarded_s=forwarded,
                       central_cpu_s=central_cpu, gateway_cpu_s=gateway_cpu, behind_cpu_s=behind_cpu)
            if a.split:
                row.update(measure_split(a, a.corpus, n, storescu, pki))
                log(f"rep {rep} split: gateway intake alone {n / row['split_intake_s']:7.1f} obj/s, "
                    f"{row['split_intake_cpu_s'] / n * 1000:.2f} CPU ms/obj; then forwarding alone "
                    f"{n / row['split_forward_s']:7.1f} obj/s, gateway {row['split_forward_cpu_s'] / n * 1000:.2f} "
                    f"CPU ms/obj, central per TLS package {row['split_behind_cpu_s'] / row['split_sent'] * 1000:.2f} "
                    f"CPU ms ({row['split_sent']} stored)")
            rows.append(row)
            log(f"rep {rep}: central {n / central:7.1f} obj/s   gateway intake {n / intake:7.1f} obj/s   "
                f"forwarded {n / forwarded:7.1f} obj/s   CPU ms/obj: central {central_cpu / n * 1000:.2f}, "
                f"gateway {gateway_cpu / n * 1000:.2f}, central behind it {behind_cpu / n * 1000:.2f}")
    med = {k: statistics.median(n / r[k] for r in rows) for k in ("central_s", "gateway_intake_s", "forwarded_s")}
    c, g, f = med["central_s"], med["gateway_intake_s"], med["forwarded_s"]
    print(f"{n} objects ({a.corpus}), {a.reps} reps, medians:")
    print(f"  plain central intake      {c:7.1f} obj/s   1.00")
    print(f"  gateway intake            {g:7.1f} obj/s   {g / c:.2f} of central")
    print(f"  forwarded to central/TLS  {f:7.1f} obj/s   {f / c:.2f} of central, {f / g:.2f} of gateway intake")
    cpu = {k: statistics.median(r[k] / n * 1000 for r in rows) for k in ("central_cpu_s", "gateway_cpu_s", "behind_cpu_s")}
    print(f"  CPU ms/obj: plain central {cpu['central_cpu_s']:.2f}; gateway {cpu['gateway_cpu_s']:.2f} "
          f"({cpu['gateway_cpu_s'] / cpu['central_cpu_s']:.2f} of central, intake and forwarding); "
          f"central behind it {cpu['behind_cpu_s']:.2f}")
    if a.split:
        split = {k: statistics.median(r[k] / n * 1000 for r in rows)
                 for k in ("split_intake_cpu_s", "split_forward_cpu_s", "split_behind_cpu_s")}
        print(f"  split, CPU ms/obj: gateway intake alone {split['split_intake_cpu_s']:.2f} "
              f"({cpu['central_cpu_s'] / split['split_intake_cpu_s']:.2f} x central's C-STORE rate at equal CPU); "
              f"gateway forwarding {split['split_forward_cpu_s']:.2f}; central per TLS package "
              f"{split['split_behind_cpu_s']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "median_obj_s": med, "median_cpu_ms_per_obj": cpu}, fh, indent=2)


if __name__ == "__main__":
    main()
