"""The CI guard (tests/require_all.py) and the provisioning skips: a skip CI should not see fails the run,
naming the test and its reason; a missing server cache or Airflow venv names the make target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, airflow_missing, servers_missing
from tests.require_all import ENV

TINY = """
import pytest

def test_runs():
    pass

def test_needs_a_frobnicator():
    pytest.skip("no frobnicator: run `make frob`")

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("no CUDA device")
"""


def _pytest(tmp_path: Path, *args: str, require: bool) -> subprocess.CompletedProcess[str]:
    """pytest on the tiny file alone (its own rootdir and empty ini), with only the guard plugin loaded."""
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = gpu: a GPU test\n")
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"PYTHONPATH": str(REPO)}
    if require:
        env[ENV] = "1"
    argv = [sys.executable, "-m", "pytest", "-p", "tests.require_all", "-p", "no:cacheprovider", "-rs", *args]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_required_session_with_a_skip_fails_naming_the_test_and_its_reason(tmp_path):
    proc = _pytest(tmp_path, require=True)
    assert proc.returncode == 1, proc.stdout
    listed = proc.stdout[proc.stdout.index(f"{ENV}=1: 1 test(s) skipped") :]
    assert "SKIPPED test_tiny.py::test_needs_a_frobnicator: no frobnicator: run `make frob`" in listed
    assert "test_on_a_gpu" not in listed  # gpu tests may skip: CI has no GPU


def test_skips_pass_without_the_variable_and_gpu_skips_pass_with_it(tmp_path):
    assert _pytest(tmp_path, require=False).returncode == 0
    only_gpu = _pytest(tmp_path, "-k", "not frobnicator", require=True)
    assert only_gpu.returncode == 0 and "skipped that must run" not in only_gpu.stdout, only_gpu.stdout


def test_missing_provisioning_names_the_make_target(tmp_path):
    servers = servers_missing(tmp_path)
    assert servers is not None and "run `make setup`" in servers and "seaweedfs" in servers
    airflow = airflow_missing(tmp_path / "no-venv")
    assert airflow is not None and "`make airflow-setup`" in airflow
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "airflow").touch()
    assert airflow_missing(tmp_path / "venv") is None
