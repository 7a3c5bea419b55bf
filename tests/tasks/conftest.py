"""Fixtures of the task tests: MLflow settings restored after each test, a SQLite MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.tracking_store import MLFLOW_HTTP_BOUNDS, setup_experiment
from tests.tasks.mlflow_helpers import mlflow_config

_ENV = ("MLFLOW_TRACKING_URI", *MLFLOW_HTTP_BOUNDS)


@pytest.fixture(autouse=True)
def _restore_mlflow_settings():
    """setup_experiment sets MLflow's URI (and with it MLFLOW_TRACKING_URI) and the HTTP bounds."""
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, {name: os.environ.get(name) for name in _ENV}
    yield
    mlflow.set_tracking_uri(before)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture()
def store(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    """A SQLite store set up as the flow does: (client, experiment id, tracking URI)."""
    config = mlflow_config(tmp_path)
    experiment_id = setup_experiment(config)
    return MlflowClient(), experiment_id, config.tracking.tracking_uri
