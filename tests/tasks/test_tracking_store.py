"""The MLflow store: checked within seconds, retries bounded, the experiment set up safely by concurrent
runs."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient

from tasks import tracking_store
from tasks.tracking_store import (
    TrackingStoreError,
    check_tracking_store,
    setup_experiment,
    with_retries,
)
from tests.tasks.mlflow_helpers import (
    mlflow_config,
    unused_port,
)

REPO = Path(__file__).resolve().parents[2]


class _Server:
    """A real HTTP server in a thread; ``routes`` maps a path to (status, body)."""

    def __init__(self, routes: dict[str, tuple[int, str]]) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.paths.append(self.path)
                status, body = routes.get(self.path.split("?")[0], (404, "not found"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MLFLOW_ROUTES = {
    "/health": (200, "OK"),
    "/api/2.0/mlflow/experiments/search": (200, json.dumps({"experiments": []})),
}


def test_unused_port_fails_within_seconds() -> None:
    uri = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingStoreError) as info:
        check_tracking_store(uri)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert uri in message and "not reachable" in message and "MLFLOW_TRACKING_URI" in message


def test_password_is_not_shown() -> None:
    uri = f"http://distill:s3cret@127.0.0.1:{unused_port()}"
    with pytest.raises(TrackingStoreError) as info:
        check_tracking_store(uri)
    assert "s3cret" not in str(info.value) and "distill:***@127.0.0.1" in str(info.value)


def test_mlflow_like_server_passes() -> None:
    with _Server(MLFLOW_ROUTES) as server:
        check_tracking_store(server.uri)
        check_tracking_store(server.uri + "/")
    assert server.paths[0] == "/health" and server.paths[1].startswith("/api/2.0/mlflow/experiments/search")


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"/health": (200, "OK")}, "does not serve the MLflow REST API"),
        ({"/api/2.0/mlflow/experiments/search": (200, "<html>")}, "non-JSON"),
        ({**MLFLOW_ROUTES, "/api/2.0/mlflow/experiments/search": (401, "")}, "MLFLOW_TRACKING_USERNAME"),
        ({**MLFLOW_ROUTES, "/api/2.0/mlflow/experiments/search": (503, "")}, "HTTP 503"),
    ],
    ids=["not-mlflow", "html", "auth", "db-down"],
)
def test_server_that_is_not_a_usable_mlflow_is_named(routes, expected: str) -> None:
    with _Server(routes) as server, pytest.raises(TrackingStoreError, match=expected) as info:
        check_tracking_store(server.uri)
    assert server.uri in str(info.value)


def test_sqlite_store_in_a_writable_folder_passes(tmp_path: Path) -> None:
    check_tracking_store(f"sqlite:///{tmp_path.as_posix()}/not/yet/there/mlflow.db")
    check_tracking_store(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")
    assert list(tmp_path.iterdir()) == []  # a check creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_sqlite_store_in_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        uri = f"sqlite:///{folder.as_posix()}/mlflow.db"
        with pytest.raises(TrackingStoreError, match="cannot write in") as info:
            check_tracking_store(uri)
        assert uri in str(info.value)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_sqlite_store_where_no_folder_can_be_is_refused(tmp_path: Path, where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        uri = f"sqlite:///{tmp_path.as_posix()}/file/sub/mlflow.db"
    else:  # read-only even for root
        uri = "sqlite:////proc/distill-test/mlflow.db"
    with pytest.raises(TrackingStoreError) as info:
        check_tracking_store(uri)
    assert uri in str(info.value) and "tracking.tracking_uri" in str(info.value)


def test_sqlite_uri_on_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").write_text("hello, not a database")
    with pytest.raises(TrackingStoreError, match="not a SQLite database"):
        check_tracking_store(f"sqlite:///{tmp_path.as_posix()}/mlflow.db")


def test_file_store_paths(tmp_path: Path) -> None:
    check_tracking_store(str(tmp_path / "mlruns"))
    check_tracking_store((tmp_path / "mlruns").as_uri())
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrackingStoreError, match="is a file"):
        check_tracking_store((tmp_path / "file" / "mlruns").as_uri())


def test_unreachable_postgres_fails_within_seconds() -> None:
    pytest.importorskip("psycopg2")
    uri = f"postgresql://distill:pw@127.0.0.1:{unused_port()}/mlflow"
    started = time.monotonic()
    with pytest.raises(TrackingStoreError, match="not reachable") as info:
        check_tracking_store(uri, timeout=2)
    assert time.monotonic() - started < 10 and "pw@" not in str(info.value)


def test_setup_experiment_stops_on_an_unreachable_server(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingStoreError, match="not reachable"):
        setup_experiment(mlflow_config(tmp_path, uri))
    assert time.monotonic() - started < 10


def test_bound_mlflow_http_retries_keeps_what_is_set(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracking_store.bound_mlflow_http_retries()
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7


def _flaky(failures: list[BaseException], result: str = "done"):
    calls = []

    def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


@pytest.mark.parametrize(
    "error",
    [
        MlflowException("API request to http://x failed with exception ConnectionError"),  # wrapped
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
        ConnectionResetError("reset"),
        TimeoutError("slow"),
    ],
    ids=["wrapped-connection-error", "503", "reset", "timeout"],
)
def test_transient_errors_are_retried(error) -> None:
    import requests

    fn, calls = _flaky([error, requests.ConnectionError("refused")])
    delays: list[float] = []
    assert with_retries(fn, attempts=3, base_delay=0.5, sleep=delays.append) == "done"
    assert len(calls) == 3 and delays == [0.5, 1.0]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bug"),
        KeyError("bug"),
        MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE),
        FileNotFoundError("no such model folder"),
        PermissionError("denied"),
    ],
    ids=["value", "key", "400", "missing-file", "permission"],
)
def test_programming_and_input_errors_are_not_retried(error) -> None:
    fn, calls = _flaky([error])
    with pytest.raises(type(error)):
        with_retries(fn, sleep=lambda _: None)
    assert len(calls) == 1


def test_retries_give_up_with_the_last_error() -> None:
    fn, calls = _flaky([ConnectionError("1"), ConnectionError("2"), ConnectionError("3")])
    with pytest.raises(ConnectionError, match="3"):
        with_retries(fn, attempts=3, sleep=lambda _: None)
    assert len(calls) == 3


_SETUP_SCRIPT = """
import sys, time
from pathlib import Path
from tasks.config import resolve_config
from tasks.tracking_store import setup_experiment

