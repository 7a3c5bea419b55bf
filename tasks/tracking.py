"""MLflow plumbing: the parent run of a flow run, and one child run per variant.

Child runs name their parent explicitly (``parent_run_id``): Prefect may run tasks in worker threads, where
MLflow's thread-local "active run" is not visible. Where the store is and the experiment:
:mod:`tasks.tracking_store`; failure states and abandoned runs: :mod:`tasks.run_states`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.entities import DatasetInput, InputTag, RunTag
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.runtime import deployment, flow_run

from tasks.benchmark import cpu_name
from tasks.config import DistillConfig
from tasks.data import PreparedData
from tasks.files import file_sha256
from tasks.run_states import FAILURE_REASON_TAG, MAX_TAG_CHARS, close_abandoned_runs, run_identity_tags
from tasks.tracking_store import PARENT_RUN_TAG, redact_uri, short_error, with_retries
from tasks.variants import Variant

log = logging.getLogger(__name__)


RUN_NAME_TAG = "mlflow.runName"
JOB_TAG = "distill.job"  # distill, benchmark or warm-cache: the kind of flow run an MLflow run belongs to


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


def flow_run_tags(config: DistillConfig, job: str) -> dict[str, str]:
    """Tags that tie an MLflow run to its Prefect flow run (the failure hooks find runs by them)."""
    return {
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "prefect.flow_run_name": flow_run.get_name() or "",
        "prefect.deployment": deployment.name or "",
        "profile": config.profile,
        JOB_TAG: job,
    }


def run_context(
    config: DistillConfig, data: PreparedData, teacher_key: str, tags: dict[str, str]
) -> dict[str, str]:
    """Params every child run carries, so that child runs of different flow runs compare and filter."""
    return {
        "profile": config.profile,
        "teacher": config.teacher.model,
        "teacher_key": teacher_key[:16],
        "data_fingerprint": data.fingerprint[:16],
        "dev_set": file_sha256(data.sts_file("dev"))[:16],
        "corpus_sentences": str(data.corpus_size),
        "cpu": cpu_name(),
        "threads": str(config.benchmark.threads or torch.get_num_threads()),
        "git_commit": git_commit() or "",
        "prefect_flow_run_id": tags["prefect.flow_run_id"],
        "job": tags.get(JOB_TAG, "distill"),  # distill / benchmark: filter child runs of one kind of job
    }


@dataclass(frozen=True)
class ChildRuns:
    """Where a flow run's child runs go, and what each carries so runs of two flow runs compare.

    Args:
        experiment_id: The experiment of the parent run.
        parent_run_id: The flow run's MLflow run; named explicitly (Prefect may run tasks in worker threads,
            where MLflow's thread-local active run is not visible).
        flow_run_name: Appended to each child run's name (``<variant> · <flow run>``).
        context: Params every child run gets: profile, teacher, data fingerprint, CPU, threads, git commit,
            Prefect flow-run id.
    """

    experiment_id: str
    parent_run_id: str
    flow_run_name: str = ""
    context: dict[str, str] = field(default_factory=dict)

    def run_name(self, variant: str) -> str:
        return f"{variant} · {self.flow_run_name}" if self.flow_run_name else variant

    def open(self, variant: str, tags: dict[str, str] | None = None) -> str:
        """Create the RUNNING child run of ``variant`` now (e.g. before a student trains); returns its id."""
        from mlflow.tracking.context import registry as context_registry

        client = MlflowClient()
        name = self.run_name(variant)
        run_tags = context_registry.resolve_tags(
            {**(tags or {}), PARENT_RUN_TAG: self.parent_run_id, RUN_NAME_TAG: name}
        )
        run = with_retries(
            lambda: client.create_run(self.experiment_id, tags=run_tags, run_name=name),
            what=f"creating child run {name}",
        )
        return run.info.run_id


def log_child_run(
    runs: ChildRuns,
    variant_name: str,
    params: dict[str, str],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    status: str = "FINISHED",
    run_id: str | None = None,
    datasets: list[DatasetInput] | None = None,
    artifacts: dict[str, Path] | None = None,
    then: Callable[[str], None] | None = None,
) -> str:
    """Fill one child run (``run_id``, else a new one) and end it with ``status``; returns its id.

    Params are ``runs.context`` plus ``params``; ``artifacts`` maps an artifact path to a local folder;
    ``then(run_id)`` runs last, before the run ends (e.g. logging its model); if anything raises, the run
    ends FAILED. Goes through :class:`MlflowClient` (no thread-local active run); each call is retried on
    transient errors, so a hiccup neither fails the flow nor leaves a duplicate child run.
    """
    client = MlflowClient()
    if run_id is None:
        run_id = runs.open(variant_name, tags)
    elif tags:
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        with_retries(lambda: client.log_batch(run_id, tags=run_tags), what=f"tagging {variant_name}")
    try:
        all_params = {**runs.context, **params}
        with_retries(
            lambda: mlflow.log_params(all_params, run_id=run_id), what=f"logging params of {variant_name}"
        )
        values = {k: float(v) for k, v in metrics.items() if v is not None}  # NaN kept: not measurable
        with_retries(
            lambda: mlflow.log_metrics(values, run_id=run_id), what=f"logging metrics of {variant_name}"
        )
        if datasets:
            with_retries(lambda: client.log_inputs(run_id, datasets=datasets), what="logging datasets")
        for path, folder in (artifacts or {}).items():
            with_retries(
                lambda folder=folder, path=path: client.log_artifacts(run_id, str(folder), path),
                what=f"logging {path} of {variant_name}",
            )
        if then is not None:
            then(run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    with_retries(lambda: client.set_terminated(run_id, status), what=f"ending child run {variant_name}")
    return run_id


def dataset_inputs(data: PreparedData) -> dict[str, DatasetInput]:
    """The prepared data files as MLflow datasets (name, file, sha256 digest), keyed by name.

    Context tags: ``training`` (corpus, STS-B train), ``validation`` (STS-B dev, used for checkpoints
    and the champion rule), ``evaluation`` (STS-B test, held-out sentences and suites).
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    files = {
        "corpus": (data.corpus_file, "training"),
        "stsb-train": (data.sts_file("train"), "training"),
        "stsb-dev": (data.sts_file("dev"), "validation"),
        "stsb-test": (data.sts_file("test"), "evaluation"),
        "heldout-sentences": (data.heldout_file, "evaluation"),
        **{f"heldout-{suite}": (data.suite_file(suite), "evaluation") for suite in data.heldout_suites},
    }
    inputs = {}
    for name, (path, context) in files.items():
        if not Path(path).is_file():  # e.g. no STS-B train file when it is not used
            continue
        source = resolve_dataset_source(str(Path(path).resolve()))
        dataset = MetaDataset(source, name=name, digest=file_sha256(path)[:16])
        inputs[name] = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])
    return inputs


