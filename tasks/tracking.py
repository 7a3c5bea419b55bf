"""MLflow plumbing: the parent run of a flow run, and one child run per variant.

Child runs name their parent explicitly (``parent_run_id``): Prefect may run tasks in worker threads, where
MLflow's thread-local "active run" is not visible. Where the store is and the experiment:
:mod:`tasks.tracking_store`; failure states and abandoned runs: :mod:`tasks.run_states`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import task

from tasks.config import DistillConfig
from tasks.run_states import FAILURE_REASON_TAG, MAX_TAG_CHARS, close_abandoned_runs, run_identity_tags
from tasks.tracking_store import PARENT_RUN_TAG, redact_uri, short_error, with_retries
from tasks.variants import Variant

log = logging.getLogger(__name__)


RUN_NAME_TAG = "mlflow.runName"


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
    config: DistillConfig,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    close_abandoned: bool = True,
) -> Iterator[str]:
    """The flow run's MLflow run: the whole config as params; ended FAILED if the flow raises.

    Tagged with :func:`run_identity_tags`. First closes runs of this experiment that a process on this
    host left RUNNING when it was killed (``close_abandoned``).
    """
    if close_abandoned:
        try:
            close_abandoned_runs(experiment_id)
        except Exception as exc:  # housekeeping: never the reason a run fails
            log.warning("could not look for abandoned MLflow runs (%s)", short_error(exc))
    all_tags = {**tags, **run_identity_tags()}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    active = with_retries(
        lambda: mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=all_tags),
        what="starting the MLflow run",
    )
    with active as run:
        with_retries(lambda: mlflow.log_params(config.flat_params()), what="logging the config")
        log.info("MLflow run %s (%s) in %s", run.info.run_id, run_name, redact_uri(mlflow.get_tracking_uri()))
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
    status: str = "FINISHED",
) -> str:
    """One child run under ``parent_run_id``, ended with ``status``; returns its id.

    Goes through :class:`MlflowClient` (no thread-local active run); each call is retried on transient
    errors, so a hiccup neither fails the flow nor leaves a duplicate child run.
    """
    from mlflow.tracking.context import registry as context_registry

    client = MlflowClient()
    run_tags = context_registry.resolve_tags(
        {**(tags or {}), PARENT_RUN_TAG: parent_run_id, RUN_NAME_TAG: run_name}
    )
    run = with_retries(
        lambda: client.create_run(experiment_id, tags=run_tags, run_name=run_name),
        what=f"creating child run {run_name}",
    )
    run_id = run.info.run_id
    try:
        with_retries(lambda: mlflow.log_params(params, run_id=run_id), what=f"logging params of {run_name}")
        with_retries(
            lambda: mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if v is not None}, run_id=run_id
            ),
            what=f"logging metrics of {run_name}",
        )
        if artifacts_dir is not None:
            with_retries(
                lambda: client.log_artifacts(run_id, str(artifacts_dir), artifact_path),
                what=f"logging the model of {run_name}",
            )
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    with_retries(lambda: client.set_terminated(run_id, status), what=f"ending child run {run_name}")
    return run_id


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
    rows = list(table.iterrows())
    for variant, (_, row) in zip(variants, rows[: len(variants)], strict=True):
        params = {
            "variant": variant.name,
            "kind": variant.kind,
            "parent": variant.parent or "",
            "backend": variant.backend,
            "precision": variant.precision,
            "uses_sts_labels": str(variant.uses_sts_labels).lower(),
            "artifact_key": variant.key,  # the content key of what it runs: equal keys, same model
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
            tags={"variant.kind": variant.kind, "distill.reused": str(variant.reused).lower()},
            artifacts_dir=variant.model_dir if log_model else None,
        )
    client = MlflowClient()
    for _, row in rows[len(variants) :]:  # compress steps that failed: a FAILED child run each, with why
        run_id = log_child_run(
            experiment_id,
            parent_run_id,
            run_name=row["variant"],
            params={"variant": row["variant"], "kind": row["kind"], "parent": row["parent"]},
            metrics={},
            tags={"variant.kind": row["kind"], FAILURE_REASON_TAG: str(row["status"])[:MAX_TAG_CHARS]},
            status="FAILED",
        )
        child_ids[row["variant"]] = run_id
    with_retries(
        lambda: mlflow.log_table(table, artifact_file="tradeoff_table.json", run_id=parent_run_id),
        what="logging the trade-off table",
    )
    for path in report_files.values():
        with_retries(
            lambda path=path: client.log_artifact(parent_run_id, str(path), "report"),
            what=f"logging {Path(path).name}",
        )
    return child_ids
