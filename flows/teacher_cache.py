"""Teacher embeddings as a stage of their own: encode the corpus tonight, train tomorrow.

``teacher_embeddings`` is the subflow the distillation DAG calls; ``warm_teacher_cache`` is the same subflow
run alone (``distill warm-cache``, or the ``warm-teacher-cache/before-nightly`` deployment), for the profile
and overrides the next distillation run will use. Both write the same content-addressed entries
(:mod:`tasks.teacher_cache`: teacher fingerprint + sentence list + dtype) under ``<work_dir>/teacher-cache``,
so a distillation run after a warm-up encodes nothing. The warm-up logs an MLflow run (``distill.job =
warm-cache``) in the profile's experiment with what was encoded, how fast, and on which machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import mlflow
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

from tasks.benchmark import machine_tags
from tasks.config import DistillConfig, ProfileName, TeacherConfig, form_overrides, resolve_form
from tasks.data import prepare_data
from tasks.preflight import check_inputs_task
from tasks.run_states import FLOW_HOOKS
from tasks.teacher_cache import CachedEmbeddings, cache_teacher_embeddings
from tasks.tracking import flow_run_tags, parent_run
from tasks.tracking_store import setup_experiment


def teacher_cache_dir(config: DistillConfig) -> Path:
    return Path(config.work_dir) / "teacher-cache"


@flow(name="teacher-embeddings", validate_parameters=False)
def teacher_embeddings(
    teacher_dir: Path,
    sentence_files: dict[str, Path],
    teacher: TeacherConfig,
    cache_dir: Path,
    batch_size: int,
    device: str = "cpu",
) -> dict[str, CachedEmbeddings]:
    """The teacher's embeddings of each sentence file, from the cache or encoded into it."""
    return {
        name: cache_teacher_embeddings(
            teacher_dir,
            file,
            cache_dir=cache_dir,
            batch_size=batch_size,
            max_seq_length=teacher.max_seq_length,
            trust_remote_code=teacher.trust_remote_code,
            device=device,
        )
        for name, file in sentence_files.items()
    }


def embed_with_teacher(
    config: DistillConfig, teacher_dir: Path, files: dict[str, Path], device: str
) -> dict[str, CachedEmbeddings]:
    """:func:`teacher_embeddings` with the config's cache folder, teacher settings and batch size."""
    return teacher_embeddings(
        teacher_dir, files, config.teacher, teacher_cache_dir(config), config.benchmark.batch_size, device
    )


@flow(name="warm-teacher-cache", log_prints=True, validate_parameters=False, **FLOW_HOOKS)
def warm_teacher_cache(
    profile: ProfileName = "quick",
    teacher: str | None = None,
    corpus_wiki_sentences: Annotated[int, Field(ge=0)] | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Encode the corpus and held-out sentences of a distillation run with its teacher, ahead of the run.

    Give the profile and overrides the next distillation run will use: it then finds every teacher
    embedding in the cache and encodes nothing. Empty fields keep the profile's value.

    Args:
        profile: The profile of the run to prepare (its teacher and corpus).
        teacher: Teacher model: a local SentenceTransformer folder, an installed package that carries one
            or a Hugging Face Hub id.
        corpus_wiki_sentences: Wikipedia sentences in the distillation corpus.
        experiment: MLflow experiment the run goes to (the distillation runs' experiment).
        tracking_uri: MLflow tracking server; empty: the worker's MLFLOW_TRACKING_URI, else a local SQLite
            store.
        overrides: Any other config field, nested as in the YAML config file.
    """
    chosen = form_overrides(
        teacher=teacher,
        corpus_wiki_sentences=corpus_wiki_sentences,
        experiment=experiment,
        tracking_uri=tracking_uri,
    )
    config = resolve_form(profile, chosen, overrides)
    started = time.perf_counter()
    plan = check_inputs_task(
        config
    )  # the checks of the run it prepares: a bad config fails here, not tonight
    data = prepare_data(config.data, config.work_dir)
    experiment_id = setup_experiment(config)
    run_name = f"warm-cache-{config.profile}-{flow_run.get_name() or 'local'}"
    tags = flow_run_tags(config, "warm-cache") | machine_tags()
    with parent_run(config, experiment_id, run_name, tags) as run_id:
        files = {"corpus": data.corpus_file, "heldout": data.heldout_file}
        entries = embed_with_teacher(config, plan.teacher_dir, files, plan.device)
        encoded = sum(e.sentences_encoded for e in entries.values())
        seconds = sum(e.seconds for e in entries.values() if e.sentences_encoded)
        mlflow.log_metrics(
            {
                "teacher_sentences_encoded": encoded,
                "teacher_cache_seconds": sum(e.seconds for e in entries.values()),
                "corpus_sentences": data.corpus_size,
                "heldout_sentences": data.heldout_size,
                **({"teacher_sentences_per_second": encoded / seconds} if encoded and seconds else {}),
                "flow_seconds": time.perf_counter() - started,
            }
        )
        mlflow.set_tags({f"teacher_cache.{name}": str(entry.path) for name, entry in entries.items()})
    summary = cache_summary(config, entries, run_id)
    create_markdown_artifact(key="teacher-cache", markdown=summary, description="Teacher-cache warm-up")
    print(summary)
    return {
        "mlflow_run_id": run_id,
        "teacher_sentences_encoded": encoded,
        "entries": {name: str(entry.path) for name, entry in entries.items()},
    }


def cache_summary(config: DistillConfig, entries: dict[str, CachedEmbeddings], run_id: str) -> str:
    lines = [
        f"# Teacher cache for the {config.profile} profile",
        "",
        f"Teacher `{config.teacher.model}`; MLflow run `{run_id}`.",
        "",
        "| sentences | rows x dim | encoded now | seconds | entry |",
        "|---|---:|---:|---:|---|",
    ]
    for name, entry in entries.items():
        lines.append(
            f"| {name} | {entry.rows:,} x {entry.dim} | {entry.sentences_encoded:,} | {entry.seconds:.1f} "
            f"| `{entry.path}` |"
        )
    return "\n".join(lines) + "\n"
