"""Honest run states: failure hooks end MLflow runs FAILED / KILLED; runs of dead processes are closed."""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import UTC
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from tasks import run_states, tracking
from tasks.run_states import (
    FAILURE_REASON_TAG,
    HOST_TAG,
    PID_STARTED_TAG,
    PID_TAG,
    close_abandoned_runs,
    crash_prefect_flow_run,
    end_open_runs,
    mark_mlflow_cancelled,
    mark_mlflow_failed,
    run_identity_tags,
)
from tasks.tracking_store import (
    setup_experiment,
)
from tests.tasks.mlflow_helpers import (
    dead_pid,
    mlflow_config,
    new_child,
    new_run,
    run_status,
    unused_port,
)

REPO = Path(__file__).resolve().parents[2]


def test_identity_tags_name_this_process() -> None:
    tags = run_identity_tags()
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert float(tags[PID_STARTED_TAG]) == psutil.Process().create_time()


def test_runs_of_dead_processes_are_closed_as_killed(store, monkeypatch) -> None:
    client, experiment_id, _ = store
    crashed = []
    monkeypatch.setattr(run_states, "crash_prefect_flow_run", lambda *a, **k: crashed.append((a, k)) or True)
    host, dead = socket.gethostname(), dead_pid()
    mine = run_identity_tags()
    killed = new_run(
        client,
        experiment_id,
        "killed",
        **{HOST_TAG: host, PID_TAG: str(dead), PID_STARTED_TAG: repr(time.time() - 5)},
        **{"prefect.flow_run_id": "3f1c2b1e-0000-4000-8000-000000000001"},
    )
    killed_child = new_child(client, experiment_id, killed, "killed-child")
    finished_child = new_child(client, experiment_id, killed, "finished-child")
    client.set_terminated(finished_child.info.run_id, "FINISHED")
    reused_pid = new_run(client, experiment_id, "reused", **{**mine, PID_STARTED_TAG: "12345.0"})
    alive = new_run(client, experiment_id, "alive", **mine)
    elsewhere = new_run(
        client, experiment_id, "elsewhere", **{**mine, HOST_TAG: "another-host", PID_TAG: str(dead)}
    )
    untagged = new_run(client, experiment_id, "untagged")

    closed = close_abandoned_runs(experiment_id)

    assert sorted(closed) == sorted([killed.info.run_id, reused_pid.info.run_id])
    reason = f"process {dead} on {host} ended without closing the run (killed?)"
    assert run_status(client, killed) == ("KILLED", reason)
    assert run_status(client, killed_child) == ("KILLED", reason)
    assert run_status(client, finished_child) == ("FINISHED", None)
    assert run_status(client, reused_pid)[0] == "KILLED"
    for run in (alive, elsewhere, untagged):
        assert run_status(client, run) == ("RUNNING", None)
    assert crashed == [
        (
            ("3f1c2b1e-0000-4000-8000-000000000001", reason),
            {"not_after_ms": client.get_run(killed.info.run_id).info.start_time},
        )
    ]
    assert close_abandoned_runs(experiment_id) == []


def _flow_run(uri: str, experiment: str = "exp", **parameters):
    return SimpleNamespace(
        id=uuid.uuid4(), parameters={"tracking_uri": uri, "experiment": experiment, **parameters}
    )


def _state(message: str, name: str = "Failed"):
    return SimpleNamespace(message=message, name=name)


def test_failure_hook_ends_parent_and_children_failed(store) -> None:
    client, experiment_id, uri = store
    flow_run = _flow_run(uri)
    parent = new_run(client, experiment_id, "parent", **{"prefect.flow_run_id": str(flow_run.id)})
    running_child = new_child(client, experiment_id, parent, "running-child")
    done_child = new_child(client, experiment_id, parent, "done-child")
    client.set_terminated(done_child.info.run_id, "FINISHED")
    other = new_run(client, experiment_id, "other-flow-run", **{"prefect.flow_run_id": str(uuid.uuid4())})

    mark_mlflow_failed(None, flow_run, _state("Flow run encountered an exception: ValueError: boom"))

    reason = "Flow run encountered an exception: ValueError: boom"
    assert run_status(client, parent) == ("FAILED", reason)
    assert run_status(client, running_child) == ("FAILED", reason)
    assert run_status(client, done_child) == ("FINISHED", None)
    assert run_status(client, other) == ("RUNNING", None)


def test_cancellation_hook_marks_a_run_the_with_block_ended_failed_as_killed(store) -> None:
    client, experiment_id, uri = store
    flow_run = _flow_run(uri)
    parent = new_run(client, experiment_id, "parent", **{"prefect.flow_run_id": str(flow_run.id)})
    client.set_terminated(parent.info.run_id, "FAILED")
    end_time = client.get_run(parent.info.run_id).info.end_time
    child = new_child(client, experiment_id, parent, "child")

    mark_mlflow_cancelled(None, flow_run, _state("Cancelled by the user", "Cancelled"))

    assert run_status(client, parent) == ("KILLED", "Cancelled by the user")
    assert client.get_run(parent.info.run_id).info.end_time == end_time
    assert run_status(client, child) == ("KILLED", "Cancelled by the user")


