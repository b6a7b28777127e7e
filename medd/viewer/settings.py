"""The viewer's ``[central]`` section (where central is and how to reach it)
and its ``[reading_room]`` section (where OHIF's prebuilt app and the report
templates are).

Validated whole at start-up like the rest of the config; every problem names
the file, section and key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from medd.config import Config, ConfigError, ConfigProblem
from medd.pull import PullSettings, clear_http_problem
from medd.scheduling import Backoff


@dataclass(frozen=True)
class CentralSettings(PullSettings):
    """:class:`~medd.pull.PullSettings` (the token is the viewer's, from ``medd viewers add``; the
    backoff serves the requestor and the outgoing packages) and central's address."""

    # central's address, the To of status, overlay and report packages; when
    # empty, the From of the packages central sent is answered.
    address: str | None = None
    # The bearer token central pushes with (its [push] http_token); without it the
    # viewer's POST /packages takes nothing.
    push_token: str | None = None
    # Where the viewer's own packages (status, overlays, reports) go: None for url's /packages, or
    # mailto:central's-address, through [mail] smarthost.
    packages: str | None = None


def _positive(config: Config, key: str, default: str | None, problems: list) -> float | None:
    text = config.section("central").get(key, default)
    if text is None or not str(text).strip():
        problems.append(ConfigProblem(config.path, "central", key, "is required"))
        return None
    try:
        value = float(text)
    except ValueError:
        problems.append(ConfigProblem(config.path, "central", key, f"not a number of seconds: {text!r}"))
        return None
    if value <= 0:
        problems.append(ConfigProblem(config.path, "central", key, f"must be more than 0, not {text!r}"))
        return None
    return value


def central_settings(config: Config, *, check_files: bool = True) -> CentralSettings:
    """The ``[central]`` settings of a viewer node, or :class:`ConfigError` naming every problem."""
    problems: list[ConfigProblem] = []
    section = config.section("central")
    url = (section.get("url") or "").strip().rstrip("/")
    if not url:
        problems.append(ConfigProblem(config.path, "central", "url", "is required (e.g. http://central.example:8080)"))
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(ConfigProblem(config.path, "central", "url", f"must be an http:// or https:// URL, not {url!r}"))
    folder = Path(config.path).resolve().parent
    files = {}
    for key in ("ca", "client_cert"):
        text = (section.get(key) or "").strip()
        if text:
            files[key] = folder / text
            if check_files and not files[key].is_file():
                problems.append(ConfigProblem(config.path, "central", key, f"no such file: {files[key]}"))
    allow_http = _yes_no(config, "allow_http", problems)
    if url and urlsplit(url).scheme in ("http", "https"):
        refusal = clear_http_problem(url, allow_http)
        if refusal:
            problems.append(ConfigProblem(config.path, "central", "url", refusal))
    if url and "client_cert" in files and urlsplit(url).scheme != "https":
        problems.append(ConfigProblem(config.path, "central", "client_cert", "is presented only over https://"))
    token = (section.get("token") or "").strip() or None
    if token is None and "client_cert" not in files:
        problems.append(ConfigProblem(config.path, "central", "token",
                                      "is required (the viewer token printed by `medd viewers add` on central), "
                                      "unless client_cert names the certificate `--client-cert` issued"))
    poll = _positive(config, "poll_interval", None, problems)
    base = _positive(config, "retry_base", "1", problems)
    max_delay = _positive(config, "retry_max_delay", "300", problems)
    timeout = _positive(config, "timeout", "60", problems)
    address = (section.get("address") or "").strip() or None
    push_token = (section.get("push_token") or "").strip() or None
    if push_token is not None and len(push_token) < 32:
        problems.append(ConfigProblem(config.path, "central", "push_token",
                                      "is too short to be a secret: use at least 32 random characters"))
    packages = (section.get("packages") or "").strip() or None
    if packages is not None:
        from medd.mail.settings import mailto_address

        try:
            mailto_address(packages)
        except ValueError as e:
            problems.append(ConfigProblem(config.path, "central", "packages", str(e)))
    if problems:
        raise ConfigError(problems)
    return CentralSettings(url=url, token=token, poll_interval=poll, packages=packages, backoff=Backoff(base=base, max_delay=max_delay),
                           address=address, timeout=timeout, push_token=push_token, ca=_str(files.get("ca")),
                           client_cert=_str(files.get("client_cert")))


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _yes_no(config: Config, key: str, problems: list) -> bool:
    text = (config.section("central").get(key) or "no").strip().lower()
    if text not in ("yes", "no", "true", "false", "1", "0", "on", "off"):
        problems.append(ConfigProblem(config.path, "central", key, f"must be yes or no, not {text!r}"))
        return False
    return text in ("yes", "true", "1", "on")


def default_templates() -> Path:
    """The report templates shipped with medd: ``etc/templates`` of the checkout."""
    return Path(__file__).resolve().parents[2] / "etc" / "templates"


@dataclass(frozen=True)
class ReadingRoomSettings:
    """``[reading_room]``: ``ohif``, the folder of OHIF's prebuilt app (its ``index.html``); None for the
    one ``make ohif`` installs beside the checkout. ``templates``, the folder of per-modality report
    templates (:mod:`medd.viewer.templates`). ``complete_after``: seconds without a new image after
    which the worklist marks a study complete. ``being_read_for``: seconds during which a study opened by
    one user shows "being read by" to the others. ``idle_lock``: seconds without input after which the
    page locks (0: never)."""

    ohif_dist: Path | None = None
    templates: Path = field(default_factory=default_templates)
    complete_after: float = 120.0
    being_read_for: float = 600.0
    idle_lock: float = 900.0


def _number(config: Config, key: str, default: str, unit: str, *, zero: bool, problems: list) -> float | None:
    text = (config.section("reading_room").get(key) or default).strip()
    try:
        value = float(text)
    except ValueError:
        problems.append(ConfigProblem(config.path, "reading_room", key, f"not a number of {unit}: {text!r}"))
        return None
    if value < 0 or (value == 0 and not zero) or value != value or value == float("inf"):
        floor = "0 or more" if zero else "more than 0"
        problems.append(ConfigProblem(config.path, "reading_room", key, f"must be {floor} {unit}, not {text!r}"))
        return None
    return value


def reading_room_settings(config: Config, *, check_files: bool = True) -> ReadingRoomSettings:
    """The ``[reading_room]`` settings of a viewer node, or :class:`ConfigError` naming every problem."""
    section, folder = config.section("reading_room"), Path(config.path).resolve().parent
    problems: list[ConfigProblem] = []
    complete_after = _number(config, "complete_after", "120", "seconds", zero=True, problems=problems)
    being_read = _number(config, "being_read_for", "10", "minutes", zero=False, problems=problems)
    idle_lock = _number(config, "idle_lock", "15", "minutes", zero=True, problems=problems)
    dist, templates = None, default_templates()
    text = (section.get("ohif") or "").strip()
    if text:
        dist = (folder / text).resolve()
        if check_files and not (dist / "index.html").is_file():
            problems.append(ConfigProblem(config.path, "reading_room", "ohif",
                                          f"{dist} holds no OHIF app (no index.html); run `make ohif`"))
    text = (section.get("templates") or "").strip()
    if text:
        templates = (folder / text).resolve()
        if check_files and not templates.is_dir():
            problems.append(ConfigProblem(config.path, "reading_room", "templates", f"no such folder: {templates}"))
    if problems:
        raise ConfigError(problems)
    return ReadingRoomSettings(ohif_dist=dist, templates=templates, complete_after=complete_after,
                               being_read_for=being_read * 60, idle_lock=idle_lock * 60)
