"""A pytest plugin for CI: with DLPIPE_REQUIRE_ALL=1 a skipped test fails the session, listed with its reason.

CI provisions everything the suite needs (the storage servers, the Airflow venv, unshare, ...), so a skip
there means a test silently stopped running. Only tests marked `gpu` may skip: CI machines have no GPU.
tests/conftest.py imports these hooks; `pytest -p tests.require_all` loads them alone (its own test does).
"""

from __future__ import annotations

import os

import pytest

ENV = "DLPIPE_REQUIRE_ALL"
ALLOWED_MARK = "gpu"
_SEEN: list[tuple[str, str]] = []  # (test id, reason) of each skip this session; test reports carry no config


def required(config: pytest.Config) -> bool:
    """Whether this session must run every test it collected (but gpu ones)."""
    return os.environ.get(ENV, "") == "1"


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_configure(config: pytest.Config) -> None:
    _SEEN.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note every skip (in setup, as a fixture skips, or in the call) of a test not marked gpu."""
    if report.skipped and not hasattr(report, "wasxfail") and ALLOWED_MARK not in report.keywords:
        _SEEN.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session (exit status 1) when a required test was skipped."""
    if required(session.config) and _SEEN and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Name each skipped test and its reason, and why that fails the run."""
    if not (required(config) and _SEEN):
        return
    terminalreporter.section(f"{ENV}=1: {len(_SEEN)} test(s) skipped that must run", sep="=", red=True)
    for nodeid, reason in _SEEN:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)
    terminalreporter.line(
        f"{ENV}=1 (CI) allows skips only for tests marked {ALLOWED_MARK}: provision what the reasons name, "
        "or unset it to allow skips"
    )