def test_hook_leaves_a_finished_run_alone(store) -> None:
    client, experiment_id, uri = store
    flow_run = _flow_run(uri)
    parent = new_run(client, experiment_id, "parent", **{"prefect.flow_run_id": str(flow_run.id)})
    client.set_terminated(parent.info.run_id, "FINISHED")
    mark_mlflow_failed(None, flow_run, _state("failed after the MLflow run ended"))
    assert run_status(client, parent) == ("FINISHED", None)


def test_hook_finds_the_store_when_the_parameters_do_not_resolve(store) -> None:
    """Invalid parameters (the flow failed on them): the URI MLflow was set to in this process."""
    client, experiment_id, uri = store
    mlflow.set_tracking_uri(uri)
    flow_run = SimpleNamespace(
        id=uuid.uuid4(), parameters={"compressions": ["no-such-technique"], "experiment": "exp"}
    )
    parent = new_run(client, experiment_id, "parent", **{"prefect.flow_run_id": str(flow_run.id)})
    mark_mlflow_failed(None, flow_run, _state("invalid parameters"))
    assert run_status(client, parent) == ("FAILED", "invalid parameters")


def test_hook_never_raises(tmp_path: Path, caplog) -> None:
    flow_run = _flow_run(f"http://127.0.0.1:{unused_port()}")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # restored by the autouse fixture
    started = time.monotonic()
    mark_mlflow_failed(None, flow_run, _state("boom"))
    assert time.monotonic() - started < 60
    assert "could not mark the MLflow runs" in caplog.text


def test_hook_on_a_flow_that_failed_before_the_store_existed_creates_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{(tmp_path / 'never' / 'mlflow.db').as_posix()}"
    mark_mlflow_failed(None, _flow_run(uri), _state("failed in check_inputs"))
    assert not (tmp_path / "never").exists()


def test_end_open_runs_by_parent_id(store) -> None:
    client, experiment_id, _ = store
    parent = new_run(client, experiment_id, "parent")
    child = new_child(client, experiment_id, parent, "child")
    changed = end_open_runs("KILLED", "x" * 9000, parent.info.run_id)
    assert changed == [parent.info.run_id, child.info.run_id]
    status, reason = run_status(client, parent)
    assert status == "KILLED" and len(reason) <= 5000 and reason.endswith("...")
    with pytest.raises(ValueError, match="FAILED"):
        end_open_runs("FINISHED", "no", parent.info.run_id)


class _FakePrefect:
    def __init__(self, state) -> None:
        self.state = state
        self.set: list = []

    def __call__(self, sync_client: bool = False):
        assert sync_client
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read_flow_run(self, flow_run_id):
        return SimpleNamespace(id=flow_run_id, state=self.state)

    def set_flow_run_state(self, flow_run_id, state, force=False):
        self.set.append((flow_run_id, state, force))


def _prefect_state(running: bool, at_ms: int):
    from datetime import datetime

    return SimpleNamespace(is_running=lambda: running, timestamp=datetime.fromtimestamp(at_ms / 1000, tz=UTC))


@pytest.mark.parametrize(
    ("running", "entered_ms", "expected"),
    [(True, 1_000_000, True), (False, 1_000_000, False), (True, 9_000_000, False)],
    ids=["still-running", "already-final", "running-again-since"],
)
def test_crash_prefect_flow_run(monkeypatch, running: bool, entered_ms: int, expected: bool) -> None:
    import prefect.client.orchestration

    fake = _FakePrefect(_prefect_state(running, entered_ms))
    monkeypatch.setattr(prefect.client.orchestration, "get_client", fake)
    flow_run_id = str(uuid.uuid4())
    assert crash_prefect_flow_run(flow_run_id, "process 1 on h ended", not_after_ms=2_000_000) is expected
    if expected:
        [(got_id, state, force)] = fake.set
        assert str(got_id) == flow_run_id and force
        assert state.is_crashed() and state.message == "process 1 on h ended"
    else:
        assert fake.set == []


def test_crash_prefect_flow_run_without_an_api_only_warns(monkeypatch, caplog) -> None:
    import prefect.client.orchestration

    def no_api(sync_client: bool = False):
        raise RuntimeError("no Prefect API")

    monkeypatch.setattr(prefect.client.orchestration, "get_client", no_api)
    assert crash_prefect_flow_run(str(uuid.uuid4()), "gone") is False
    assert "could not mark Prefect flow run" in caplog.text


@pytest.mark.slow
def test_hooks_run_by_prefect(tmp_path: Path) -> None:
    """A real Prefect flow (temporary server): a failure inside ``parent_run`` leaves it FAILED with the
    reason, and a child left RUNNING is ended too."""
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    config = mlflow_config(tmp_path)
    experiment_id = setup_experiment(config)
    uri = config.tracking.tracking_uri

    @flow(on_failure=[mark_mlflow_failed])
    def failing(tracking_uri: str, experiment: str) -> None:
        from prefect.runtime import flow_run

        tags = {"prefect.flow_run_id": str(flow_run.get_id())}
        with tracking.parent_run(config, experiment_id, "failing", tags) as run_id:
            MlflowClient().create_run(experiment_id, tags={"mlflow.parentRunId": run_id})
            raise RuntimeError("boom in the flow")

    with prefect_test_harness(server_startup_timeout=120):
        failing(uri, "exp", return_state=True)

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2
    assert all("boom in the flow" in r.data.tags[FAILURE_REASON_TAG] for r in runs)
