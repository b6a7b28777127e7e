"""C-STORE into one medd central over plain DICOM and over DICOM TLS, in the same run.

pynetdicom is the SCU on both ports (one association for all objects), so
the difference is what TLS costs the receiver and the sender together.
The objects are N copies of pydicom's CT_small.dcm with fresh UIDs.

    .venv/bin/python bench/bench_dicom_tls.py [--objects 300] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import tempfile
import time

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from meddnode import HOST, MeddCentral, log  # noqa: E402

from medd.tlscert import issue_client_certificate, make_self_signed  # noqa: E402


def datasets(n: int) -> list:
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def store(port: int, objects: list, tls_args=None) -> float:
    """Seconds for one association storing every object (all must succeed)."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(objects[0].SOPClassUID, objects[0].file_meta.TransferSyntaxUID)
    t0 = time.perf_counter()
    assoc = ae.associate(HOST, port, ae_title="MEDD", tls_args=tls_args)
    if not assoc.is_established:
        raise SystemExit("association not established")
    # As storescu with TCP_NODELAY=1: without it every C-STORE waits for a delayed ACK (~40 ms).
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        statuses = [assoc.send_c_store(ds).Status for ds in objects]
    finally:
        assoc.release()
    elapsed = time.perf_counter() - t0
    if any(s != 0 for s in statuses):
        raise SystemExit(f"not every C-STORE succeeded: {sorted(set(statuses))}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dicom-port", type=int, default=21112)
    parser.add_argument("--tls-port", type=int, default=22762)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medd-bench-tls-") as work:
        pki = os.path.join(work, "pki")
        cert, key = os.path.join(pki, "server.pem"), os.path.join(pki, "server.key")
        from pathlib import Path

        make_self_signed(Path(cert), Path(key))
        client_pem, _ = issue_client_certificate(Path(cert).read_bytes(), Path(key).read_bytes(), "bench@centre")
        client = Path(pki) / "client.pem"
        client.write_bytes(client_pem)
        ctx = ssl.create_default_context(cafile=cert)
        ctx.load_cert_chain(str(client))
        extra = f"[tls]\ncertificate = {cert}\nprivate_key = {key}\nclient_ca = {cert}\n"
        rows = {"dicom": [], "dicom_tls": []}
        for rep in range(args.reps):
            node = MeddCentral(os.path.join(work, "node"), {"dicom": args.dicom_port, "dicom_tls": args.tls_port}, extra)
            node.write_config()
            node.start()
            try:
                for key_, port, tls_args in (("dicom", args.dicom_port, None),
                                            ("dicom_tls", args.tls_port, (ctx, "localhost"))):
                    seconds = store(port, datasets(args.objects), tls_args)
                    rows[key_].append(args.objects / seconds)
                    log(f"rep {rep + 1} {key_}: {args.objects} objects in {seconds:.2f} s = {args.objects / seconds:.0f} obj/s")
                assert node.stored_count() == 2 * args.objects
            finally:
                node.stop()
        for key_, rates in rows.items():
            rates.sort()
            print(f"{key_:<10} median {rates[len(rates) // 2]:.0f} obj/s  (min {rates[0]:.0f}, max {rates[-1]:.0f}, "
                  f"{args.reps} reps x {args.objects} CT_small objects)")


if __name__ == "__main__":
    main()
