"""The INI configuration of a node, read and validated whole at start-up.

Every problem is reported with the file, section and key it concerns, and all
problems are reported together, so an operator fixes a config in one pass.
"""
from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ROLES = ("central", "viewer", "gateway")
LISTENER_KEYS = ("dicom", "dicom_tls", "smtp", "http", "https", "tls")

#: The keys of the sections every node reads, whatever its role and plugins.
#: ``[listen]`` is absent: its keys are transport names, checked against the
#: loaded transports (medd/validation.py).
CORE_KEYS: dict[str, tuple[str, ...]] = {
    "node": ("role", "name"),
    "database": ("url",),
    "storage": ("path", "backend", "sweep_interval", "sweep_grace"),
    "limits": ("max_object_size", "request_timeout", "min_transfer_rate", "max_connections_per_peer",
               "max_mime_parts", "max_mime_containers", "max_stow_parts", "min_free_space"),
    "log": ("format",),
    "tls": ("certificate", "private_key", "client_ca", "client_ca_key"),
    "plugins": ("disabled",),
}

DEFAULT_MAX_OBJECT_SIZE = 512 * 1024 * 1024
#: ``[limits] min_free_space``: below this much free space in the blob store's file system the node is not ready.
DEFAULT_MIN_FREE_SPACE = 1024 * 1024 * 1024
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ConnectionLimits:
    """``[limits]``: how long one unit of work may take on a listener, and how many connections a peer may hold.

    A unit (an HTTP request, a TLS frame, an SMTP command line or message)
    must be complete within ``request_timeout`` of its first byte, plus the
    time its bytes take at ``min_transfer_rate``. The bytes earn time at that
    rate only: a peer that drip-feeds cannot keep a unit open, while a 512 MB
    upload at 50 kB/s or faster is never cut.
    """

    request_timeout: float = 30.0
    #: bytes per second
    min_transfer_rate: int = 50 * 1000
    max_connections_per_peer: int = 32

    def earned(self, size: int) -> float:
        """The seconds ``size`` bytes add to a unit's deadline."""
        return size / self.min_transfer_rate


@dataclass(frozen=True)
class PartLimits:
    """``[limits]``: how many parts a multipart body may have, counted before any parser builds them.

    A package carries one object, perhaps beside a signature and a note, so
    its bounds are far above any real package and far below what costs
    memory (a million empty parts or a thousand-deep nesting cost seconds
    and hundreds of megabytes in the MIME parser). A STOW-RS request carries
    a study's worth of instances (a million empty parts took 75 s to split).
    """

    #: boundary delimiter lines in a package, in all
    max_mime_parts: int = 16
    #: multipart containers in a package, at any depth (so also its nesting depth)
    max_mime_containers: int = 4
    #: instances in one STOW-RS request
    max_stow_parts: int = 10_000


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    section: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = f"[{self.section}]" + (f" {self.key}" if self.key else "")
        return f"{self.file}: {where}: {self.message}"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Config:
    """A validated node configuration."""

    path: str
    role: str
    name: str
    database_url: str
    storage_path: Path
    listen: dict[str, str]
    disabled_plugins: tuple[str, ...] = ()
    max_object_size: int = DEFAULT_MAX_OBJECT_SIZE
    connection_limits: ConnectionLimits = ConnectionLimits()
    part_limits: PartLimits = PartLimits()
    min_free_space: int = DEFAULT_MIN_FREE_SPACE
    #: ``[log] format``: twistd's log as Twisted's text lines or one JSON event per line.
    log_format: str = "text"
    tls_certificate: str | None = None
    tls_private_key: str | None = None
    tls_client_ca: str | None = None
    tls_client_ca_key: str | None = None  # to issue viewers' client certificates (`medd viewers add --client-cert`)
    #: ``[storage]``: seconds between blob sweeps (one runs at start too), and the age below which an
    #: unreferenced blob is kept (it may belong to an ingest not yet committed).
    sweep_interval: float = 3600.0
    sweep_grace: float = 3600.0
    sections: dict[str, dict[str, str]] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, str]:
        """The raw keys of one section (for plugins that own a section)."""
        return dict(self.sections.get(name, {}))


