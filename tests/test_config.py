"""Configuration is validated whole at start-up; every error names file, section and key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medd.config import ConfigError, load_config
from medd.plugins.hookspecs import hookimpl
from medd.plugins.host import load_plugins
from medd.service import check_against_plugins

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "node.ini"
    p.write_text(text)
    return p


def test_example_configs_are_valid():
    """The example configs in etc/ load and pass the plugin checks as shipped (demo.ini before its certificate exists)."""
    config = load_config(ROOT / "etc" / "central.ini")
    check_against_plugins(config, load_plugins(config.disabled_plugins))
    assert config.role == "central" and set(config.listen) == {"dicom", "smtp", "http"}
    demo = load_config(ROOT / "etc" / "demo.ini", check_files=False)
    assert set(demo.listen) == {"dicom", "smtp", "http", "tls"}
    for name in ("viewer.ini", "demo-viewer.ini"):
        viewer = load_config(ROOT / "etc" / name)
        check_against_plugins(viewer, load_plugins(viewer.disabled_plugins))
        assert viewer.role == "viewer" and viewer.section("central")["url"] == "http://127.0.0.1:8080"


def test_every_problem_is_reported_with_file_section_and_key(tmp_path):
    """Several mistakes in one file are all reported, each naming its section and key."""
    path = write(tmp_path, "[node]\nrole = router\n[database]\nurl = not a url\n[listen]\nhttp = tcp:notaport\n"
                           "[limits]\nmax_object_size = huge\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    where = {(p.section, p.key) for p in info.value.problems}
    assert {("node", "role"), ("node", "name"), ("database", "url"), ("storage", "path"),
            ("listen", "http"), ("limits", "max_object_size")} <= where
    assert all(p.file == str(path) for p in info.value.problems)
    assert "[listen] http" in str(info.value)


def test_part_limits_are_read_and_validated(tmp_path):
    """``[limits] max_mime_parts``, ``max_mime_containers`` and ``max_stow_parts`` default to the built-in
    bounds, are read when set, and anything but a positive whole number is a problem naming the key."""
    from medd.config import PartLimits

    base = "[node]\nrole = central\nname = c\n[database]\nurl = sqlite://\n[storage]\npath = s\n"
    assert load_config(write(tmp_path, base)).part_limits == PartLimits(16, 4, 10_000)
    good = write(tmp_path, base + "[limits]\nmax_mime_parts = 8\nmax_mime_containers = 2\nmax_stow_parts = 500\n")
    assert load_config(good).part_limits == PartLimits(8, 2, 500)
    bad = write(tmp_path, base + "[limits]\nmax_mime_parts = 0\nmax_mime_containers = -1\nmax_stow_parts = many\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert {("limits", k) for k in ("max_mime_parts", "max_mime_containers", "max_stow_parts")} <= {
        (p.section, p.key) for p in info.value.problems}


def test_unknown_transport_and_disabled_plugin(tmp_path):
    """A [listen] key with no transport plugin, or with its plugin disabled, is refused before start."""
    path = write(tmp_path, f"[node]\nrole = central\nname = c.test\n[database]\nurl = sqlite://\n"
                           f"[storage]\npath = {tmp_path}/s\n[listen]\nsmtp = tcp:0\npigeon = tcp:0\n"
                           "[plugins]\ndisabled = smtp\n")
    config = load_config(path)
    plugins = load_plugins(config.disabled_plugins)
    assert "smtp" not in plugins.transports
    with pytest.raises(ConfigError) as info:
        check_against_plugins(config, plugins)
    assert {(p.section, p.key) for p in info.value.problems} == {("listen", "smtp"), ("listen", "pigeon")}


def test_twistd_refuses_to_start_on_bad_config(tmp_path):
    """twistd exits non-zero and prints the file, section and key of the problem."""
    path = write(tmp_path, "[node]\nrole = central\n")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "medd", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert f"{path}: [node] name: is required" in proc.stdout + proc.stderr


# --- one validation: `medd check-config` and twistd agree -------------------------------------

BASE = "[node]\nrole = {role}\nname = n.test\n[database]\nurl = sqlite://\n[storage]\npath = {store}\n"
VIEWER = "[central]\nurl = http://127.0.0.1:1\ntoken = t\npoll_interval = 5\n"

# (what is wrong, role, extra config text, the (section, key) it must name)
BAD_CONFIGS = [
    ("tape archive without a path", "central", "[archive]\nbackend = tape\n", ("archive", "path")),
    ("archive of an unknown backend", "central", "[archive]\nbackend = cloud\n", ("archive", "backend")),
    ("retention without an archive", "central", "[retention]\nevict_after_days = 90\n", ("retention", "evict_after_days")),
    ("retry_base not a number", "central", "[delivery]\nretry_base = soon\n", ("delivery", "retry_base")),
    ("max_attempts not whole", "central", "[delivery]\nmax_attempts = 2.5\n", ("delivery", "max_attempts")),
    ("poll_interval zero", "central", "[delivery]\npoll_interval = 0\n", ("delivery", "poll_interval")),
    ("multiplier below 1", "central", "[delivery]\nretry_multiplier = 0.5\n", ("delivery", "retry_multiplier")),
    ("negative route_delay", "central", "[delivery]\nroute_delay = -1\n", ("delivery", "route_delay")),
    ("misspelt delivery key", "central", "[delivery]\nretry_bse = 5\n", ("delivery", "retry_bse")),
    ("push CA file missing", "central", "[push]\ntls_ca = no-such-ca.pem\n", ("push", "tls_ca")),
    ("push client cert missing", "central", "[push]\ntls_client_cert = /no/such.pem\n", ("push", "tls_client_cert")),
    ("unknown section", "central", "[deliveries]\nretry_base = 5\n", ("deliveries", None)),
    ("viewer's section on central", "central", "[central]\nurl = http://x\n", ("central", None)),
    ("central's section on a viewer", "viewer", VIEWER + "[delivery]\nretry_base = 5\n", ("delivery", None)),
    ("viewer without [central] token", "viewer", "[central]\nurl = http://127.0.0.1:1\npoll_interval = 5\n",
     ("central", "token")),
    ("misspelt core key", "central", "[limits]\nmax_object_sise = 1M\n", ("limits", "max_object_sise")),
    ("unknown blob store", "central", "backend = s3\n", ("storage", "backend")),  # BASE ends in [storage]
    ("AE title too long", "central", "[dicom]\nae_title = A_CALLED_AE_TITLE_TOO_LONG\n", ("dicom", "ae_title")),
    ("misspelt dicom key", "central", "[dicom]\nae_tittle = MEDD\n", ("dicom", "ae_tittle")),
    ("PDU size too small", "central", "[dicom]\nmax_pdu_size = 1000\n", ("dicom", "max_pdu_size")),
    ("PDU size not a number", "central", "[dicom]\nmax_pdu_size = 64K\n", ("dicom", "max_pdu_size")),
    ("dicom on a unix socket", "central", "[listen]\ndicom = unix:/tmp/medd-dicom.sock\n", ("listen", "dicom")),
    ("a section for a transport that reads none", "central", "[http]\nport = 8080\n", ("http", None)),
    ("keys in [DEFAULT]", "central", "[DEFAULT]\nretry_base = 5\n", ("DEFAULT", None)),
]


def _bad(tmp_path, role, extra):
    # A node needs no listener to be valid; extra text continues BASE's [storage] until its first header.
    return write(tmp_path, BASE.format(role=role, store=tmp_path / "store") + extra)


def _check_config(path, capsys) -> tuple[int, str]:
    from medd.cli import main

    status = main(["check-config", str(path)])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _twistd(path):
    """What twistd does with ``--config path`` up to the running reactor: parse, validate, build the service."""
    from twisted.internet import reactor

    from medd.tap import Options, makeService

    options = Options()
    options.parseOptions(["--config", str(path)])
    return makeService(options), reactor


@pytest.mark.parametrize("what,role,extra,where", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_check_config_and_twistd_refuse_the_same_configs(tmp_path, capsys, what, role, extra, where):
    """Each bad config is refused by `medd check-config` and by twistd's Options alike, both naming file, section and key."""
    from twisted.python import usage

    path = _bad(tmp_path, role, extra)
    status, out = _check_config(path, capsys)
    section, key = where
    expected = f"{path}: [{section}]" + (f" {key}:" if key else ":")
    assert status != 0 and expected in out, out
    with pytest.raises(usage.UsageError) as info:
        _twistd(path)
    assert expected in str(info.value)


