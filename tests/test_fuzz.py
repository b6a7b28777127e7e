"""The fuzz targets in fuzz/: a short coverage-guided run of each, and every
crash they ever found replayed as a regression case (fuzz/README.md)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.run import TARGETS

REPO = Path(__file__).resolve().parent.parent
REGRESSIONS = REPO / "fuzz" / "regressions"
# Each target's share of the suite; a long run is `python -m fuzz.run TARGET` (fuzz/README.md).
SECONDS = int(os.environ.get("MEDD_FUZZ_SECONDS", "20"))


@pytest.mark.timeout(SECONDS + 90)
@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_nothing(target, tmp_path):
    """libFuzzer runs the target for SECONDS from its seeds, each input within
    10 s and the process within 1 GB: any other exception than the target's
    refusal, a broken invariant, a slow input or a memory blow-up fails it."""
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    artifacts.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run(
        # A fixed seed: the suite explores the same inputs on every run (long random runs: fuzz/README.md).
        [sys.executable, "-m", "fuzz.run", target, f"-max_total_time={SECONDS}", "-seed=1", "-print_final_stats=1",
         f"-artifact_prefix={artifacts}/", str(corpus)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=SECONDS + 80,
    )
    output = run.stdout.decode("utf-8", "replace")
    found = sorted(p.name for p in artifacts.iterdir())
    assert run.returncode == 0 and not found, (
        f"fuzz target {target} failed (rc {run.returncode}); inputs kept in {artifacts}: {found}\n{output[-6000:]}")
    assert "Done " in output and "stat::number_of_executed_units" in output
    executed = int(output.split("stat::number_of_executed_units:")[1].split()[0])
    assert executed > len(list(corpus.iterdir())), "the run executed the seeds and then fuzzed"


def _cases():
    for target in TARGETS:
        folder = REGRESSIONS / target
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            yield pytest.param(target, path, id=f"{target}/{path.name}")


@pytest.mark.parametrize("target, path", list(_cases()))
def test_regression_case(target, path):
    """An input that once broke a target's invariant now holds it."""
    module = importlib.import_module(f"fuzz.target_{target}")
    module.check(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_hold_the_invariant(target):
    """Every seed holds its target's invariant (a seed that broke it would hide the fuzzer's findings)."""
    module = importlib.import_module(f"fuzz.target_{target}")
    for data in module.seed_inputs().values():
        module.check(data)
