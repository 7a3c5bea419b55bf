"""MLflow plumbing: where the store is, the parent run of a flow run, and one child run per variant.

Child runs name their parent explicitly (``parent_run_id``): Prefect may run tasks in worker threads, where
MLflow's thread-local "active run" is not visible.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import task

from tasks.config import DistillConfig
from tasks.variants import Variant

log = logging.getLogger(__name__)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def tracking_uri(config: DistillConfig) -> str:
    """Config first, then ``MLFLOW_TRACKING_URI``, else a SQLite store in the work directory."""
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(config.work_dir).resolve() / 'mlflow.db').as_posix()}"


def setup_experiment(config: DistillConfig) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    uri = tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifact_location = None
        if uri.startswith("sqlite:///"):  # keep a local store's artifacts beside it, not in the cwd
            artifact_location = (Path(config.work_dir).resolve() / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(config.tracking.experiment, artifact_location)
    if (experiment.tags if experiment else {}).get(EXPERIMENT_KIND_TAG) is None:
        # MLflow 3's UI opens an experiment on its model-training views (runs table, charts) only with
        # this tag; without it, on the GenAI traces overview.
        MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextmanager
def parent_run(
    config: DistillConfig, experiment_id: str, run_name: str, tags: dict[str, str]
) -> Iterator[str]:
    """The flow run's MLflow run: the whole config as params; ended FAILED if the flow raises."""
    all_tags = dict(tags)
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags) as run:
        mlflow.log_params(config.flat_params())
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, mlflow.get_tracking_uri())
        yield run.info.run_id


def log_child_run(
    experiment_id: str,
    parent_run_id: str,
    run_name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    artifacts_dir: Path | None = None,
    artifact_path: str = "model",
) -> str:
    """One finished child run under ``parent_run_id``; returns its id."""
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, nested=True, parent_run_id=parent_run_id, tags=tags
    ) as run:
        mlflow.log_params(params)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        if artifacts_dir is not None:
            MlflowClient().log_artifacts(run.info.run_id, str(artifacts_dir), artifact_path)
        return run.info.run_id


@task(name="log-to-mlflow")
def log_results(
    experiment_id: str,
    parent_run_id: str,
    table: pd.DataFrame,
    variants: list[Variant],
    report_files: dict[str, Path],
    log_models: bool = True,
) -> dict[str, str]:
    """A child run per variant (params, metrics, model folder) and the table + plots on the parent run."""
    from tasks.report import metric_columns

    child_ids: dict[str, str] = {}
    logged: set[Path] = set()
    for variant, (_, row) in zip(variants, table.iterrows(), strict=True):
        params = {
            "variant": variant.name,
            "kind": variant.kind,
            "parent": variant.parent or "",
            "backend": variant.backend,
            "precision": variant.precision,
            "uses_sts_labels": str(variant.uses_sts_labels).lower(),
            **variant.params,
        }
        # a model folder is logged once, with the first variant that runs it
        log_model = log_models and variant.kind != "teacher" and variant.model_dir not in logged
        if log_model:
            logged.add(variant.model_dir)
        child_ids[variant.name] = log_child_run(
            experiment_id,
            parent_run_id,
            run_name=variant.name,
            params=params,
            metrics={column: row[column] for column in metric_columns(table)},
            tags={"variant.kind": variant.kind},
            artifacts_dir=variant.model_dir if log_model else None,
        )
    mlflow.log_table(table, artifact_file="tradeoff_table.json", run_id=parent_run_id)
    client = MlflowClient()
    for path in report_files.values():
        client.log_artifact(parent_run_id, str(path), "report")
    return child_ids