@pytest.mark.parametrize("role,extra", [
    ("central", "[delivery]\nretry_base = 0.5\nretry_multiplier = 1.5\nretry_max_delay = 60\nmax_attempts = 3\n"
                "poll_interval = 1\nroute_delay = 0\n[push]\nhttp_token = s3cret\n[dicom]\nae_title = CENTRAL\n"
                "[archive]\nbackend =\n[plugins]\ndisabled =\n[limits]\nmax_object_size = 1G\n"),
    ("viewer", VIEWER),
])
def test_a_config_check_config_accepts_starts_under_twistd(tmp_path, capsys, role, extra):
    """A config `medd check-config` accepts is built into a node by twistd, and [delivery]/[push] are parsed once into it."""
    path = _bad(tmp_path, role, extra)
    status, out = _check_config(path, capsys)
    assert status == 0, out
    service, _ = _twistd(path)
    node = service.node
    if role == "central":
        assert node.routing.poll_interval == 1.0 and node.routing.route_delay == 0.0
        assert node.routing.outbox.policy.delay(3) == 0.5 * 1.5**2
        assert node.routing.outbox.policy.max_attempts == 3
        assert node.routing.outbox.settings == {"http_token": "s3cret"}


def test_all_problems_are_reported_together(tmp_path, capsys):
    """Core, role and plugin problems in one file come out in one report: the operator fixes them in one pass."""
    path = write(tmp_path, "[node]\nrole = central\n[database]\nurl = sqlite://\n"
                           "[delivery]\nretry_base = soon\nretry_bse = 1\n[dicom]\nae_title = ÄÖÜ\n"
                           "[archive]\nbackend = tape\n")
    status, out = _check_config(path, capsys)
    assert status == 2
    for where in ("[node] name:", "[storage] path:", "[delivery] retry_base:", "[delivery] retry_bse:",
                  "[dicom] ae_title:", "[archive] path:"):
        assert f"{path}: {where}" in out, out
    assert "did you mean retry_base?" in out


