"""Clean exits: a signal ends a flow run in seconds with 128 + signal, the run is marked, nothing outlives it.

The first tests run a real script (a Prefect flow whose task sleeps 300 s) under ``run_with_clean_exit`` with
Prefect's temporary local server in a private PREFECT_HOME, signal it once the task runs, and read the flow
run's final state from that server's SQLite database afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prefect.exceptions import TerminationSignal

from flows import lifecycle
from flows.lifecycle import run_with_clean_exit

REPO = Path(__file__).resolve().parents[2]
EXIT_SECONDS = 20  # from the signal to the script's exit
GONE_SECONDS = 15  # from the script's exit to its last descendant's

SCRIPT = textwrap.dedent(
    """
    import sys
    import time

    sys.path.insert(0, {repo!r})

    from prefect import flow, task
    from prefect.runtime import flow_run

    from flows.lifecycle import run_with_clean_exit


    @task
    def sleeper(mode: str) -> None:
        print("TASK-RUNNING", flush=True)
        if mode == "fail":
            raise RuntimeError("boom")
        time.sleep(300)


    @flow
    def sleepy(mode: str) -> None:
        print(f"FLOW-RUN-ID {{flow_run.get_id()}}", flush=True)
        sleeper(mode)


    sys.exit(run_with_clean_exit(sleepy, sys.argv[1]))
    """
)

STUBBORN = textwrap.dedent(
    """
    import sys
    import time

    sys.path.insert(0, {repo!r})

    from flows.lifecycle import run_with_clean_exit


    def stubborn() -> None:  # ignores the first signal
        try:
            print("READY", flush=True)
            time.sleep(300)
        except KeyboardInterrupt:
            time.sleep(300)


    sys.exit(run_with_clean_exit(stubborn, grace_s=3))
    """
)


class Script:
    """A Python script in its own session (as a shell starts a job) with its output collected."""

    def __init__(self, source: str, args: list[str], tmp_path: Path, env: dict[str, str]) -> None:
        path = tmp_path / "script.py"
        path.write_text(source.format(repo=str(REPO)))
        self.lines: list[str] = []
        self._marks: dict[str, threading.Event] = {}
        self.process = subprocess.Popen(
            [sys.executable, str(path), *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            for mark, event in list(self._marks.items()):
                if mark in line:
                    event.set()

    def wait_for(self, mark: str, timeout: float) -> None:
        event = self._marks.setdefault(mark, threading.Event())
        if any(mark in line for line in self.lines):
            return
        if not event.wait(timeout):
            pytest.fail(f"no {mark!r} in {timeout:g} s:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def signal_and_wait(self, signum: int, *, group: bool = False) -> float:
        """Send ``signum`` (to the whole process group, as a terminal's Ctrl-C does, if ``group``)."""
        started = time.monotonic()
        if group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_SECONDS} s after {signal.Signals(signum).name}:\n{self.output}")
        return time.monotonic() - started


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture
def prefect_env(tmp_path: Path) -> dict[str, str]:
    """No PREFECT_API_URL (so the temporary server), a PREFECT_HOME of its own, no other Prefect settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def _flow_run_state(script: Script, env: dict[str, str]) -> str:
    run_id = next(line.split()[1] for line in script.lines if line.startswith("FLOW-RUN-ID"))
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        row = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (run_id,)).fetchone()
    return row[0] if row else "missing"


@pytest.mark.parametrize(
    ("signum", "group", "code"),
    [
        pytest.param(signal.SIGTERM, False, 143, id="sigterm"),
        pytest.param(signal.SIGINT, True, 130, id="ctrl-c"),  # the whole group, as a terminal sends it
        pytest.param(signal.SIGKILL, False, -signal.SIGKILL, id="sigkill"),
    ],
)
def test_a_signal_ends_the_run_in_seconds_and_leaves_no_process(
    tmp_path: Path, prefect_env: dict[str, str], signum: int, group: bool, code: int
) -> None:
    script = Script(SCRIPT, ["sleep"], tmp_path, prefect_env)
    descendants: list[psutil.Process] = []
    try:
        script.wait_for("TASK-RUNNING", timeout=180)
        descendants = script.descendants()
        assert descendants, "the temporary Prefect server should be a child of the script"
        seconds = script.signal_and_wait(signum, group=group)
        print(f"{signal.Signals(signum).name}: exit {script.process.returncode} after {seconds:.1f} s")
        assert script.process.returncode == code, script.output
        _, alive = psutil.wait_procs(descendants, timeout=GONE_SECONDS)  # SIGKILL: PDEATHSIG stops the server
        assert not alive, f"outlived the script: {[p.cmdline() for p in alive]}"
        state = _flow_run_state(script, prefect_env)
        print(f"flow run state: {state}")
        if signum != signal.SIGKILL:  # a killed process reports nothing: the run stays RUNNING
            assert state == "CRASHED", script.output
            assert f"distill: stopped by {signal.Signals(signum).name} (exit {code})" in script.output
    finally:
        _kill([script.process, *descendants] if script.process.poll() is None else descendants)


def test_a_failed_flow_exits_1_and_stops_the_server(tmp_path: Path, prefect_env: dict[str, str]) -> None:
    script = Script(SCRIPT, ["fail"], tmp_path, prefect_env)
    descendants: list[psutil.Process] = []
    try:
        script.wait_for("TASK-RUNNING", timeout=180)
        descendants = script.descendants()
        assert script.process.wait(timeout=60) == 1, script.output
        assert "distill: the flow failed: RuntimeError: boom" in script.output
        _, alive = psutil.wait_procs(descendants, timeout=GONE_SECONDS)
        assert not alive, f"outlived the script: {[p.cmdline() for p in alive]}"
        assert _flow_run_state(script, prefect_env) == "FAILED"
    finally:
        _kill([script.process, *descendants] if script.process.poll() is None else descendants)


@pytest.mark.parametrize(
    ("signals", "message"),
    [
        (2, "distill: second signal (SIGINT): exiting now (exit 130)"),
        (1, "distill: still running 3 s after the signal: exiting now (exit 130)"),
    ],
    ids=["second-signal", "deadline"],
)
def test_a_stuck_wind_down_is_cut_short(
    tmp_path: Path, prefect_env: dict[str, str], signals: int, message: str
) -> None:
    env = {**prefect_env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # no server: nothing to wait for
    script = Script(STUBBORN, [], tmp_path, env)
    try:
        script.wait_for("READY", timeout=60)
        for _ in range(signals - 1):
            os.kill(script.process.pid, signal.SIGINT)
            time.sleep(0.3)
        seconds = script.signal_and_wait(signal.SIGINT)
        assert script.process.returncode == 130, script.output
        assert message in script.output
        assert seconds < 10
    finally:
        _kill([script.process] if script.process.poll() is None else [])


# In-process: the exit codes and the handlers, without a server.


@pytest.fixture
def no_server(monkeypatch) -> Iterator[list[str]]:
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    armed: list[str] = []
    monkeypatch.setattr(lifecycle, "start_linked_server", lambda: None)

    def arm_deadline(self) -> None:  # the deadline would os._exit the test process: recorded, once like it
        if "armed" not in armed:
            armed.append("armed")

    monkeypatch.setattr(lifecycle._ExitGuard, "arm_deadline", arm_deadline)
    # A forced exit would os._exit too: recorded; the tests expect none.
    monkeypatch.setattr(lifecycle._ExitGuard, "force_exit", lambda self, why: armed.append(f"forced: {why}"))
    yield armed
    assert not [call for call in armed if call.startswith("forced")]
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def test_exit_codes(no_server: list[str], capsys) -> None:
    before_term = signal.getsignal(signal.SIGTERM)

    def fail() -> None:
        raise ValueError("bad value")

    def interrupted() -> None:
        raise KeyboardInterrupt

    def terminated() -> None:
        raise TerminationSignal(signal=signal.SIGTERM)

    assert run_with_clean_exit(lambda: None) == 0
    assert run_with_clean_exit(fail) == 1
    assert "distill: the flow failed: ValueError: bad value" in capsys.readouterr().err
    assert run_with_clean_exit(interrupted) == 130
    assert run_with_clean_exit(terminated) == 143
    assert no_server == [], "no signal was received, so no deadline"
    assert signal.getsignal(signal.SIGTERM) == before_term, "and the previous handlers are back"


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)], ids=str
)
def test_a_real_signal_becomes_the_exit_code(no_server: list[str], capsys, signum: int, code: int) -> None:
    reached: list[str] = []

    def run() -> None:
        os.kill(os.getpid(), signum)
        time.sleep(10)
        reached.append("after the sleep")

    started = time.monotonic()
    assert run_with_clean_exit(run) == code
    assert no_server == ["armed"]
    assert time.monotonic() - started < 5
    assert not reached
    assert "armed" in no_server, "a signal arms the deadline"
    assert f"stopped by {signal.Signals(signum).name} (exit {code})" in capsys.readouterr().err
    assert signal.getsignal(signum) != signal.SIG_DFL, "a second signal still forces the exit"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=str)
def test_prefects_resent_signal_is_not_a_second_signal(no_server: list[str], signum: int, code: int) -> None:
    """A flow run turns the signal into TerminationSignal, marks the run, then re-sends it to our handler."""
    from prefect.utilities.engine import capture_sigterm

    def run() -> None:
        with capture_sigterm():  # what the flow engine wraps around a flow run
            os.kill(os.getpid(), signum)
            time.sleep(10)

    assert run_with_clean_exit(run) == code
    assert no_server == ["armed"]
