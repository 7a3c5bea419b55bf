"""Benchmark any model on the machine where it will serve: the champion, a registered version, a run's model,
a local folder, beside the teacher, measured exactly as the distillation DAG measures (same subflow).

    distill benchmark --models champion                     # or the benchmark-models/on-demand deployment
    distill benchmark --models champion runs:/<id>/model ./my-model --profile quick

``measure_variants`` is the subflow both flows call: quality (STS-B dev/test, held-out suites, MSE and
agreement with the teacher; stored by content key) and speed (interleaved timing, side by side in this
process). ``benchmark_models`` checks every reference before any work (:mod:`tasks.model_refs`), downloads
MLflow models once per logged model, and logs a new MLflow parent run (``distill.job = benchmark``) in the
profile's experiment, tagged with this machine (CPU model and flags, GPU, threads) and the source runs of
the models; each model gets a child run with its source model URI and run. Quality columns equal the source
run's when the profile's data settings are those of that run (``same_data_as_source`` says so per row).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.runner import dask_tasks, release_workers, submit
from flows.teacher_cache import embed_with_teacher
from tasks.benchmark import (
    QualityResult,
    SpeedResult,
    evaluate_all,
    evaluate_group_task,
    machine_tags,
    measure_throughput_task,
    speed_metrics,
)
from tasks.config import BenchmarkConfig, DistillConfig, ProfileName, form_overrides, resolve_form
from tasks.data import PreparedData, check_data, prepare_data
from tasks.devices import resolve_device
from tasks.model_refs import (
    ModelRef,
    check_model_refs,
    fetch_variant,
    registered_model_name,
    unique_names,
)
from tasks.models import fingerprint_model_dir, resolve_model_dir
from tasks.report import SOURCE_COLUMNS, build_table, format_table, write_report
from tasks.run_states import FLOW_HOOKS
from tasks.teacher_cache import CachedEmbeddings
from tasks.tracking import ChildRuns, flow_run_tags, log_results, parent_run, run_context
from tasks.tracking_store import setup_experiment
from tasks.variants import Variant

log = logging.getLogger(__name__)


@flow(name="measure-variants", validate_parameters=False)
def measure_variants(
    variants: list[Variant],
    data: PreparedData,
    heldout_teacher: CachedEmbeddings,
    benchmark: BenchmarkConfig,
    artifacts: Path,
    device: str = "cpu",
) -> tuple[list[QualityResult], SpeedResult]:
    """Quality of every variant (one encoding per network, stored by content key), then speed, timed side
    by side after everything else so that nothing else runs meanwhile; both on ``device`` where each
    variant's runtime runs there.

    Under ``runner.kind=dask`` (a :func:`flows.runner.dask_pool` is open) the networks are scored in
    parallel on the cluster, which is then closed; speed is always timed here, in the flow's process.
    """
    with dask_tasks() as task_runner:
        submit_group = partial(submit, task_runner, evaluate_group_task) if task_runner else None
        quality = evaluate_all(
            variants,
            data,
            heldout_teacher,
            benchmark.batch_size,
            evaluate_group_task,
            artifacts,
            submit=submit_group,
            device=device,
        )
    release_workers()  # nothing but the timing below runs from here on
    speed = measure_throughput_task(variants, data, benchmark, device)
    return quality, speed


def benchmark_inputs(config: DistillConfig, models: list[str]) -> tuple[Path, list[ModelRef]]:
    """The teacher's folder and the checked references; raises a ``ValueError`` naming the first bad input.
    Points MLflow at the store first (references to registered models and runs are looked up there)."""
    from tasks.tracking_store import check_tracking_store, sqlite_path, tracking_uri

    uri = tracking_uri(config)
    check_tracking_store(uri)
    sqlite = sqlite_path(uri)
    store_exists = sqlite is None or sqlite.is_file()
    if store_exists:
        mlflow.set_tracking_uri(uri)
    teacher_dir = resolve_model_dir(config.teacher.model, "teacher")
    refs = check_model_refs(models, registered_model_name(config), store_exists=store_exists)
    check_data(config.data)
    return teacher_dir, refs


@task(name="check-benchmark-inputs")
def check_benchmark_inputs(config: DistillConfig, models: list[str]) -> tuple[Path, list[ModelRef]]:
    """Prefect task around :func:`benchmark_inputs`."""
    return benchmark_inputs(config, models)


@task(name="fetch-models")
def fetch_models(refs: list[ModelRef], dest_root: Path) -> list[Variant]:
    """Each reference as a local variant (MLflow models downloaded once per logged model)."""
    return unique_names([fetch_variant(ref, dest_root) for ref in refs], taken={"teacher"})


@flow(name="benchmark-models", log_prints=True, validate_parameters=False, **FLOW_HOOKS)
def benchmark_models(
    models: list[str] | None = None,
    profile: ProfileName = "quick",
    teacher: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Measure models beside the teacher on this machine, as the distillation flow measures its variants.

    Args:
        models: Model references: champion, <registered name>@<alias>, models:/<name>/<version>,
            runs:/<run id>/model, a local SentenceTransformer or MLflow model folder, or an installed
            package / Hub id. Empty: champion.
        profile: Whose evaluation data, speed settings, experiment and registered model to use; the same
            profile as the run that made the models gives the same quality columns.
        teacher: The reference of every ratio; empty: the profile's teacher.
        experiment: MLflow experiment (also where ``champion`` is looked up: ``<experiment>-student``).
        tracking_uri: MLflow tracking server; empty: the worker's MLFLOW_TRACKING_URI, else a local SQLite
            store.
        overrides: Any other config field, nested as in the YAML config file, e.g.
            {"benchmark": {"repeats": 5}}.
    """
    config = resolve_form(
        profile, form_overrides(teacher=teacher, experiment=experiment, tracking_uri=tracking_uri), overrides
    )
    started = time.perf_counter()
    teacher_dir, refs = check_benchmark_inputs(config, list(models or ["champion"]))
    device = resolve_device(config.device)
    data = prepare_data(config.data, config.work_dir)
    experiment_id = setup_experiment(config)
    run_name = f"benchmark-{config.profile}-{flow_run.get_name() or 'local'}"
    tags = flow_run_tags(config, "benchmark") | machine_tags(config.benchmark.threads)
    with parent_run(config, experiment_id, run_name, tags) as run_id:
        teacher_key = fingerprint_model_dir(teacher_dir, config.teacher.max_seq_length)
        heldout = embed_with_teacher(config, teacher_dir, {"heldout": data.heldout_file}, device)["heldout"]
        work = Path(config.work_dir)
        fetched = fetch_models(refs, work / "benchmark-models")
        teacher = Variant(
            "teacher", "teacher", teacher_dir, params={"model": config.teacher.model}, key=teacher_key
        )
        variants = [teacher, *fetched]
        quality, speed = measure_variants(
            variants, data, heldout, config.benchmark, work / "artifacts", device
        )
        mlflow.log_params({"benchmark.device_used": speed.label("teacher")})
        mlflow.log_metrics(speed_metrics(speed))
        table = with_sources(build_table(variants, quality, speed), variants, data, teacher_key)
        files = write_report(
            table, work / "runs" / run_id / "report", speed, artifact_key="benchmark-tradeoff"
        )
        runs = ChildRuns(experiment_id, run_id, run_name, run_context(config, data, teacher_key, tags))
        log_results(runs, table, variants, files, data, log_models=False)
        sources = sorted({v.params.get("source_parent_run_id", "") for v in fetched} - {""})
        mlflow.set_tags({"distill.source_runs": ",".join(sources), "distill.models": ",".join(models or [])})
        mlflow.log_metric("flow_seconds", time.perf_counter() - started)
    summary = benchmark_summary(table, tags)
    create_markdown_artifact(
        key="benchmark-summary", markdown=summary, description="Benchmark on this machine"
    )
    print(f"Benchmark (MLflow run {run_id}, experiment {config.tracking.experiment}):")
    print(format_table(table))
    return {"mlflow_run_id": run_id, "experiment_id": experiment_id, "table_csv": str(files["csv"])}


