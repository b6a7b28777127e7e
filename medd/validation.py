"""The one validation of a node's configuration, run whole before it starts.

``medd check-config`` and twistd (``medd.tap.Options.postOptions``) both call
:func:`validate_file`; a node assembled from an already loaded config
(:func:`medd.service.make_node`) goes through :func:`validate`. The core
sections, the role's sections and every plugin's section are checked, unknown
sections and keys included, and every problem is reported at once with its
file, section and key.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from medd.audit import AUDIT_KEYS, audit_settings
from medd.config import CORE_KEYS, ROLES, Config, ConfigError, ConfigProblem, read_config
from medd.mail.settings import MAIL_KEYS, MAILBOX_KEYS, MailNodeSettings, mail_settings
from medd.plugins.host import Plugins, load_plugins
from medd.plugins.settings import SectionCheck

AVAILABLE_ROLES = ("central", "viewer", "gateway")

# Read by medd/central/archiving.py (archive_settings) on a node of any role;
# [archive] path and any other backend key are declared by the backend plugin.
ARCHIVE_KEYS = ("backend", "volume_size", "batch_bytes", "interval", "batch_objects", "min_age", "centres", "modalities")
RETENTION_KEYS = ("evict_after_days",)
# A viewer's [central], read by medd/viewer/settings.py (central_settings).
VIEWER_CENTRAL_KEYS = ("url", "token", "poll_interval", "retry_base", "retry_max_delay", "timeout", "address",
                       "push_token", "ca", "client_cert", "allow_http", "packages")
# A viewer's [reading_room], read by medd/viewer/settings.py (reading_room_settings).
VIEWER_READING_ROOM_KEYS = ("ohif", "complete_after", "being_read_for", "idle_lock", "templates")


def _role_keys() -> dict[str, dict[str, tuple[str, ...]]]:
    from medd.central.settings import DELIVERY_KEYS, PUSH_KEYS
    from medd.gateway.settings import GATEWAY_KEYS

    return {
        "central": {"delivery": DELIVERY_KEYS, "push": PUSH_KEYS},
        "viewer": {"central": VIEWER_CENTRAL_KEYS, "reading_room": VIEWER_READING_ROOM_KEYS},
        "gateway": {"gateway": GATEWAY_KEYS},
    }


@dataclass(frozen=True)
class NodeSettings:
    """A configuration that passed the whole validation, and what was parsed from it once."""

    config: Config
    plugins: Plugins
    #: ``[delivery]`` and ``[push]`` (:class:`medd.central.settings.CentralNodeSettings`) on a central node.
    central: object | None = None
    #: ``[gateway]`` (:class:`medd.gateway.settings.GatewaySettings`) on a gateway node.
    gateway: object | None = None
    #: ``[audit]`` (:class:`medd.audit.AuditSettings`), on every node.
    audit: object | None = None
    #: ``[mail]`` and ``[mailbox]``, on every node.
    mail: MailNodeSettings = MailNodeSettings()


def validate_file(path: str | os.PathLike, *, extra_plugins: Iterable[object] = (),
                  check_files: bool = True) -> NodeSettings:
    """Read ``path``, load the plugins it allows and validate everything; :class:`ConfigError` lists every problem."""
    config, problems = read_config(path, check_files=check_files)
    plugins = load_plugins(config.disabled_plugins, extra=extra_plugins)
    settings, more = _check(config, plugins, check_files)
    problems = problems + more
    if problems:
        raise ConfigError(problems)
    return settings


def validate(config: Config, plugins: Plugins, *, check_files: bool = True) -> NodeSettings:
    """The validation that needs the plugins, for a config whose core sections already passed."""
    settings, problems = _check(config, plugins, check_files)
    if problems:
        raise ConfigError(problems)
    return settings


def _check(config: Config, plugins: Plugins, check_files: bool) -> tuple[NodeSettings, list[ConfigProblem]]:
    problems: list[ConfigProblem] = []

    def problem(section: str, key: str | None, message: str) -> None:
        problems.append(ConfigProblem(config.path, section, key, message))

    def collect(parse):
        try:
            return parse()
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    role = config.role
    if role in ROLES and role not in AVAILABLE_ROLES:
        problem("node", "role", f"the {role} role is not available in this version")

    # Which keys each section may hold: the core's, the role's, the plugins'.
    role_keys = _role_keys()
    known: dict[str, set[str]] = {s: set(keys) for s, keys in CORE_KEYS.items()}
    known["archive"] = set(ARCHIVE_KEYS)
    known["retention"] = set(RETENTION_KEYS)
    known["audit"] = set(AUDIT_KEYS)
    known["mail"] = set(MAIL_KEYS)
    known["mailbox"] = set(MAILBOX_KEYS)
    for sections in ([role_keys[role]] if role in role_keys else list(role_keys.values())):
        for section, keys in sections.items():
            known.setdefault(section, set()).update(keys)
    for section, keys in plugins.config_keys.items():
        known.setdefault(section, set()).update(keys)
    other_role = {s: r for r, sections in role_keys.items() if r != role for s in sections}

    for section, values in config.sections.items():
        if section == "listen":
            for key in values:
                if values[key].strip() and key not in plugins.transports:
                    loaded = ", ".join(sorted(plugins.transports)) or "none"
                    problem("listen", key, f"no transport plugin named {key!r} is loaded (loaded: {loaded})")
            continue
        if section not in known:
            if section in other_role:
                problem(section, None, f"is read only by a {other_role[section]} node; this is a {role} node")
            else:
                problem(section, None, "unknown section" + _did_you_mean(section, known))
            continue
        for key in values:
            if key not in known[section]:
                problem(section, key, "unknown key" + _did_you_mean(key, known[section]))

    backend = config.section("storage").get("backend", "file").strip() or "file"
    if ("blobstore", backend) not in plugins.storage:
        problem("storage", "backend", f"no blob store plugin named {backend!r}")
    from medd.central.archiving import archive_settings

    archive = collect(lambda: archive_settings(config))
    if archive is not None and ("archive", archive.backend) not in plugins.storage:
        problem("archive", "backend", f"no archive plugin named {archive.backend!r}")

    audit = collect(lambda: audit_settings(config, check_files=check_files))
    mail = collect(lambda: mail_settings(config, check_files=check_files)) or MailNodeSettings()
    central = gateway = None
    if role == "central":
        from medd.central.settings import central_node_settings

        central = collect(lambda: central_node_settings(config, check_files=check_files))
    elif role == "viewer":
        from medd.viewer.settings import central_settings, reading_room_settings

        viewer_central = collect(lambda: central_settings(config, check_files=check_files))
        if viewer_central is not None and viewer_central.packages and not (mail.mail and mail.mail.smarthost):
            problem("central", "packages", "a mailto: address needs [mail] smarthost (the server this node sends through)")
        collect(lambda: reading_room_settings(config, check_files=check_files))
    elif role == "gateway":
        from medd.gateway.settings import gateway_settings

        gateway = collect(lambda: gateway_settings(config, check_files=check_files))
        if gateway is not None and gateway.central.startswith("mailto:") and not (mail.mail and mail.mail.smarthost):
            problem("gateway", "central", "a mailto: central needs [mail] smarthost (the server this node sends through)")

    folder = Path(config.path).resolve().parent
    for section, check, source in plugins.config_checks:
        view = SectionCheck(section, config.section(section), folder, problem, check_files=check_files)
        try:
            check(view)
        except Exception as e:  # a plugin's bug must not hide the other problems
            problem(section, None, f"the check of {source} failed: {type(e).__name__}: {e}")
    return NodeSettings(config, plugins, central, gateway, audit, mail), problems


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
