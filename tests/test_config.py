"""Configuration is validated whole at start-up; every error names file, section and key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medd.config import ConfigError, load_config
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