def child_datasets(variant: Variant, inputs: dict[str, DatasetInput]) -> list[DatasetInput]:
    """Evaluation sets for every variant; the training sets too for the students that trained on them."""
    names = ["stsb-dev", "stsb-test"]
    if variant.kind in ("layer-reduced", "light"):
        names = ["corpus", "stsb-train", *names]
    return [inputs[name] for name in names if name in inputs]


# A child run's ``kind`` param: teacher, student (trained or distilled) or compressed (made by a compress
# step); ``variant_kind`` keeps the table's finer kind.
ROLES = {"teacher": "teacher", "layer-reduced": "student", "light": "student", "static": "student"}


@dataclass(frozen=True)
class LoggedRuns:
    run_ids: dict[str, str]  # variant -> child run id
    model_uris: dict[str, str]  # variant -> models:/ URI of its logged MLflow model


def variant_params(variant: Variant, row: pd.Series) -> dict[str, str]:
    """What a child run is: kind, parent, technique and its settings, layers, loss, dimension, precision."""
    return {
        "variant": variant.name,
        "kind": ROLES.get(variant.kind, "compressed"),  # filter e.g. params.kind = 'student'
        "variant_kind": variant.kind,
        "parent": variant.parent or "",
        "backend": variant.backend,
        "precision": variant.precision,
        "embedding_dim": str(int(row["embedding_dim"])),
        "uses_sts_labels": str(variant.uses_sts_labels).lower(),
        "speed_device": str(row.get("speed_device", "")),  # where its sentences/s were timed
        "artifact_key": variant.key,  # the content key of what it runs: equal keys, same model
        **variant.params,
    }


@task(name="log-to-mlflow")
def log_results(
    runs: ChildRuns,
    table: pd.DataFrame,
    variants: list[Variant],
    report_files: dict[str, Path],
    data: PreparedData,
    log_models: bool = True,
    open_runs: dict[str, str] | None = None,
    cards: dict[str, Path] | None = None,
) -> LoggedRuns:
    """A child run per variant (params, metrics, datasets, loadable model, card) and the table + plots on
    the parent run.

    ``open_runs``: child runs opened earlier (students, before training), filled and ended here.
    ``cards``: model card folders, logged beside the child run's model and into the model itself.
    """
    from tasks.mlflow_models import log_variant_model
    from tasks.report import metric_columns

    client = MlflowClient()
    inputs = dataset_inputs(data)
    with_retries(
        lambda: client.log_inputs(runs.parent_run_id, datasets=list(inputs.values())),
        what="logging the datasets",
    )
    run_ids: dict[str, str] = {}
    model_uris: dict[str, str] = {}

    def log_model(variant: Variant, dim: int, card: Path | None, run_id: str) -> None:
        model_uris[variant.name] = uri = log_variant_model(variant, run_id, dim)
        if card:  # the card travels with the model (models:/.../README.md) and sits in the run
            model_id = uri.removeprefix("models:/")
            with_retries(
                lambda: client.log_model_artifacts(model_id, str(card)), what="logging the model card"
            )

    rows = list(table.iterrows())
    for variant, (_, row) in zip(variants, rows[: len(variants)], strict=True):
        card = (cards or {}).get(variant.name)
        run_ids[variant.name] = log_child_run(
            runs,
            variant.name,
            params=variant_params(variant, row),
            metrics={column: row[column] for column in metric_columns(table)},
            tags={"variant.kind": variant.kind, "distill.reused": str(variant.reused).lower()},
            run_id=(open_runs or {}).get(variant.name),
            datasets=child_datasets(variant, inputs),
            artifacts={"model_card": card} if card else None,
            then=partial(log_model, variant, int(row["embedding_dim"]), card) if log_models else None,
        )
    for _, row in rows[len(variants) :]:  # compress steps that failed: a FAILED child run each, with why
        run_ids[row["variant"]] = log_child_run(
            runs,
            row["variant"],
            params={"variant": row["variant"], "kind": row["kind"], "parent": row["parent"]},
            metrics={},
            tags={"variant.kind": row["kind"], FAILURE_REASON_TAG: str(row["status"])[:MAX_TAG_CHARS]},
            status="FAILED",
        )
    with_retries(
        lambda: mlflow.log_table(table, artifact_file="tradeoff_table.json", run_id=runs.parent_run_id),
        what="logging the trade-off table",
    )
    for path in report_files.values():
        with_retries(
            lambda path=path: client.log_artifact(runs.parent_run_id, str(path), "report"),
            what=f"logging {Path(path).name}",
        )
    return LoggedRuns(run_ids, model_uris)