root, index = Path(sys.argv[1]), sys.argv[2]
config = resolve_config(None, {
    "work_dir": str(root / "work"),
    "data": {"data_dir": str(root / "data")},
    "tracking": {"tracking_uri": f"sqlite:///{(root / 'mlflow.db').as_posix()}", "experiment": "race"},
})
(root / f"ready-{index}").touch()
while not (root / "go").exists():
    time.sleep(0.01)
print("EXPERIMENT", setup_experiment(config))
"""


def test_concurrent_first_runs_share_one_experiment(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SETUP_SCRIPT, str(tmp_path), str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"ready-{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        (tmp_path / "go").touch()  # all three open the fresh store at once
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ids = {
        line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("EXPERIMENT")
    }
    assert len(ids) == 1
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    assert [e.experiment_id for e in MlflowClient().search_experiments() if e.name == "race"] == list(ids)


def test_losing_the_race_to_create_the_experiment_reads_it_back(tmp_path: Path, monkeypatch) -> None:
    config = mlflow_config(tmp_path)
    first = setup_experiment(config)
    real = MlflowClient.get_experiment_by_name
    calls = []

    def stale_first(self, name):  # the other process creates it between our look-up and our create
        calls.append(name)
        return None if len(calls) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first)
    real_create = MlflowClient.create_experiment
    errors = []

    def create(self, *args, **kwargs):
        try:
            return real_create(self, *args, **kwargs)
        except MlflowException as exc:
            errors.append(exc.error_code)
            raise

    monkeypatch.setattr(MlflowClient, "create_experiment", create)
    assert setup_experiment(config) == first
    assert errors == ["RESOURCE_ALREADY_EXISTS"]


def test_create_failing_for_another_reason_is_raised(tmp_path: Path, monkeypatch) -> None:
    def refuse(self, *args, **kwargs):
        raise MlflowException("no", error_code=RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(MlflowClient, "create_experiment", refuse)
    with pytest.raises(MlflowException, match="no"):
        setup_experiment(mlflow_config(tmp_path))


def test_deleted_experiment_is_a_clear_stop(tmp_path: Path) -> None:
    config = mlflow_config(tmp_path)
    experiment_id = setup_experiment(config)
    MlflowClient().delete_experiment(experiment_id)
    with pytest.raises(TrackingStoreError, match="is deleted: restore it"):
        setup_experiment(config)


def test_a_store_lock_held_too_long_is_named(tmp_path: Path, monkeypatch) -> None:
    from filelock import FileLock

    monkeypatch.setattr(tracking_store, "_STORE_LOCK_TIMEOUT_S", 0.3)
    held = FileLock(str(tmp_path / "mlflow.db") + ".lock")
    with held, pytest.raises(TrackingStoreError, match="mlflow.db.lock") as info:
        setup_experiment(mlflow_config(tmp_path))
    assert "delete that file" in str(info.value)
