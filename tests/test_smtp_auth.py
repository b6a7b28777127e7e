"""SMTP for centres that send mail directly: STARTTLS required, and AUTH (SASL PLAIN/LOGIN) only
over TLS with the centre's token as password, counted as authentication by the sender policy;
Python's smtplib as the sending MTA, on loopback."""
from __future__ import annotations

import base64
import smtplib
import ssl

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from medd.config import ConfigError, load_config
from medd.storage import index
from tests.conftest import listener_port, write_config
from tests.test_tls import ORIGIN, image_package, server_tls  # noqa: F401 (server_tls is a fixture)

LISTEN = {"smtp": "tcp:0:interface=127.0.0.1"}
RECIPIENT = "viewer1@central.test"


@pytest.fixture
def server_cert(request):
    """The node's certificate and its [tls] section (test_tls's server_tls), with [smtp] require_starttls."""
    cert, extra = request.getfixturevalue("server_tls")
    return cert, extra + "[smtp]\nrequire_starttls = yes\n"


async def _central(make_central, server_cert, clock=None):
    """Central requiring STARTTLS, with centre-a (ct1@centre-a.example) and centre-b registered with tokens."""
    _, extra = server_cert
    node = await make_central(LISTEN, extra=extra, clock=clock)
    directory = node.central_storage.directory
    token_a = (await directory.add_centre("centre-a", addresses=[ORIGIN], token=True)).token
    token_b = (await directory.add_centre("centre-b", addresses=["ct@centre-b.example"], token=True)).token
    return node, token_a, token_b


def _session(port: int, cert, steps):
    """Blocking: one SMTP session; ``steps(client)`` runs after EHLO (and STARTTLS if it asks)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("centre-a.example")
        return steps(client, ssl.create_default_context(cafile=str(cert)))


def _encrypted(client, context):
    client.starttls(context=context)
    client.ehlo("centre-a.example")


async def _count(node) -> int:
    return await node.database.run(index.count_objects)


@pytest_twisted.ensureDeferred
async def test_mail_before_starttls_is_refused_with_530(make_central, server_cert):
    """With require_starttls, MAIL FROM in clear text gets 530 and nothing is stored; AUTH is neither
    offered nor accepted in clear text (538)."""
    node, token, _ = await _central(make_central, server_cert)

    def clear(client, _):
        return client.has_extn("auth"), client.docmd("AUTH", "PLAIN " + _plain(ORIGIN, token))[0], \
            client.docmd("MAIL", f"FROM:<{ORIGIN}>")

    offered, auth_code, (mail_code, mail_reply) = await deferToThread(
        _session, listener_port(node, "smtp"), server_cert[0], clear)
    assert (offered, auth_code, mail_code) == (False, 538, 530)
    assert b"STARTTLS" in mail_reply
    assert await _count(node) == 0


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest_twisted.ensureDeferred
async def test_auth_with_the_centres_token_authenticates_its_packages(make_central, server_cert):
    """After STARTTLS, AUTH PLAIN or LOGIN with the centre's address and token is accepted (235) and a
    package in its name is stored (250); a wrong token gets 535."""
    node, token, _ = await _central(make_central, server_cert)
    package = image_package()

    def session(mechanism):
        def steps(client, context):
            _encrypted(client, context)
            mechanisms = client.esmtp_features.get("auth", "").split()
            with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
                client.login(ORIGIN, "not-the-token")
            client.user, client.password = ORIGIN, token
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            refused = client.sendmail(ORIGIN, [RECIPIENT], package)
            return mechanisms, wrong.value.smtp_code, code, refused
        return steps

    mechanisms, wrong, code, refused = await deferToThread(
        _session, listener_port(node, "smtp"), server_cert[0], session("PLAIN"))
    assert sorted(mechanisms) == ["LOGIN", "PLAIN"] and wrong == 535 and code == 235 and refused == {}
    assert await _count(node) == 1
    # LOGIN works the same way (the resend is idempotent: still one object).
    _, _, code, refused = await deferToThread(_session, listener_port(node, "smtp"), server_cert[0], session("LOGIN"))
    assert code == 235 and refused == {}
    assert await _count(node) == 1


@pytest_twisted.ensureDeferred
async def test_unauthenticated_or_other_centres_mail_in_a_centres_name_is_refused(make_central, server_cert):
    """Over STARTTLS without AUTH, or authenticated as another centre, a package from centre-a's
    address gets 554 and nothing is stored."""
    node, _, token_b = await _central(make_central, server_cert)
    package = image_package()

    def anonymous(client, context):
        _encrypted(client, context)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(ORIGIN, [RECIPIENT], package)
        return refused.value.smtp_code, refused.value.smtp_error

    def as_b(client, context):
        _encrypted(client, context)
        client.login("ct@centre-b.example", token_b)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(ORIGIN, [RECIPIENT], package)
        return refused.value.smtp_code, refused.value.smtp_error

    for steps in (anonymous, as_b):
        code, reply = await deferToThread(_session, listener_port(node, "smtp"), server_cert[0], steps)
        assert code == 554 and b"centre-a" in reply
    # Centre-b's token is not a password for centre-a's address either.
    def b_as_a(client, context):
        _encrypted(client, context)
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            client.login(ORIGIN, token_b)
        return wrong.value.smtp_code

    assert await deferToThread(_session, listener_port(node, "smtp"), server_cert[0], b_as_a) == 535
    assert await _count(node) == 0


@pytest_twisted.ensureDeferred
async def test_failed_auth_is_throttled_per_user_and_client(make_central, server_cert):
    """Five wrong AUTH passwords for centre-a from one client get 535; then even the right token gets
    454 4.7.0 with the wait, and no password is checked; another user from the same client is not
    held back; once the wait has passed on the node's clock, the right token is accepted (235). Each
    failure is one refused authentication in the audit trail (outcome 4; throttled, 8)."""
    from medd.storage.audit import AuditFilter
    from tests.test_viewer import _fake_clock

    clock = _fake_clock()
    node, token_a, token_b = await _central(make_central, server_cert, clock=clock)
    port = listener_port(node, "smtp")

    def auth(user: str, password: str):
        def steps(client, context):
            _encrypted(client, context)
            return client.docmd("AUTH", "PLAIN " + _plain(user, password))
        return deferToThread(_session, port, server_cert[0], steps)

    codes = [(await auth(ORIGIN, "not-the-token"))[0] for _ in range(5)]
    assert codes == [535] * 5
    code, reply = await auth(ORIGIN, token_a)
    assert code == 454 and b"4.7.0" in reply and b"try again in 1 s" in reply, reply
    assert (await auth("ct@centre-b.example", token_b))[0] == 235
    refused = await node.audit.search(AuditFilter(event="auth-refused"), 100)
    assert [(r.entry.outcome, r.entry.user, r.entry.credential) for r in refused] == (
        [(4, ORIGIN, "password")] * 5 + [(8, ORIGIN, "password")])
    clock.advance(2)
    assert (await auth(ORIGIN, token_a))[0] == 235


def test_require_starttls_needs_a_certificate(tmp_path):
    """require_starttls without [tls] certificate is refused at start, naming the key."""
    path = write_config(tmp_path, LISTEN, "[smtp]\nrequire_starttls = yes\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert [(p.section, p.key) for p in raised.value.problems] == [("smtp", "require_starttls")]