def with_sources(
    table: pd.DataFrame, variants: list[Variant], data: PreparedData, teacher_key: str
) -> pd.DataFrame:
    """Add where each model came from, and whether its source run used this data and this teacher (when
    either differs, its quality columns are not those of the source run, or its ratios are to another
    teacher); warns for each."""
    by_name = {v.name: v for v in variants}
    rows = []
    for name in table["variant"]:
        params = by_name[name].params if name in by_name else {}
        same_data = _same(params.get("source_data_fingerprint"), data.fingerprint[:16])
        same_teacher = _same(params.get("source_teacher_key"), teacher_key[:16])
        if same_data == "no":
            log.warning("%s: its source run used other data: quality columns will differ from it", name)
        if same_teacher == "no":
            log.warning("%s: distilled from another teacher (%s)", name, params.get("source_teacher", "?"))
        rows.append((params.get("model_ref", ""), params.get("source_run_id", ""), same_data, same_teacher))
    sources = pd.DataFrame(rows, columns=list(SOURCE_COLUMNS))
    return pd.concat([table.reset_index(drop=True), sources], axis=1)


def _same(source: str | None, here: str) -> str:
    """yes / no, or empty where the model has no source run to compare with."""
    return "" if source is None else "yes" if source == here else "no"


def benchmark_summary(table: pd.DataFrame, machine: dict[str, str]) -> str:
    """Markdown: the machine, then each model's retention and speed-up beside the teacher."""
    lines = [
        "# Benchmark on this machine",
        "",
        f"{machine['machine.cpu']}; CPU flags {machine['machine.cpu_flags']}; GPU {machine['machine.gpu']}; "
        f"{machine['machine.threads']} threads; host {machine['machine.hostname']}.",
        "",
        "| model | reference | STS-B test retention % | speed-up vs teacher | sentences/s "
        "| same data as source |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in table.itertuples(index=False):
        same = row.same_data_as_source or "-"
        lines.append(
            f"| {row.variant} | {row.model_ref or '(teacher)'} | {row.sts_test_retention_pct:.1f} "
            f"| {row.speedup_vs_teacher:.2f} | {row.sentences_per_second:.0f} | {same} |"
        )
    return "\n".join(lines) + "\n"
