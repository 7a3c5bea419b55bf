"""Benchmark variants: STS-B quality, MSE to the teacher, speed, size; the teacher measured in the same run.

Quality uses sentence-transformers' ``EmbeddingSimilarityEvaluator`` and ``MSEEvaluator``. Speed encodes a
fixed list of held-out sentences with the same batch size for every variant, after a warm-up, and the
repeats are interleaved across variants (teacher, s1, s2, teacher, s1, s2, ...) so that machine noise
hits all of them alike; the median is reported.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from prefect import task
from tqdm.auto import tqdm

from tasks.config import BenchmarkConfig
from tasks.data import PreparedData, read_lines, read_sts
from tasks.models import dir_size_bytes, load_sentence_transformer
from tasks.teacher_cache import CachedEmbeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One model in the trade-off table."""

    name: str
    kind: str  # teacher / layer-reduced / ...
    model_dir: Path
    parent: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    build_seconds: float = 0.0


@dataclass(frozen=True)
class QualityResult:
    sts_dev_spearman: float
    sts_dev_pearson: float
    sts_test_spearman: float
    sts_test_pearson: float
    mse_to_teacher: float  # MSEEvaluator's figure: mean squared error * 100
    dim: int
    bytes_per_vector: int
    parameters: int
    size_mb: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class _CachedTeacher:
    """Stands in for the teacher in ``MSEEvaluator``: returns the cached embeddings instead of encoding."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self._embeddings = embeddings

    def encode(self, sentences: list[str], **_: object) -> np.ndarray:
        if len(sentences) != len(self._embeddings):
            raise ValueError("cached teacher embeddings do not match the held-out sentences")
        return np.asarray(self._embeddings, dtype=np.float32)


def evaluate_quality(
    variant: Variant, data: PreparedData, heldout_teacher: CachedEmbeddings, batch_size: int = 64
) -> QualityResult:
    from sentence_transformers.sentence_transformer import evaluation

    model = load_sentence_transformer(variant.model_dir)
    scores: dict[str, float] = {}
    for split in ("dev", "test"):
        pairs = read_sts(data.sts_file(split))
        evaluator = evaluation.EmbeddingSimilarityEvaluator(
            pairs.sentences1, pairs.sentences2, pairs.scores, name=f"sts-{split}", batch_size=batch_size
        )
        result = evaluator(model)
        scores[f"sts_{split}_spearman"] = float(result[f"sts-{split}_spearman_cosine"])
        scores[f"sts_{split}_pearson"] = float(result[f"sts-{split}_pearson_cosine"])

    heldout = read_lines(data.heldout_file)
    dim = int(model.get_embedding_dimension() or 0)
    teacher_emb = heldout_teacher.load()
    if dim == heldout_teacher.dim:
        mse = evaluation.MSEEvaluator(
            heldout, heldout, teacher_model=_CachedTeacher(teacher_emb), name="heldout", batch_size=batch_size
        )(model)["heldout_negative_mse"]
        mse_value = -float(mse)
    else:  # another embedding space: the teacher's MSE is undefined there
        mse_value = float("nan")
    return QualityResult(
        **scores,
        mse_to_teacher=mse_value,
        dim=dim,
        bytes_per_vector=dim * 4,  # float32 vectors
        parameters=sum(p.numel() for p in model.parameters()),
        size_mb=dir_size_bytes(variant.model_dir) / 1e6,
    )


@task(name="evaluate-quality")
def evaluate_quality_task(
    variant: Variant, data: PreparedData, heldout_teacher: CachedEmbeddings, batch_size: int = 64
) -> QualityResult:
    """STS-B dev/test Spearman and Pearson, MSE to the teacher, dimension, size of one variant."""
    return evaluate_quality(variant, data, heldout_teacher, batch_size)


@dataclass(frozen=True)
class SpeedResult:
    sentences_per_second: dict[str, float]
    all_timings_s: dict[str, list[float]]
    sentences: int
    batch_size: int
    threads: int
    cpu: str


def measure_throughput(variants: list[Variant], data: PreparedData, config: BenchmarkConfig) -> SpeedResult:
    """Sentences/second for every variant, timed side by side in this process."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    sentences = read_lines(data.heldout_file)[: config.speed_sentences]
    if len(sentences) < config.speed_sentences:
        log.warning(
            "only %d held-out sentences for the speed benchmark (asked %d)",
            len(sentences),
            config.speed_sentences,
        )
    models = {v.name: load_sentence_transformer(v.model_dir) for v in variants}
    for name, model in models.items():
        warm = sentences[: config.batch_size * config.warmup_batches]
        if warm:
            model.encode(warm, batch_size=config.batch_size)
        log.info("warmed up %s", name)
    timings: dict[str, list[float]] = {name: [] for name in models}
    with tqdm(total=config.repeats * len(models), desc="throughput", unit="run") as bar:
        for _ in range(config.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model.encode(sentences, batch_size=config.batch_size, convert_to_numpy=True)
                timings[name].append(time.perf_counter() - start)
                bar.update(1)
    per_second = {name: len(sentences) / statistics.median(t) for name, t in timings.items()}
    for name, value in per_second.items():
        log.info("%s: %.1f sentences/s", name, value)
    return SpeedResult(
        per_second, timings, len(sentences), config.batch_size, torch.get_num_threads(), cpu_name()
    )


@task(name="measure-throughput")
def measure_throughput_task(
    variants: list[Variant], data: PreparedData, config: BenchmarkConfig
) -> SpeedResult:
    """Prefect task around :func:`measure_throughput`."""
    return measure_throughput(variants, data, config)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
