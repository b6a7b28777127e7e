"""The viewer's ``[central]`` section (where central is and how to reach it)
and its ``[reading_room]`` section (where OHIF's prebuilt app is).

Validated whole at start-up like the rest of the config; every problem names
the file, section and key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from medd.config import Config, ConfigError, ConfigProblem
from medd.pull import PullSettings
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


def central_settings(config: Config) -> CentralSettings:
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
    token = (section.get("token") or "").strip()
    if not token:
        problems.append(ConfigProblem(config.path, "central", "token",
                                      "is required: the viewer token printed by `medd viewers add` on central"))
    poll = _positive(config, "poll_interval", None, problems)
    base = _positive(config, "retry_base", "1", problems)
    max_delay = _positive(config, "retry_max_delay", "300", problems)
    timeout = _positive(config, "timeout", "60", problems)
    address = (section.get("address") or "").strip() or None
    push_token = (section.get("push_token") or "").strip() or None
    if push_token is not None and len(push_token) < 32:
        problems.append(ConfigProblem(config.path, "central", "push_token",
                                      "is too short to be a secret: use at least 32 random characters"))
    if problems:
        raise ConfigError(problems)
    return CentralSettings(url=url, token=token, poll_interval=poll, backoff=Backoff(base=base, max_delay=max_delay),
                           address=address, timeout=timeout, push_token=push_token)


@dataclass(frozen=True)
class ReadingRoomSettings:
    """``[reading_room]``: ``ohif``, the folder of OHIF's prebuilt app (its ``index.html``); None for the
    one ``make ohif`` installs beside the checkout."""

    ohif_dist: Path | None = None


def reading_room_settings(config: Config) -> ReadingRoomSettings:
    """The ``[reading_room]`` settings of a viewer node, or :class:`ConfigError`."""
    text = (config.section("reading_room").get("ohif") or "").strip()
    if not text:
        return ReadingRoomSettings()
    dist = (Path(config.path).resolve().parent / text).resolve()
    if not (dist / "index.html").is_file():
        raise ConfigError([ConfigProblem(config.path, "reading_room", "ohif",
                                         f"{dist} holds no OHIF app (no index.html); run `make ohif`")])
    return ReadingRoomSettings(ohif_dist=dist)
