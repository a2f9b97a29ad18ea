"""`make setup` prerequisites: a wrong Python or a missing Java gives one clear line, before any install."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _setup(env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VENV": str(tmp_path / "venv"), **env_extra}
    return subprocess.run(["bash", "tools/setup.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("python", ["missing", "broken", "3.12"])
def test_wrong_python_is_one_clear_line(python, tmp_path):
    fake = tmp_path / "python"
    if python != "missing":  # a shim that fails, or an interpreter of the wrong version
        fake.write_text("#!/bin/sh\nexit 3\n" if python == "broken" else f"#!/bin/sh\necho {python}\n")
        fake.chmod(0o755)
    proc = _setup({"PYTHON": str(fake)}, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Python 3.11" in lines[0] and "install" in lines[0]
    assert not (tmp_path / "venv").exists()


def test_missing_java_is_one_clear_line(tmp_path):
    proc = _setup({"PYTHON": sys.executable, "JAVA_HOME": str(tmp_path / "no-jdk")}, tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Java" in lines[0] and "install" in lines[0]
    assert not (tmp_path / "venv").exists()
