"""The gateway's ``[gateway]`` section, validated whole at start.

Parsed once by the node's validation (``medd check-config`` and twistd run the
same one) into frozen :class:`GatewaySettings`; every problem names the file,
section and key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from medd.config import Config, ConfigError, ConfigProblem, SectionReader, _parse_size
from medd.mail.settings import mailto_address
from medd.pull import PullSettings, clear_http_problem
from medd.scheduling import Backoff

#: Every key the gateway reads from ``[gateway]``.
GATEWAY_KEYS = (
    "address", "central", "central_name", "ca", "client_cert", "token", "outbox", "accept_ae", "watch",
    "watch_interval", "max_spool", "poll_interval", "retry_base", "retry_max_delay", "timeout", "results_to",
    "allow_http", "results_tls",
)


@dataclass(frozen=True)
class PacsDestination:
    """The centre's PACS, ``[gateway] results_to = AE@host:port``: where overlays and reports go by C-STORE."""

    ae_title: str  # the PACS's (called) AE title
    host: str
    port: int
    calling_ae: str = "MEDD"  # the gateway's own AE title ([dicom] ae_title)
    # [gateway] results_tls: DICOM TLS to the PACS, verified against [gateway] ca, presenting client_cert.
    tls: bool = False
    tls_ca: str | None = None
    tls_client_cert: str | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


def _is_ae_title(ae: str) -> bool:
    return 0 < len(ae) <= 16 and ae.isascii() and ae.isprintable() and "\\" not in ae


def parse_pacs_destination(text: str, calling_ae: str = "MEDD") -> PacsDestination:
    """``AE@host:port`` (an IPv6 host in brackets), or ValueError saying what is wrong."""
    ae, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not at or not colon or not host:
        raise ValueError(f"must be AE@host:port (the PACS's AE title, host and port), not {text!r}")
    if not _is_ae_title(ae.strip()):
        raise ValueError(f"{ae!r} is not an AE title (1 to 16 ASCII characters without backslash)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a port number (1 to 65535)")
    return PacsDestination(ae.strip(), host, int(port), calling_ae)


@dataclass(frozen=True)
class GatewaySettings:
    address: str  # the centre's registered address: the From of every package
    central: str  # tls://host:port, or http(s)://host[:port]/packages
    central_name: str  # the To of every package: central's node name
    ca: str | None = None  # PEM of the CA that signed central's certificate (None: the platform's)
    client_cert: str | None = None  # PEM of the gateway's certificate and key (tls://)
    token: str | None = None  # the centre's bearer token on central (https://, the outbox)
    outbox: PullSettings | None = None  # central's outbox for this centre (None: not pulled)
    accept_ae: tuple[str, ...] = ()  # calling AE titles accepted (empty: any)
    watch: Path | None = None  # a folder whose files are taken in
    watch_interval: float = 5.0
    max_spool: int | None = None  # bytes waiting for central beyond which new objects wait (None: no limit)
    backoff: Backoff = Backoff(base=1.0, max_delay=300.0)
    timeout: float = 60.0
    results_to: PacsDestination | None = None  # the centre's PACS for overlays and reports (None: kept here only)

    def for_senders(self) -> dict[str, str]:
        """The ``settings`` the push sender of :attr:`central`'s scheme receives."""
        own = (("tls_ca", self.ca), ("tls_client_cert", self.client_cert), ("http_token", self.token))
        return {k: v for k, v in own if v is not None}


