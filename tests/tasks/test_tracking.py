"""Parent and child runs: identity tags, abandoned runs closed on start, child runs that survive a hiccup."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient

from tasks import tracking, tracking_store
from tasks.run_states import (
    FAILURE_REASON_TAG,
    HOST_TAG,
    PID_STARTED_TAG,
    PID_TAG,
    close_abandoned_runs,
)
from tasks.tracking_store import (
    setup_experiment,
)
from tests.tasks.mlflow_helpers import (
    dead_pid,
    mlflow_config,
    new_run,
    run_status,
)

REPO = Path(__file__).resolve().parents[2]


def test_child_run_survives_a_transient_error_without_a_duplicate(tmp_path: Path, monkeypatch) -> None:
    experiment_id = setup_experiment(mlflow_config(tmp_path))
    parent = MlflowClient().create_run(experiment_id, run_name="parent")
    real_log_metrics = mlflow.log_metrics
    failures = [MlflowException("gateway", error_code=TEMPORARILY_UNAVAILABLE)]

    def flaky_log_metrics(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real_log_metrics(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", flaky_log_metrics)
    monkeypatch.setattr(tracking_store, "_sleep", lambda _: None)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"123")
    child_runs = tracking.ChildRuns(experiment_id, parent.info.run_id, "flow-1", {"profile": "smoke"})
    child_id = tracking.log_child_run(
        child_runs,
        "student",
        params={"kind": "student"},
        metrics={"sts": 0.8, "missing": None},
        tags={"variant.kind": "student"},
        artifacts={"model": tmp_path / "model"},
    )
    runs = MlflowClient().search_runs([experiment_id], "attributes.run_name = 'student · flow-1'")
    assert [r.info.run_id for r in runs] == [child_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.metrics == {"sts": 0.8}
    assert run.data.params == {"kind": "student", "profile": "smoke"}
    assert run.data.tags["variant.kind"] == "student"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [f.path for f in MlflowClient().list_artifacts(child_id, "model")] == ["model/weights.bin"]


def test_a_failed_step_is_a_child_run_ended_failed_with_its_reason(tmp_path: Path) -> None:
    experiment_id = setup_experiment(mlflow_config(tmp_path))
    parent = MlflowClient().create_run(experiment_id, run_name="parent")
    child_id = tracking.log_child_run(
        tracking.ChildRuns(experiment_id, parent.info.run_id),
        "teacher-onnx",
        params={"kind": "failed"},
        metrics={},
        tags={FAILURE_REASON_TAG: "failed: RuntimeError: exporter crashed"},
        status="FAILED",
    )
    run = MlflowClient().get_run(child_id)
    assert run.info.status == "FAILED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags[FAILURE_REASON_TAG] == "failed: RuntimeError: exporter crashed"


def test_parent_run_carries_identity_and_closes_abandoned_runs(tmp_path: Path) -> None:
    config = mlflow_config(tmp_path)
    experiment_id = setup_experiment(config)
    client = MlflowClient()
    dead = dead_pid()
    stale = new_run(
        client,
        experiment_id,
        "stale",
        **{HOST_TAG: socket.gethostname(), PID_TAG: str(dead), PID_STARTED_TAG: "1.0"},
    )
    with tracking.parent_run(config, experiment_id, "now", {"profile": "quick"}) as run_id:
        run = client.get_run(run_id)
        assert run.data.tags[PID_TAG] == str(os.getpid()) and run.data.tags["profile"] == "quick"
        assert run_status(client, stale)[0] == "KILLED"
        assert close_abandoned_runs(experiment_id) == []  # this process is alive
    assert client.get_run(run_id).info.status == "FINISHED"