def test_push_paths_are_relative_to_the_config_file(tmp_path):
    """[push] tls_ca, like every path in the config, is taken from the config file's folder, and handed to senders resolved."""
    from medd.validation import validate_file

    (tmp_path / "ca.pem").write_text("not checked here")
    path = write(tmp_path, BASE.format(role="central", store=tmp_path / "store") + "[push]\ntls_ca = ca.pem\n")
    settings = validate_file(path)
    assert settings.central.push.for_senders() == {"tls_ca": str(tmp_path / "ca.pem")}


class PigeonSettings:
    """A third-party plugin that owns [pigeon] and checks it, as the built-ins own theirs."""

    def __init__(self):
        self.checked = []

    @hookimpl
    def medd_register_config(self, register):
        register("pigeon", ["loft", "flock_size"], self.check)

    def check(self, section):
        self.checked.append(dict(section.values))
        size = section.get("flock_size", "1")
        if not size.isdigit():
            section.problem("flock_size", f"not a number of pigeons: {size!r}")


def test_a_plugin_validates_its_own_section(tmp_path):
    """A plugin declares its section's keys and checks their values through medd_register_config; without it the section is unknown."""
    from medd.validation import validate

    path = write(tmp_path, BASE.format(role="central", store=tmp_path / "store")
                 + "[pigeon]\nloft = roof\nflock_size = many\nwingspan = 1m\n")
    config = load_config(path)
    plugin = PigeonSettings()
    with pytest.raises(ConfigError) as info:
        validate(config, load_plugins(extra=[plugin]))
    assert {(p.section, p.key) for p in info.value.problems} == {("pigeon", "flock_size"), ("pigeon", "wingspan")}
    assert plugin.checked == [{"loft": "roof", "flock_size": "many", "wingspan": "1m"}]
    assert f"{path}: [pigeon] flock_size: not a number of pigeons: 'many'" in str(info.value)

    with pytest.raises(ConfigError) as info:
        validate(config, load_plugins())
    assert [(p.section, p.key, p.message) for p in info.value.problems] == [("pigeon", None, "unknown section")]


