"""``[mail]`` (the smarthost a node sends through) and ``[mailbox]`` (the IMAP mailbox it takes
packages from), on a node of any role, validated whole at start."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from medd.config import Config, ConfigError, ConfigProblem, SectionReader, _parse_size

MAIL_KEYS = ("smarthost", "ca", "starttls", "username", "password_file", "timeout", "smime_certificate",
             "smime_private_key", "smime_recipient", "max_message_size")
MAILBOX_KEYS = ("url", "password_file", "ca", "poll_interval", "refused_folder", "timeout", "fragment_timeout")
#: What common mail servers accept; a larger package goes as message/partial fragments.
DEFAULT_MAX_MESSAGE_SIZE = 20 * 1024 * 1024

#: The sender settings' keys (:meth:`MailSettings.for_senders`) the mailto: sender reads.
SENDER_PREFIX = "mail_"


def mailto_address(url: str) -> str:
    """The address of a ``mailto:`` URL (RFC 6068); ValueError unless it is one plain address."""
    if not url.lower().startswith("mailto:"):
        raise ValueError(f"not a mailto: URL: {url!r}")
    address = unquote(url[len("mailto:"):]).strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in " ,;<>?\r\n\t"):
        raise ValueError(f"a mailto: URL names one address, as mailto:dr-lee@viewers.example, not {url!r}")
    return address


@dataclass(frozen=True)
class MailSettings:
    """``[mail]``: where a ``mailto:`` package goes first, and how the node proves itself there."""

    smarthost: str  # smtp://host:587 (STARTTLS) or smtps://host:465 (TLS from the start); "" for none
    ca: str | None = None  # PEM of the CAs that sign the smarthost's certificate (None: the platform's)
    starttls: str = "required"  # or "optional": send in clear text to a smtp:// smarthost without STARTTLS
    username: str | None = None  # SMTP AUTH user (with password_file)
    password_file: str | None = None
    timeout: float = 60.0
    # S/MIME (PS3.15 B.8): this node's certificate and key (PEM), which sign what it sends and decrypt
    # what it receives; and the certificate of the node it mails (a gateway's central), encrypted to.
    smime_certificate: str | None = None
    smime_private_key: str | None = None
    smime_recipient: str | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    def for_senders(self) -> dict[str, str]:
        """Merged into the ``settings`` every push sender receives; the ``mailto:`` sender reads them."""
        own = (("smarthost", self.smarthost or None), ("ca", self.ca), ("starttls", self.starttls),
               ("username", self.username), ("password_file", self.password_file), ("timeout", str(self.timeout)),
               ("smime_certificate", self.smime_certificate), ("smime_private_key", self.smime_private_key),
               ("smime_recipient", self.smime_recipient), ("max_message_size", str(self.max_message_size)))
        return {SENDER_PREFIX + k: v for k, v in own if v is not None}


@dataclass(frozen=True)
class MailboxSettings:
    """``[mailbox]``: an IMAP mailbox over TLS whose messages are packages for this node."""

    url: str
    host: str
    port: int
    user: str
    folder: str
    password_file: str
    ca: str | None = None
    poll_interval: float = 60.0
    refused_folder: str = "medd-refused"
    timeout: float = 60.0
    # A set of message/partial fragments with no new fragment for this long is reported incomplete.
    fragment_timeout: float = 86400.0


@dataclass(frozen=True)
class MailNodeSettings:
    mail: MailSettings | None = None
    mailbox: MailboxSettings | None = None

    def for_senders(self) -> dict[str, str]:
        return self.mail.for_senders() if self.mail is not None else {}


def _url(get, problem, key: str, form: str, acceptable):
    """(text, its urlsplit) of a required URL key, reporting one that is missing or not of ``form``."""
    text = get(key)
    parts = urlsplit(text or "")
    if text is None:
        problem(key, f"is required: {form}")
    elif not parts.hostname or not acceptable(parts):
        problem(key, f"must be {form}, not {text!r}")
    return text, parts


def mail_settings(config: Config, *, check_files: bool = True) -> MailNodeSettings:
    """``[mail]`` and ``[mailbox]``, or :class:`ConfigError` naming every problem."""
    problems: list[ConfigProblem] = []

    def reader(section_name: str):
        section = SectionReader(config, section_name, problems)

        def path(key: str) -> str | None:
            text = section.get(key)
            if text is None:
                return None
            p = Path(text) if Path(text).is_absolute() else section.folder / text
            if check_files and not p.is_file():
                section.problem(key, f"no such file: {p}")
            return str(p)

        def seconds(key: str, default: float) -> float:
            return section.seconds(key, default, maximum=86400)

        return section.section, section.get, section.problem, path, seconds, section

    def size(key: str, default: int) -> int:
        text = get(key)
        if text is None:
            return default
        try:
            value = _parse_size(text)
            if value < 64 * 1024:
                raise ValueError(text)
            return value
        except ValueError:
            problem(key, f"must be a size of at least 64K (e.g. 20M), not {text!r}")
            return default

    mail = None
    section, get, problem, path, seconds, _ = reader("mail")
    if section:
        smarthost, parts = None, urlsplit("")
        if get("smarthost") is not None or get("smime_certificate") is None:
            # Only a node that receives S/MIME and sends no mail goes without one.
            smarthost, parts = _url(get, problem, "smarthost", "smtp://host:587 (STARTTLS) or smtps://host:465",
                                    lambda p: p.scheme in ("smtp", "smtps") and p.path in ("", "/"))
        starttls = (get("starttls") or "required").lower()
        if starttls not in ("required", "optional"):
            problem("starttls", f"must be required or optional, not {starttls!r}")
        elif starttls == "optional" and parts.scheme == "smtps":
            problem("starttls", "applies to smtp:// smarthosts only (smtps:// is TLS from the start)")
        username, password_file = get("username"), path("password_file")
        if (username is None) != (password_file is None):
            problem("password_file" if username else "username", "username and password_file go together")
        certificate, key, recipient = path("smime_certificate"), path("smime_private_key"), path("smime_recipient")
        if (certificate is None) != (key is None):
            problem("smime_private_key" if certificate else "smime_certificate",
                    "smime_certificate and smime_private_key go together")
        if recipient is not None and certificate is None:
            problem("smime_recipient", "needs smime_certificate and smime_private_key (packages are signed, then "
                                       "encrypted)")
        mail = MailSettings(smarthost=smarthost or "", ca=path("ca"), starttls=starttls, username=username,
                            password_file=password_file, timeout=seconds("timeout", 60.0),
                            smime_certificate=certificate, smime_private_key=key, smime_recipient=recipient,
                            max_message_size=size("max_message_size", DEFAULT_MAX_MESSAGE_SIZE))

    mailbox = None
    section, get, problem, path, seconds, mailbox_reader = reader("mailbox")
    section_seconds = mailbox_reader.seconds
    if section:
        url, parts = _url(get, problem, "url", "imaps://user@host[:port][/folder]",
                          lambda p: p.scheme == "imaps" and bool(p.username))
        password_file = path("password_file")
        if password_file is None:
            problem("password_file", "is required in [mailbox]: a file holding the mailbox's password")
        refused = get("refused_folder") or "medd-refused"
        box = unquote(parts.path.lstrip("/")) or "INBOX"
        if refused == box:
            problem("refused_folder", f"must not be the folder packages are taken from ({box})")
        try:
            port = parts.port or 993
        except ValueError:
            problem("url", f"has no valid port: {url!r}")
            port = 993
        mailbox = MailboxSettings(
            url=url or "", host=parts.hostname or "", port=port, user=unquote(parts.username or ""), folder=box,
            password_file=password_file or "", ca=path("ca"), poll_interval=seconds("poll_interval", 60.0),
            refused_folder=refused, timeout=seconds("timeout", 60.0),
            fragment_timeout=section_seconds("fragment_timeout", 86400.0))

    if problems:
        raise ConfigError(problems)
    return MailNodeSettings(mail, mailbox)
