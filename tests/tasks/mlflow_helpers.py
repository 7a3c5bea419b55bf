"""MLflow helpers shared by the tracking tests: a config on a SQLite store, runs, a dead pid, a port."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from tasks.config import resolve_config
from tasks.run_states import FAILURE_REASON_TAG


def mlflow_config(tmp_path: Path, uri: str | None = None, experiment: str = "exp"):
    uri = uri or f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    return resolve_config(
        None,
        {
            "work_dir": str(tmp_path / "work"),
            "data": {"data_dir": str(tmp_path / "data")},
            "tracking": {"tracking_uri": uri, "experiment": experiment},
        },
    )


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


def new_run(client: MlflowClient, experiment_id: str, name: str, **tags: str):
    return client.create_run(experiment_id, run_name=name, tags=tags)


def new_child(client: MlflowClient, experiment_id: str, parent, name: str):
    return client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})


def run_status(client: MlflowClient, run) -> tuple[str, str | None]:
    got = client.get_run(run.info.run_id)
    return got.info.status, got.data.tags.get(FAILURE_REASON_TAG)
