"""Real mail servers for the e-mail transport's tests: Debian's postfix (submission with STARTTLS and
SASL AUTH, delivering over LMTP) and dovecot (IMAPS, SASL for postfix, LMTP into Maildirs).

Each runs from a throw-away folder on free loopback ports: ``postfix -c DIR start`` with its own
queue and data directories, ``dovecot -c FILE``. They need root (postfix's master and dovecot drop
privileges themselves) and the packages ``make test-tools`` installs; otherwise the tests skip
with the reason.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medd.tlscert import make_self_signed

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"
#: The domains the servers take mail for: every mailbox a test uses lives in one of them.
DOMAINS = ("central.test", "viewer.test", "gateway.test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_reason() -> str | None:
    """Why the mail servers cannot run here, or None."""
    if not (Path(POSTFIX).exists() and Path(DOVECOT).exists() and Path("/usr/lib/dovecot/lmtp").exists()
            and Path("/usr/lib/dovecot/imap").exists()):
        return "postfix, dovecot-imapd and dovecot-lmtpd are not installed (make test-tools installs them as root)"
    if os.geteuid() != 0:
        return "postfix and dovecot are started as root (they drop privileges themselves)"
    return None


def _wait_listening(port: int, what: str, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    text = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"{what} is not listening on 127.0.0.1:{port}:\n{text}")


@dataclass
class MailServers:
    """postfix + dovecot, their ports, the CA that verifies both, and the mailboxes' passwords."""

    folder: Path
    ca: Path = field(init=False)
    submission_port: int = field(default_factory=free_port)
    smtps_port: int = field(default_factory=free_port)
    imaps_port: int = field(default_factory=free_port)
    lmtp_port: int = field(default_factory=free_port)
    auth_port: int = field(default_factory=free_port)
    passwords: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.ca = self.folder / "tls" / "cert.pem"
        self.key = self.folder / "tls" / "key.pem"

    # -- users ---------------------------------------------------------------------------------------

    def add_user(self, address: str, password: str | None = None) -> str:
        """A mailbox (and SASL login) for ``address``; returns its password, also written to
        ``<folder>/<address>.password`` for a node's ``password_file``."""
        password = password or os.urandom(9).hex()
        self.passwords[address] = password
        lines = "".join(f"{a}:{{PLAIN}}{p}::::::\n" for a, p in self.passwords.items())
        (self.folder / "dovecot" / "users").write_text(lines)
        self.password_file(address).write_text(password + "\n")
        return password

    def password_file(self, address: str) -> Path:
        return self.folder / f"{address}.password"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.folder / "mail" / domain / local / "Maildir"

    def messages(self, address: str, folder: str = "") -> list[Path]:
        """The files of the messages in ``address``'s mailbox folder ('' for INBOX)."""
        base = self.maildir(address) / (f".{folder}" if folder else "")
        return sorted(p for sub in ("new", "cur") for p in (base / sub).glob("*") if p.is_file())

    # -- start / stop --------------------------------------------------------------------------------

    def start(self) -> None:
        reason = missing_reason()
        if reason:
            pytest.skip(reason)
        make_self_signed(self.ca, self.key, "localhost")
        self._start_dovecot()
        self._start_postfix()

    def _start_dovecot(self) -> None:
        base = self.folder / "dovecot"
        (base / "run").mkdir(parents=True, exist_ok=True)
        mail = self.folder / "mail"
        mail.mkdir(exist_ok=True)
        shutil.chown(mail, "nobody", "nogroup")
        (base / "users").touch()
        self.conf = base / "dovecot.conf"
        self.conf.write_text(f"""
protocols = imap lmtp
base_dir = {base}/run
state_dir = {base}/state
instance_name = medd-test-{self.imaps_port}
log_path = {base}/dovecot.log
listen = 127.0.0.1
ssl = required
ssl_cert = <{self.ca}
ssl_key = <{self.key}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {base}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%d/%n
}}
mail_location = maildir:~/Maildir
first_valid_uid = 1
namespace inbox {{
  inbox = yes
  separator = .
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {self.auth_port}
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@{DOMAINS[0]}
}}
lmtp_save_to_detail_mailbox = no
""")
        subprocess.run([DOVECOT, "-c", str(self.conf)], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(self.imaps_port, "dovecot IMAPS", base / "dovecot.log")
        _wait_listening(self.lmtp_port, "dovecot LMTP", base / "dovecot.log")

    def _start_postfix(self) -> None:
        conf = self.folder / "postfix"
        conf.mkdir(exist_ok=True)
        self.postfix_conf = conf
        for sub in ("queue", "data"):
            (self.folder / f"postfix-{sub}").mkdir(exist_ok=True)
        shutil.chown(self.folder / "postfix-data", "postfix")
        log = self.folder / "postfix.log"
        (conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {self.folder}/postfix-queue
data_directory = {self.folder}/postfix-data
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.test
mydomain = test
myorigin = mail.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
maillog_file = {log}
maillog_file_prefixes = {self.folder}
virtual_mailbox_domains = {" ".join(DOMAINS)}
virtual_transport = lmtp:inet:127.0.0.1:{self.lmtp_port}
message_size_limit = 40000000
smtpd_tls_cert_file = {self.ca}
smtpd_tls_key_file = {self.key}
smtpd_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{self.auth_port}
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtp_dns_support_level = disabled
disable_dns_lookups = yes
biff = no
""")
        (conf / "master.cf").write_text(f"""
127.0.0.1:{self.submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
127.0.0.1:{self.smtps_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_sasl_auth_enable=yes
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
""")
        done = subprocess.run([POSTFIX, "-c", str(conf), "start"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"postfix did not start: {done.stdout}")
        _wait_listening(self.submission_port, "postfix submission", log)

    def stop(self) -> None:
        if getattr(self, "postfix_conf", None) is not None:
            subprocess.run([POSTFIX, "-c", str(self.postfix_conf), "abort"], capture_output=True)
        if getattr(self, "conf", None) is not None:
            subprocess.run(["/usr/bin/doveadm", "-c", str(self.conf), "stop"], capture_output=True)

    def wait_for_messages(self, address: str, count: int, folder: str = "", seconds: float = 180) -> list[Path]:
        """The messages in ``address``'s folder once there are at least ``count`` (postfix queues,
        then delivers over LMTP, asynchronously)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = self.messages(address, folder)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        log = (self.folder / "postfix.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{len(found)} of {count} messages reached {address}'s {folder or 'INBOX'}:\n{log}")


def mail_servers_folder() -> Path:
    """A folder dovecot's unprivileged mail user can traverse (pytest's tmp_path is root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="medd-mail-"))
    folder.chmod(0o755)
    return folder