def test_a_plugin_check_that_raises_is_reported_not_fatal(tmp_path):
    """A plugin whose check crashes is reported against its section, beside every other problem, not as a traceback."""
    from medd.validation import validate

    class Broken:
        @hookimpl
        def medd_register_config(self, register):
            register("dicom", [], lambda section: 1 / 0)

    path = write(tmp_path, BASE.format(role="central", store=tmp_path / "store") + "[delivery]\nretry_base = x\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config(path), load_plugins(extra=[Broken()]))
    assert {(p.section, p.key) for p in info.value.problems} == {("dicom", None), ("delivery", "retry_base")}
    assert "ZeroDivisionError" in str(info.value)


def test_shipped_configs_pass_check_config(capsys):
    """etc/central.ini, the viewers' and the gateway's configs, which document every key, pass
    `medd check-config` as shipped."""
    for name in ("central.ini", "viewer.ini", "demo-viewer.ini", "gateway.ini"):
        status, out = _check_config(ROOT / "etc" / name, capsys)
        assert status == 0, out


def test_a_sender_plugin_declares_and_receives_its_own_push_key(tmp_path):
    """A push sender plugin's own [push] key is accepted once it declares it, and reaches every sender with the rest."""
    from medd.validation import validate

    class CarrierSettings:
        @hookimpl
        def medd_register_config(self, register):
            register("push", ["carrier_pigeon"])

    path = write(tmp_path, BASE.format(role="central", store=tmp_path / "store")
                 + "[push]\nhttp_token = t\ncarrier_pigeon = yes\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config(path), load_plugins())
    assert [(p.section, p.key) for p in info.value.problems] == [("push", "carrier_pigeon")]
    settings = validate(load_config(path), load_plugins(extra=[CarrierSettings()]))
    assert settings.central.push.for_senders() == {"http_token": "t", "carrier_pigeon": "yes"}


def test_gateway_section_problems_are_all_reported(tmp_path):
    """A gateway without its centre's address, with a tls:// central but no client certificate, an AE title
    too long and an unreadable max_spool gets every problem named by key; [gateway] on a central is refused."""
    from medd.validation import validate

    path = write(tmp_path, "[node]\nrole = gateway\nname = gw\n[database]\nurl = sqlite://\n[storage]\n"
                           f"path = {tmp_path}\n[gateway]\ncentral = tls://central.test:4443\n"
                           "accept_ae = CT1 A_TITLE_FAR_TOO_LONG\nmax_spool = lots\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        validate(config, load_plugins(()))
    assert sorted(p.key for p in info.value.problems) == ["accept_ae", "address", "client_cert", "max_spool"]
    path = write(tmp_path, "[node]\nrole = central\nname = c\n[database]\nurl = sqlite://\n[storage]\n"
                           f"path = {tmp_path}\n[gateway]\naddress = a@b\n")
    with pytest.raises(ConfigError) as info:
        validate(load_config(path), load_plugins(()))
    assert [(p.section, p.message) for p in info.value.problems] == [
        ("gateway", "is read only by a gateway node; this is a central node")]


def test_blob_sweep_interval_and_grace(tmp_path):
    """[storage] sweep_interval and sweep_grace default to an hour each, take seconds, and refuse
    what is not a positive number, each problem naming its key."""
    base = f"[node]\nrole = central\nname = c.test\n[database]\nurl = sqlite://\n[storage]\npath = {tmp_path}/s\n"
    config = load_config(write(tmp_path, base))
    assert (config.sweep_interval, config.sweep_grace) == (3600.0, 3600.0)
    config = load_config(write(tmp_path, base + "sweep_interval = 2\nsweep_grace = 0.5\n"))
    assert (config.sweep_interval, config.sweep_grace) == (2.0, 0.5)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, base + "sweep_interval = 0\nsweep_grace = soon\n"))
    assert {(p.section, p.key) for p in info.value.problems} == {("storage", "sweep_interval"),
                                                                 ("storage", "sweep_grace")}