class SectionReader:
    """The raw keys of one section of ``config``, each problem appended to ``problems`` with the file,
    section and key (for a role's or subsystem's settings parser)."""

    def __init__(self, config: Config, name: str, problems: list[ConfigProblem]):
        self.config, self.name, self.problems = config, name, problems
        self.section = config.section(name)
        self.folder = Path(config.path).resolve().parent

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.config.path, self.name, key, message))

    def get(self, key: str) -> str | None:
        """The stripped value, None when absent or empty."""
        return (self.section.get(key) or "").strip() or None

    def seconds(self, key: str, default: float, maximum: float = float("inf")) -> float:
        """A number of seconds more than 0 (and below ``maximum``); ``default`` when absent or unusable."""
        text = self.get(key)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = 0
        if not 0 < value < maximum:
            bound = f" and below {maximum:g}" if maximum != float("inf") else ""
            self.problem(key, f"must be a number of seconds more than 0{bound}, not {text!r}")
            return default
        return value


_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)


def _parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1048576`` -> bytes."""
    m = _SIZE.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[m.group(2).upper()]


def load_config(path: str | os.PathLike, *, check_files: bool = True) -> Config:
    """Read and validate the core sections of ``path``; raise :class:`ConfigError` naming every problem.

    This is the part of the validation that needs no plugin; a node is
    started only after the whole of it (:func:`medd.validation.validate_file`).
    """
    config, problems = read_config(path, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(path: str | os.PathLike, *, check_files: bool = True) -> tuple[Config, list[ConfigProblem]]:
    """The config in ``path`` and the problems of its core sections.

    The Config is returned even when there are problems (with None where a
    value was unusable), so that the rest of the validation can still run
    and every problem be reported at once. Only a file that cannot be read
    or parsed at all raises :class:`ConfigError`.
    """
    path = str(path)
    problems: list[ConfigProblem] = []

    def problem(section: str, key: str | None, message: str) -> None:
        problems.append(ConfigProblem(path, section, key, message))

    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError([ConfigProblem(path, "-", None, f"cannot read: {e.strerror}")]) from e
    except configparser.Error as e:
        raise ConfigError([ConfigProblem(path, "-", None, f"not a valid INI file: {e}")]) from e

    base = Path(path).resolve().parent

    def get(section: str, key: str, default: str | None = None, required: bool = False) -> str | None:
        if parser.has_option(section, key):
            value = parser.get(section, key).strip()
            if value:
                return value
        if required:
            problem(section, key, "is required")
        return default

    role = get("node", "role", required=True)
    if role is not None and role not in ROLES:
        problem("node", "role", f"must be one of {', '.join(ROLES)}, not {role!r}")
    name = get("node", "name", required=True)

    db_url = get("database", "url", required=True)
    if db_url is not None:
        try:
            url = make_url(db_url)
            if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:"):
                db_path = Path(url.database)
                if not db_path.is_absolute():
                    db_url = str(url.set(database=str(base / db_path)))
        except ArgumentError as e:
            problem("database", "url", f"not an SQLAlchemy URL: {e}")

    storage = get("storage", "path", required=True)
    storage_path = None
    if storage is not None:
        storage_path = Path(storage)
        if not storage_path.is_absolute():
            storage_path = base / storage_path
        if check_files and storage_path.exists() and not storage_path.is_dir():
            problem("storage", "path", f"{storage_path} exists and is not a folder")

    sweep = {}
    for key in ("sweep_interval", "sweep_grace"):
        text = get("storage", key)
        if text is None:
            continue
        try:
            sweep[key] = float(text)
            if not 0 < sweep[key] <= 365 * 86400:
                raise ValueError(text)
        except ValueError:
            problem("storage", key, f"not a number of seconds more than 0 (at most a year): {text!r}")

    max_size = DEFAULT_MAX_OBJECT_SIZE
    size_text = get("limits", "max_object_size")
    if size_text is not None:
        try:
            max_size = _parse_size(size_text)
        except ValueError:
            problem("limits", "max_object_size", f"not a size (e.g. 512M): {size_text!r}")

    connection_limits = _connection_limits(get, problem)
    part_limits = PartLimits(**{
        key: _positive_whole(get, problem, "limits", key, default)
        for key, default in vars(PartLimits()).items()
    })

    min_free = DEFAULT_MIN_FREE_SPACE
    size_text = get("limits", "min_free_space")
    if size_text is not None:
        try:
            min_free = 0 if size_text.strip() == "0" else _parse_size(size_text)
        except ValueError:
            problem("limits", "min_free_space", f"not a size (e.g. 1G, or 0): {size_text!r}")
    log_format = get("log", "format", "text")
    if log_format not in LOG_FORMATS:
        problem("log", "format", f"must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")

    listen: dict[str, str] = {}
    if parser.has_section("listen"):
        for key, value in parser.items("listen"):
            value = value.strip()
            if not value:
                continue
            listen[key] = value
            try:
                _check_endpoint(value)
            except ValueError as e:
                problem("listen", key, f"not a Twisted endpoint string ({e}): {value!r}")

    disabled = tuple(
        n.strip() for n in (get("plugins", "disabled", "") or "").replace(",", " ").split() if n.strip()
    )

    cert = get("tls", "certificate")
    key = get("tls", "private_key")
    client_ca = get("tls", "client_ca")
    client_ca_key = get("tls", "client_ca_key")
    for k, v in (("certificate", cert), ("private_key", key), ("client_ca", client_ca), ("client_ca_key", client_ca_key)):
        if v is not None and check_files and not (base / v).is_file():
            problem("tls", k, f"no such file: {base / v}")
    if (cert is None) != (key is None):
        problem("tls", "private_key" if key is None else "certificate", "certificate and private_key go together")
    for listener in ("tls", "https"):
        if listener in listen and cert is None and not listen[listener].startswith("ssl:"):
            problem("listen", listener, "needs an ssl: endpoint, or [tls] certificate and private_key")
    if "dicom_tls" in listen and cert is None:
        problem("listen", "dicom_tls", "needs [tls] certificate and private_key (DICOM TLS takes a tcp: endpoint)")
    if get("https", "client_certificates") == "required" and client_ca is None:
        problem("https", "client_certificates", "required needs [tls] client_ca (the CAs client certificates are checked against)")
    if (get("smtp", "require_starttls") or "no").lower() in ("yes", "true", "on", "1") and cert is None:
        problem("smtp", "require_starttls", "needs [tls] certificate and private_key (the STARTTLS certificate)")
    if client_ca_key is not None and client_ca is None:
        problem("tls", "client_ca_key", "needs [tls] client_ca (the CA certificate it belongs to)")
    on_ssl = [k for k in ("tls", "https") if listen.get(k, "").startswith("ssl:")]
    if client_ca is not None and on_ssl:
        problem("tls", "client_ca", f"applies only to {' and '.join(on_ssl)} listeners on tcp: endpoints; an ssl: "
                                    "endpoint string carries its own TLS settings")

    if parser.defaults():
        problem("DEFAULT", None, "medd reads no [DEFAULT] section; put each key in its own section")
    defaults = set(parser.defaults())
    config = Config(
        path=path,
        role=role,
        name=name,
        database_url=db_url,
        storage_path=storage_path,
        listen=listen,
        disabled_plugins=disabled,
        max_object_size=max_size,
        connection_limits=connection_limits,
        part_limits=part_limits,
        min_free_space=min_free,
        log_format=log_format if log_format in LOG_FORMATS else "text",
        tls_certificate=str(base / cert) if cert else None,
        tls_private_key=str(base / key) if key else None,
        tls_client_ca=str(base / client_ca) if client_ca else None,
        tls_client_ca_key=str(base / client_ca_key) if client_ca_key else None,
        sections={s: {k: v for k, v in parser.items(s) if k not in defaults} for s in parser.sections()},
        **sweep,
    )
    return config, problems


def _connection_limits(get, problem) -> ConnectionLimits:
    defaults = ConnectionLimits()
    timeout = defaults.request_timeout
    text = get("limits", "request_timeout")
    if text is not None:
        try:
            timeout = float(text)
            if not 0 < timeout < 86400:
                raise ValueError(text)
        except ValueError:
            problem("limits", "request_timeout", f"not a number of seconds between 0 and 86400: {text!r}")
    rate = defaults.min_transfer_rate
    text = get("limits", "min_transfer_rate")
    if text is not None:
        try:
            rate = _parse_size(text.removesuffix("/s"))
        except ValueError:
            problem("limits", "min_transfer_rate", f"not a size per second (e.g. 50K): {text!r}")
    per_peer = _positive_whole(get, problem, "limits", "max_connections_per_peer", defaults.max_connections_per_peer)
    return ConnectionLimits(timeout, rate, per_peer)


def _positive_whole(get, problem, section: str, key: str, default: int) -> int:
    text = get(section, key)
    if text is None:
        return default
    if text.isdigit() and int(text) > 0:
        return int(text)
    problem(section, key, f"not a positive whole number: {text!r}")
    return default


def _check_endpoint(description: str) -> None:
    """Raise ValueError unless ``description`` parses as a server endpoint.

    Parsing needs a reactor argument but does not touch it; no port is bound.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, description)
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(str(e) or type(e).__name__) from e
