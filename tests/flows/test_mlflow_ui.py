"""What a person sees in the MLflow UI, checked in headless Chromium: one tiny flow run through the CLI
against a real ``mlflow server``, then ``scripts/check_mlflow_ui.py`` (runs table with the trade-off
columns, the child runs compared, the parent's trade-off plot, the registered model's champion alias)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from tests.flows.cli_process import start_cli

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_mlflow_ui.py"
MLFLOW = Path(sys.executable).parent / "mlflow"
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = ["runs-table.png", "compare.png", "parent-plots.png", "registered-model.png"]


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (.venv/bin/pip install -e '.[screenshots]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started in a session of its own, with its children (its process group, by pid)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a parent that exited first
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def mlflow_server(tmp_path: Path):
    """A real MLflow tracking server on a free port, its SQLite store and artifacts under tmp_path."""
    root = tmp_path / "mlflow"
    (root / "artifacts").mkdir(parents=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 90 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_flow_run_in_the_mlflow_ui(mlflow_server, tiny_model_dir, data_dir, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, data_dir, tmp_path)
    config["tracking"]["tracking_uri"] = mlflow_server
    config["selection"] = {"min_retention_pct": 1.0, "min_agreement": None}  # random tiny models: a champion
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    flow_log = tmp_path / "flow.log"
    flow = start_cli(config_file, tmp_path / "prefect", flow_log, start_new_session=True)
    try:
        code = flow.wait(timeout=900)
    finally:
        _stop_group(flow)
    assert code == 0, flow_log.read_text()[-8000:]

    out = tmp_path / "screenshots"
    args = ["--tracking-uri", mlflow_server, "--experiment", "test", "--out", str(out)]
    check = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = f"stdout:\n{check.stdout}\nstderr:\n{check.stderr[-6000:]}"
    assert check.returncode == 0, report
    for name in SCREENSHOTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing\n{report}"


def test_missing_chromium_exits_2_with_the_install_commands(monkeypatch, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("check_mlflow_ui", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CHROMIUM", str(tmp_path / "no-chromium"))
    argv = ["--tracking-uri", "http://127.0.0.1:9", "--experiment", "x", "--out", str(tmp_path / "out")]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert "apt-get install chromium" in err and "pip install -e '.[screenshots]'" in err
    assert not (tmp_path / "out").exists()
