"""Central's own sections, ``[delivery]`` and ``[push]``, validated whole at start.

Parsed once by the node's validation (``medd check-config`` and twistd run
the same one) into frozen settings that the routing service is built from;
every problem names the file, section and key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medd.central.outbox import RetryPolicy
from medd.config import Config, ConfigError, ConfigProblem

#: Every key central reads from ``[delivery]`` and ``[push]``.
DELIVERY_KEYS = ("retry_base", "retry_multiplier", "retry_max_delay", "max_attempts", "poll_interval", "route_delay",
                 "failover_after")
PUSH_KEYS = ("tls_ca", "tls_client_cert", "http_token")


@dataclass(frozen=True)
class DeliverySettings:
    """``[delivery]``: the outbox's retries and the router's pacing, in seconds."""

    # retry_base, retry_multiplier, retry_max_delay and max_attempts.
    retry: RetryPolicy = RetryPolicy()
    # How often the router and outbox look for work the CLI or a missed event left.
    poll_interval: float = 5.0
    # Objects stored within this many seconds are routed in one pass.
    route_delay: float = 0.05
    # Failed attempts on one of a viewer's push URLs before the next one is tried.
    failover_after: int = 3


@dataclass(frozen=True)
class PushSettings:
    """``[push]``: what central's push senders present to viewers (paths resolved)."""

    tls_ca: str | None = None  # PEM of the CAs that sign push viewers' TLS certificates
    tls_client_cert: str | None = None  # central's certificate and key (PEM), for mutual TLS
    http_token: str | None = None  # bearer token for http(s):// push viewers
    # Keys a sender plugin declared for itself (medd_register_config) and checks itself.
    plugin_keys: tuple[tuple[str, str], ...] = ()

    def for_senders(self) -> dict[str, str]:
        """The ``settings`` every :class:`~medd.plugins.interfaces.ISender` receives."""
        own = (("tls_ca", self.tls_ca), ("tls_client_cert", self.tls_client_cert), ("http_token", self.http_token))
        return {k: v for k, v in self.plugin_keys + own if v is not None}


@dataclass(frozen=True)
class CentralNodeSettings:
    delivery: DeliverySettings
    push: PushSettings


# (key, field, parse, what it must be, accept); fields of RetryPolicy start "retry."
_DELIVERY = (
    ("retry_base", "retry.base", float, "a number of seconds more than 0", lambda v: v > 0),
    ("retry_multiplier", "retry.multiplier", float, "a number, at least 1", lambda v: v >= 1),
    ("retry_max_delay", "retry.max_delay", float, "a number of seconds more than 0", lambda v: v > 0),
    ("max_attempts", "retry.max_attempts", int, "a whole number, at least 1", lambda v: v >= 1),
    ("poll_interval", "poll_interval", float, "a number of seconds more than 0", lambda v: v > 0),
    ("route_delay", "route_delay", float, "a number of seconds, 0 or more", lambda v: v >= 0),
    ("failover_after", "failover_after", int, "a whole number of attempts, at least 1", lambda v: v >= 1),
)


def central_node_settings(config: Config, *, check_files: bool = True) -> CentralNodeSettings:
    """``[delivery]`` and ``[push]`` of a central node, or :class:`ConfigError` naming every problem."""
    problems: list[ConfigProblem] = []

    def problem(section: str, key: str, message: str) -> None:
        problems.append(ConfigProblem(config.path, section, key, message))

    section = config.section("delivery")
    delivery: dict = {}
    retry: dict = {}
    for key, field, parse, what, accept in _DELIVERY:
        text = section.get(key, "").strip()
        if not text:
            continue
        try:
            value = parse(text)
            if value != value or value in (float("inf"), float("-inf")) or not accept(value):
                raise ValueError(text)
        except ValueError:
            problem("delivery", key, f"must be {what}, not {text!r}")
            continue
        if field.startswith("retry."):
            retry[field[len("retry."):]] = value
        else:
            delivery[field] = value

    section = config.section("push")
    folder = Path(config.path).resolve().parent
    push: dict = {}
    for key in ("tls_ca", "tls_client_cert"):
        text = section.get(key, "").strip()
        if not text:
            continue
        path = Path(text) if Path(text).is_absolute() else folder / text
        if check_files and not path.is_file():
            problem("push", key, f"no such file: {path}")
        push[key] = str(path)
    token = section.get("http_token", "").strip()
    if token:
        push["http_token"] = token
    # Any other key was declared by a sender plugin, or the validation refuses it as unknown.
    push["plugin_keys"] = tuple((k, v.strip()) for k, v in sorted(section.items()) if k not in PUSH_KEYS and v.strip())

    if problems:
        raise ConfigError(problems)
    return CentralNodeSettings(DeliverySettings(retry=RetryPolicy(**retry), **delivery), PushSettings(**push))
