"""A test run stopped by SIGTERM still tears its fixtures down (tests/stop_on_sigterm.py), as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

INNER_TEST = """
import time
from pathlib import Path

import pytest

MARKS = Path(__file__).with_name("marks.txt")


@pytest.fixture(scope="{scope}")
def server():
    MARKS.write_text("started\\n")
    yield
    with MARKS.open("a") as marks:
        marks.write("stopped\\n")


def test_long(server):
    time.sleep(120)
"""


@pytest.mark.parametrize("scope", ["function", "module", "session"])
def test_sigterm_runs_the_fixture_teardown(tmp_path: Path, scope: str) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(scope=scope))
    marks = tmp_path / "marks.txt"
    command = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(tmp_path)]
    command += ["-p", "tests.stop_on_sigterm", "-p", "no:cacheprovider", "-q", "test_inner.py"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    inner = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not marks.exists() and inner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marks.exists(), "the inner test run never set its fixture up"
        inner.send_signal(signal.SIGTERM)
        output, _ = inner.communicate(timeout=30)
    finally:
        inner.kill()
    assert marks.read_text().splitlines() == ["started", "stopped"], output.decode()
    assert inner.returncode == pytest.ExitCode.INTERRUPTED, output.decode()
