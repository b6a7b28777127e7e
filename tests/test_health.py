"""Health: GET /healthz and /readyz on a real node over loopback, and `medd doctor` from the shell."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest_twisted
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.threads import deferToThread

from tests.conftest import listener_port, write_config

LISTEN = {"http": "tcp:0:interface=127.0.0.1", "dicom": "tcp:0:interface=127.0.0.1"}
MEDD = os.path.join(os.path.dirname(sys.executable), "medd")


async def _get(port: int, path: str) -> requests.Response:
    return await deferToThread(requests.get, f"http://127.0.0.1:{port}{path}", timeout=30)


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz_on_a_ready_node(make_central):
    """/healthz answers without a credential and says only "alive"; /readyz without a credential says ready,
    having checked the database, the blob store, free space and every listener."""
    node = await make_central(LISTEN, "[limits]\nmin_free_space = 1M\n")
    port = listener_port(node, "http")
    alive = await _get(port, "/healthz")
    assert alive.status_code == 200
    assert alive.json() == {"status": "alive"}
    ready = await _get(port, "/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready"
    checked = {c["check"]: c["status"] for c in body["checks"]}
    assert checked == {"database": "ok", "blob store": "ok", "free space": "ok", "listener dicom": "ok",
                       "listener http": "ok"}
    # Nothing sensitive in an answer anyone may read: no path of the node's.
    assert str(node.config.storage_path) not in ready.text


@pytest_twisted.ensureDeferred
async def test_readyz_names_what_fails(make_central, tmp_path):
    """Free space below [limits] min_free_space, a missing archive target and a stopped listener make
    /readyz answer 503 problem JSON listing exactly those checks; mounting the archive again brings it back."""
    archive = tmp_path / "archive-mount"
    node = await make_central(LISTEN, f"[limits]\nmin_free_space = 999999G\n[archive]\nbackend = tape\npath = {archive}\n")
    port = listener_port(node, "http")
    await node.getServiceNamed("listen-dicom").stopService()
    answer = await _get(port, "/readyz")
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    doc = answer.json()
    assert doc["status"] == 503 and doc["type"] == "urn:medd:problem:not-ready"
    assert {f["check"] for f in doc["failing"]} == {"free space", "archive", "listener dicom"}
    assert "min_free_space" in doc["detail"]
    assert str(archive) not in answer.text
    archive.mkdir()
    doc = (await _get(port, "/readyz")).json()
    assert {f["check"] for f in doc["failing"]} == {"free space", "listener dicom"}


def _certificate(path, days: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "central.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))


def _doctor(ini) -> subprocess.CompletedProcess:
    return subprocess.run([MEDD, "doctor", "--config", str(ini)], capture_output=True, text=True, timeout=60)


def _doctor_here(ini, capsys) -> subprocess.CompletedProcess:
    """The `medd doctor` command run in this process (its exit status and what it printed)."""
    from medd.cli import main

    status = main(["doctor", "--config", str(ini)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["medd", "doctor"], status, out.out, out.err)


def test_doctor_healthy_node_and_expiring_certificate(tmp_path):
    """`medd doctor` on a sound config: exit 0, one line per finding, the TLS certificate that expires in
    10 days a warning that says what to do, the one valid for a year ok, the clock ok."""
    _certificate(tmp_path / "soon", 10)
    _certificate(tmp_path / "ca", 365)
    (tmp_path / "store").mkdir()
    ini = write_config(tmp_path, {"http": "tcp:0:interface=127.0.0.1"},
                       f"[limits]\nmin_free_space = 1M\n[tls]\ncertificate = {tmp_path / 'soon.pem'}\n"
                       f"private_key = {tmp_path / 'soon.key'}\nclient_ca = {tmp_path / 'ca.pem'}\n")
    done = _doctor(ini)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("OK      config:") for line in lines)
    warning = [line for line in lines if line.startswith("WARNING certificate [tls] certificate")]
    assert len(warning) == 1 and "renew it" in warning[0] and "expires on" in warning[0]
    assert any(line.startswith("OK      certificate [tls] client_ca") for line in lines)
    assert any(line.startswith("OK      clock:") for line in lines)
    assert any(line.startswith("OK      blob store:") for line in lines)


def test_doctor_reports_errors_with_what_to_do(tmp_path, capsys):
    """An expired certificate, too little free space and a missing archive mount are errors: each on its
    own line with what to do, and doctor exits non-zero; a config with an unknown key is an error too."""
    _certificate(tmp_path / "old", -2)
    (tmp_path / "store").mkdir()
    ini = write_config(tmp_path, {"http": "tcp:0:interface=127.0.0.1"},
                       f"[limits]\nmin_free_space = 999999G\n[tls]\ncertificate = {tmp_path / 'old.pem'}\n"
                       f"private_key = {tmp_path / 'old.key'}\n[archive]\nbackend = tape\npath = {tmp_path / 'nomount'}\n")
    done = _doctor_here(ini, capsys)
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert any(line.startswith("ERROR   certificate [tls] certificate") and "expired" in line and "--" in line
               for line in errors), done.stdout
    assert any(line.startswith("ERROR   free space") and "min_free_space" in line for line in errors)
    assert any(line.startswith("ERROR   archive") and "mount" in line for line in errors)

    bad = write_config(tmp_path, {}, "[limits]\nmax_objetc_size = 1M\n", name="bad")
    done = _doctor_here(bad, capsys)
    assert done.returncode == 1
    assert any(line.startswith("ERROR   config:") and "max_objetc_size" in line and "max_object_size" in line
               for line in done.stdout.splitlines()), done.stdout
