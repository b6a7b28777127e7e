"""``[mail]`` and ``[mailbox]`` are validated whole at start, every problem named by section and key;
``medd centres add … --smime-cert`` and ``medd viewers add … --smime-cert`` register the certificate a
sender's S/MIME signatures are verified against; a ``mailto:`` push URL is one plain address."""
from __future__ import annotations

import contextlib
import io

import pytest

from medd.cli import main as medd_main
from medd.config import ConfigError
from medd.storage.directory import DirectoryError, check_push_url
from medd.validation import validate_file
from tests.conftest import write_config


def problems_of(tmp_path, extra: str, role: str = "central") -> list[str]:
    path = write_config(tmp_path, extra=extra, role=role)
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    return [f"[{p.section}] {p.key}: {p.message}" for p in info.value.problems]


def test_mail_sections_report_every_problem(tmp_path):
    """A smarthost that is not smtp(s)://, a starttls value other than required/optional, a username
    without its password file, a missing S/MIME key, a mailbox URL that is not imaps://user@host and a
    mailbox without password file are all reported together."""
    found = problems_of(tmp_path, "[mail]\nsmarthost = http://mail.example\nstarttls = maybe\nusername = gw\n"
                                  f"smime_certificate = {tmp_path / 'central.ini'}\n"
                                  "[mailbox]\nurl = imap://mail.example/INBOX\npoll_interval = -1\n")
    text = "\n".join(found)
    assert "[mail] smarthost: must be smtp://host:587 (STARTTLS) or smtps://host:465" in text
    assert "[mail] starttls: must be required or optional, not 'maybe'" in text
    assert "[mail] password_file: username and password_file go together" in text
    assert "[mail] smime_private_key: smime_certificate and smime_private_key go together" in text
    assert "[mailbox] url: must be imaps://user@host[:port][/folder]" in text
    assert "[mailbox] password_file: is required" in text
    assert "[mailbox] poll_interval: must be a number of seconds more than 0" in text


def test_a_mailto_central_needs_a_smarthost(tmp_path):
    """A gateway whose central is mailto: is refused at start without [mail] smarthost, and with a
    malformed address."""
    found = problems_of(tmp_path, "[gateway]\naddress = ct1@centre.example\ncentral = mailto:central@central.example\n",
                        role="gateway")
    assert found == ["[gateway] central: a mailto: central needs [mail] smarthost (the server this node sends through)"]
    found = problems_of(tmp_path, "[gateway]\naddress = ct1@centre.example\ncentral = mailto:a@b,c@d\n"
                                  "[mail]\nsmarthost = smtp://localhost:587\n", role="gateway")
    assert len(found) == 1 and found[0].startswith("[gateway] central: a mailto: URL names one address")


def test_a_mailto_push_url_is_one_address():
    """``mailto:dr-lee@viewers.example`` is a push URL; a list, a query or no domain is not."""
    check_push_url("mailto:dr-lee@viewers.example")
    for bad in ("mailto:dr-lee", "mailto:a@b.example,c@d.example", "mailto:a@b.example?subject=x"):
        with pytest.raises(DirectoryError):
            check_push_url(bad)


def test_smime_certificates_are_registered_from_the_cli(tmp_path):
    """``--smime-cert FILE`` on centres add and viewers add stores the PEM against the address; the
    directory answers it for that address only, and a file that is not a certificate is refused."""
    from tests.test_mail import smime_files

    ini = write_config(tmp_path)
    centre_cert, _ = smime_files(tmp_path / "keys", "ct1@centre-a.example")
    viewer_cert, _ = smime_files(tmp_path / "keys", "dr-lee@viewers.example")
    def run(*args: str) -> int:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return medd_main([*args, "--config", str(ini)])

    assert run("centres", "add", "centre-a", "--address", "ct1@centre-a.example", "--smime-cert", str(centre_cert)) == 0
    assert run("viewers", "add", "dr-lee@viewers.example", "--push", "mailto:dr-lee@viewers.example",
               "--smime-cert", str(viewer_cert)) == 0
    assert run("centres", "add", "centre-b", "--address", "gw@centre-b.example", "--smime-cert", str(ini)) != 0

    from medd.config import load_config
    from medd.storage.database import Database
    from medd.storage.directory import smime_certificate_of

    database = Database(None, load_config(ini).database_url)
    try:
        with database.engine.begin() as conn:
            assert smime_certificate_of(conn, "CT1@centre-a.example") == centre_cert.read_text()
            assert smime_certificate_of(conn, "dr-lee@viewers.example") == viewer_cert.read_text()
            assert smime_certificate_of(conn, "gw@centre-b.example") is None
            # Refused before anything was written: no centre-b either.
            assert conn.exec_driver_sql("SELECT count(*) FROM centres WHERE name = 'centre-b'").scalar() == 0
    finally:
        database.engine.dispose()