def gateway_settings(config: Config, *, check_files: bool = True) -> GatewaySettings:
    """The ``[gateway]`` settings of a gateway node, or :class:`ConfigError` naming every problem."""
    problems: list[ConfigProblem] = []
    reader = SectionReader(config, "gateway", problems)
    folder = reader.folder
    problem, get, seconds = reader.problem, reader.get, reader.seconds

    def flag(key: str) -> bool:
        text = (get(key) or "no").lower()
        if text not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
            problem(key, f"must be yes or no, not {text!r}")
        return text in ("yes", "true", "on", "1")

    def path(key: str, *, directory: bool = False) -> Path | None:
        text = get(key)
        if text is None:
            return None
        p = (folder / text).resolve()
        if check_files and directory and not p.is_dir():
            problem(key, f"no such folder: {p}")
        elif check_files and not directory and not p.is_file():
            problem(key, f"no such file: {p}")
        return p

    address = get("address")
    if address is None:
        problem("address", "is required: the centre's address on central (the From of its packages)")
    central = (get("central") or "").rstrip("/")
    parts = urlsplit(central)
    if not central:
        problem("central", "is required: tls://host:port, https://host[:port]/packages or mailto:address")
    elif parts.scheme == "mailto":
        try:
            mailto_address(central)
        except ValueError as e:
            problem("central", str(e))
    elif parts.scheme not in ("tls", "http", "https") or not parts.hostname:
        problem("central", f"must be tls://host:port, http(s)://host[:port]/packages or mailto:address, "
                           f"not {central!r}")
    elif parts.scheme == "tls" and parts.port is None:
        problem("central", f"a tls:// URL needs a port: {central!r}")
    central_name = get("central_name") or (parts.hostname if central else None) or "central"
    if parts.scheme == "mailto" and not get("central_name"):
        central_name = central[len("mailto:"):]  # central's mailbox is the To of every package
    ca, client_cert, token = path("ca"), path("client_cert"), get("token")
    if parts.scheme == "tls" and client_cert is None:
        problem("client_cert", "is required with a tls:// central: the PEM (certificate and key) central issued "
                               "to this centre")
    if parts.scheme in ("http", "https") and token is None and not (parts.scheme == "https" and client_cert):
        problem("token", f"is required with an {parts.scheme}:// central: the centre's bearer token on central "
                         "(or, over https://, client_cert)")
    allow_http = flag("allow_http")
    if parts.scheme == "http" and (refusal := clear_http_problem(central, allow_http)):
        problem("central", refusal)

    base, max_delay = seconds("retry_base", 1.0), seconds("retry_max_delay", 300.0)
    timeout = seconds("timeout", 60.0)
    outbox_url = (get("outbox") or "").rstrip("/")
    if not outbox_url and parts.scheme in ("http", "https") and central:
        outbox_url = central[: -len("/packages")] if central.endswith("/packages") else central
    outbox = None
    if outbox_url:
        op = urlsplit(outbox_url)
        if op.scheme not in ("http", "https") or not op.hostname:
            problem("outbox", f"must be an http:// or https:// URL, not {outbox_url!r}")
        elif token is None and not (op.scheme == "https" and client_cert):
            problem("token", "is required to pull central's outbox: the centre's bearer token on central "
                             "(or, over https://, client_cert)")
        elif refusal := clear_http_problem(outbox_url, allow_http):
            if get("outbox"):  # one taken from [gateway] central is reported there
                problem("outbox", refusal)
        else:
            outbox = PullSettings(url=outbox_url, token=token, poll_interval=seconds("poll_interval", 30.0),
                                  backoff=Backoff(base=base, max_delay=max_delay), timeout=timeout,
                                  ca=str(ca) if ca else None,
                                  client_cert=str(client_cert) if client_cert and op.scheme == "https" else None)

    accept = tuple(a for a in (get("accept_ae") or "").replace(",", " ").split() if a)
    for ae in accept:
        if not _is_ae_title(ae):
            problem("accept_ae", f"not an AE title (1 to 16 ASCII characters without backslash): {ae!r}")

    max_spool = None
    if get("max_spool") is not None:
        try:
            max_spool = _parse_size(get("max_spool"))
        except ValueError:
            problem("max_spool", f"not a size (e.g. 10G, 500M): {get('max_spool')!r}")

    watch, watch_interval = path("watch", directory=True), seconds("watch_interval", 5.0)
    results_to = None
    if get("results_to") is not None:
        try:
            results_to = parse_pacs_destination(get("results_to"), config.section("dicom").get("ae_title") or "MEDD")
        except ValueError as e:
            problem("results_to", str(e))
    if flag("results_tls"):
        if results_to is None:
            problem("results_tls", "needs results_to")
        else:
            results_to = dataclasses.replace(results_to, tls=True, tls_ca=str(ca) if ca else None,
                                             tls_client_cert=str(client_cert) if client_cert else None)
    if problems:
        raise ConfigError(problems)
    return GatewaySettings(
        address=address, central=central, central_name=central_name, ca=str(ca) if ca else None,
        client_cert=str(client_cert) if client_cert else None, token=token, outbox=outbox, accept_ae=accept,
        watch=watch, watch_interval=watch_interval, max_spool=max_spool,
        backoff=Backoff(base=base, max_delay=max_delay), timeout=timeout, results_to=results_to,
    )
