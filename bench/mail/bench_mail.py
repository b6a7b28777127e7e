"""Packages per second into a real central (twistd) through postfix + dovecot (submission with
STARTTLS + AUTH, LMTP into a Maildir, central polling over IMAPS with IDLE), against the same
packages sent straight to central's own SMTP listener, in one run. Central's CPU per package comes
from /proc. See README.md."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import smtplib
import ssl
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from meddnode import MeddCentral, log, proc_cpu_s  # noqa: E402
from medd.objects import Content  # noqa: E402
from medd.package import attachment_for, build_package  # noqa: E402
from tests.mailservers import MailServers, free_port, mail_servers_folder, missing_reason  # noqa: E402

SENDER = "ct1@gateway.test"
CENTRAL = "central@central.test"


def corpus(kind: str, count: int, large_mb: float) -> list[bytes]:
    """``count`` packages: small = pydicom's CT_small (39 KB); large = MR_small made ``large_mb`` MB of
    incompressible multi-frame pixels."""
    packages = []
    for _ in range(count):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm" if kind == "small" else "MR_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if kind == "large":
            frames = max(int(large_mb * 1024 * 1024 / len(ds.PixelData)), 1)
            ds.PixelData = os.urandom(len(ds.PixelData)) * frames
            ds.NumberOfFrames = frames
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        packages.append(build_package(Content(media_type="application/dicom", data=out.getvalue()),
                                      attachment_for("image", ds.SOPInstanceUID), origin=SENDER,
                                      destination=CENTRAL))
    return packages


def wait_stored(central: MeddCentral, count: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while central.stored_count() < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"central stored {central.stored_count()} of {count}")
        time.sleep(0.02)


def run(central: MeddCentral, packages: list[bytes], via: str, mail: MailServers, smtp_port: int) -> dict:
    before = central.stored_count()
    cpu0, t0 = proc_cpu_s(central.proc.pid), time.monotonic()
    if via == "direct":
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=600) as smtp:
            for package in packages:
                smtp.sendmail(SENDER, [CENTRAL], package)  # 250 only once central made it durable
    else:
        context = ssl.create_default_context(cafile=str(mail.ca))
        with smtplib.SMTP("localhost", mail.submission_port, timeout=600) as smtp:
            smtp.starttls(context=context)
            smtp.login(SENDER, mail.passwords[SENDER])
            for package in packages:
                smtp.sendmail(SENDER, [CENTRAL], package)
    wait_stored(central, before + len(packages))
    wall, cpu = time.monotonic() - t0, proc_cpu_s(central.proc.pid) - cpu0
    return {"via": via, "packages": len(packages), "wall_s": round(wall, 3),
            "packages_per_s": round(len(packages) / wall, 2), "central_cpu_ms_per_package": round(cpu * 1000 / len(packages), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=200, help="small packages per run (default 200)")
    parser.add_argument("--large", type=int, default=5, help="large packages per run (default 5)")
    parser.add_argument("--large-mb", type=float, default=10, help="size of a large object in MB (default 10)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    mail = MailServers(mail_servers_folder())
    work = tempfile.mkdtemp(prefix="medd-bench-mail-")
    central = None
    results = []
    try:
        mail.start()
        mail.add_user(CENTRAL)
        mail.add_user(SENDER)
        smtp_port = free_port()
        central = MeddCentral(os.path.join(work, "central"), {"smtp": smtp_port}, extra=(
            f"[mailbox]\nurl = imaps://{CENTRAL}@localhost:{mail.imaps_port}/INBOX\n"
            f"password_file = {mail.password_file(CENTRAL)}\nca = {mail.ca}\npoll_interval = 1\n"))
        central.write_config()
        central.start()
        for kind, count in (("small", args.small), ("large", args.large)):
            if not count:
                continue
            for rep in range(args.reps):
                for via in ("direct", "postfix+dovecot"):
                    packages = corpus(kind, count, args.large_mb)
                    result = {"corpus": kind, "rep": rep + 1, **run(central, packages, via, mail, smtp_port)}
                    log(json.dumps(result))
                    results.append(result)
    finally:
        if central is not None:
            central.stop()
        mail.stop()
        shutil.rmtree(mail.folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'corpus':<6} {'via':<16} {'packages':>8} {'pkg/s':>8} {'central CPU ms/pkg':>19}")
    for r in results:
        print(f"{r['corpus']:<6} {r['via']:<16} {r['packages']:>8} {r['packages_per_s']:>8} "
              f"{r['central_cpu_ms_per_package']:>19}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "load": load}, f, indent=1)


if __name__ == "__main__":
    main()
