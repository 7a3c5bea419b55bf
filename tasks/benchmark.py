"""Benchmark variants: STS quality, MSE to the teacher, speed, size; the teacher measured in the same run.

Quality: STS-B dev/test and every held-out suite, Spearman/Pearson between the gold scores and the
similarity suited to the variant's storage (cosine for float32 and int8 vectors, -Hamming for binary
ones), as sentence-transformers' ``EmbeddingSimilarityEvaluator`` computes them for float vectors; MSE to
the teacher on held-out sentences as ``MSEEvaluator`` reports it (x100); agreement with the teacher on
held-out sentence pairs (Spearman between the two similarities, label-free, any dimension or storage).
Variants that run the same model (e.g. a model and its int8-embedding version) share one encoding of the
evaluation sentences.

Speed: a fixed list of held-out sentences, the same batch size for every variant, after a warm-up; repeats
are interleaved across variants (teacher, s1, s2, teacher, s1, s2, ...) so that machine noise hits all of
them alike; the median is reported. Quantizing the output vectors is part of the timed work. The share
of the machine's CPU that other processes used while timing is measured (:class:`CpuWatch`) and reported
beside the figures, with a warning when it is high: another job on the machine skews every ratio.

Quality scores are stored by the variant's content key and the evaluation data (:mod:`tasks.artifacts`):
an unchanged model is not scored again by a later run. Speed is always measured afresh, side by side.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch
from prefect import task
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

from tasks.artifacts import ArtifactStore, stage_key
from tasks.config import BenchmarkConfig
from tasks.data import PreparedData, StsPairs, read_lines, read_sts
from tasks.devices import cpu_name, device_label, runs_on
from tasks.models import load_sentence_transformer
from tasks.pca import read_head
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import (
    Precision,
    Variant,
    bytes_per_vector,
    encode,
    load_model,
    pair_similarity,
    quantize,
    size_bytes,
)

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

log = logging.getLogger(__name__)

QUALITY_STAGE = "quality"
QUALITY_VERSION = 1  # bump when a change here changes a quality figure


@dataclass(frozen=True)
class QualityResult:
    sts_dev_spearman: float
    sts_dev_pearson: float
    sts_test_spearman: float
    sts_test_pearson: float
    mse_to_teacher: float  # MSEEvaluator's figure: mean squared error * 100; NaN where not comparable
    dim: int
    bytes_per_vector: int
    parameters: int
    size_mb: float
    heldout_spearman: dict[str, float] | None = None  # held-out suite name -> Spearman
    heldout_agreement_spearman: float = float("nan")  # see agreement_spearman

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def encoder_key(variant: Variant) -> tuple[str, str, str]:
    """Variants with the same key run the same network and differ only in how vectors are stored, or in a
    linear head applied to its output (PCA, truncation: ``Variant.head_on``)."""
    if variant.head_on is not None:
        return (str(variant.head_on), "torch", "")
    return (str(variant.model_dir), variant.backend, variant.model_file or "")


def _network(variant: Variant) -> Variant:
    """The variant whose network ``variant`` runs (itself, or the network its head extends)."""
    return variant if variant.head_on is None else replace(variant, model_dir=variant.head_on, head_on=None)


def _score(
    pairs: StsPairs, lookup: dict[str, np.ndarray], variant: Variant, floats: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Spearman and Pearson of the variant's similarities (``floats``: the query side when it rescores)."""
    a, b = (np.stack([lookup[s] for s in side]) for side in (pairs.sentences1, pairs.sentences2))
    queries = np.stack([floats[s] for s in pairs.sentences1]) if variant.rescore else None
    sims = pair_similarity(a, b, variant.precision, queries)
    return float(spearmanr(sims, pairs.scores)[0]), float(pearsonr(sims, pairs.scores)[0])


def agreement_spearman(
    teacher: np.ndarray, vectors: np.ndarray, precision: Precision, queries: np.ndarray | None = None
) -> float:
    """Spearman between the teacher's cosine and the variant's similarity on fixed pairs of held-out rows.

    Row i is paired with row i + n//2 (both arrays in held-out file order); ``vectors`` are stored as the
    variant stores them, so int8 / binary variants use their own similarity. With ``queries`` (the float
    vectors of a rescoring variant) the first row of each pair is the float query. Needs no labels and works
    for any dimension.
    """
    if len(vectors) != len(teacher):
        raise ValueError(f"{len(vectors)} variant rows but {len(teacher)} teacher rows")
    half = len(teacher) // 2
    first = None if queries is None else queries[:half]
    ours = pair_similarity(vectors[:half], vectors[half : 2 * half], precision, first)
    theirs = pair_similarity(teacher[:half], teacher[half : 2 * half], "float32")
    return float(spearmanr(ours, theirs)[0])


def evaluate_group(
    variants: list[Variant],
    data: PreparedData,
    heldout_teacher: CachedEmbeddings,
    batch_size: int = 64,
    device: str = "cpu",
) -> list[QualityResult]:
    """Quality of variants that share one network (one encoding of all evaluation sentences, on ``device``
    where the variant's runtime can run there; a PCA or truncation head applied to that encoding)."""
    if len({encoder_key(v) for v in variants}) != 1:
        raise ValueError("evaluate_group takes variants of one network only")
    network = _network(variants[0])
    model = load_model(network, device)
    sets = {f"sts_{split}": read_sts(data.sts_file(split)) for split in ("dev", "test")}
    suites = {name: read_sts(data.suite_file(name)) for name in data.heldout_suites}
    heldout = read_lines(data.heldout_file)
    sentences = list(
        dict.fromkeys(s for p in [*sets.values(), *suites.values()] for s in p.sentences1 + p.sentences2)
    )
    start = time.perf_counter()
    network_floats = model.encode(
        sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    network_heldout = model.encode(
        heldout, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    log.info(
        "encoded %d evaluation sentences with the network of %s in %.1f s",
        len(sentences) + len(heldout),
        [v.name for v in variants],
        time.perf_counter() - start,
    )
    network_parameters = _parameters(network, model)
    teacher = np.asarray(heldout_teacher.load(), dtype=np.float32)

    outputs: dict[Path | None, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]] = {}
    results = []
    for variant in variants:
        head_dir = variant.model_dir if variant.head_on is not None else None
        if head_dir not in outputs:  # the network's output, or its output through this variant's head
            head = read_head(head_dir) if head_dir is not None else None
            floats = head(network_floats) if head else network_floats
            heldout_floats = head(network_heldout) if head else network_heldout
            head_parameters = head.parameters if head else 0
            float_lookup = dict(zip(sentences, floats, strict=True))
            outputs[head_dir] = (floats, heldout_floats, float_lookup, network_parameters + head_parameters)
        floats, heldout_floats, float_lookup, parameters = outputs[head_dir]
        lookup = dict(zip(sentences, quantize(floats, variant), strict=True))
        scores = {}
        for prefix, pairs in sets.items():
            scores[f"{prefix}_spearman"], scores[f"{prefix}_pearson"] = _score(
                pairs, lookup, variant, float_lookup
            )
        heldout_scores = {
            name: _score(pairs, lookup, variant, float_lookup)[0] for name, pairs in suites.items()
        }
        queries = heldout_floats if variant.rescore else None
        agreement = agreement_spearman(teacher, quantize(heldout_floats, variant), variant.precision, queries)
        comparable = (
            variant.precision == "float32"
            and heldout_floats.shape[1] == teacher.shape[1]
            and not variant.rotated
        )
        mse = float(((teacher - heldout_floats) ** 2).mean() * 100) if comparable else float("nan")
        dim = int(floats.shape[1])
        results.append(
            QualityResult(
                **scores,
                mse_to_teacher=mse,
                dim=dim,
                bytes_per_vector=bytes_per_vector(dim, variant.precision),
                parameters=parameters,
                size_mb=size_bytes(variant, model) / 1e6,
                heldout_spearman=heldout_scores,
                heldout_agreement_spearman=agreement,
            )
        )
    return results


def _parameters(variant: Variant, model: object) -> int:
    """Weights of the network; int8 weights are packed (not Parameters), so count the float model."""
    if variant.backend == "onnx":
        return _onnx_parameters(variant)
    if variant.backend == "openvino" and not any(
        (Path(variant.model_dir) / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
    ):  # a graph without its float model beside it (e.g. downloaded from MLflow): count the graph's weights
        return _openvino_parameters(variant)
    if variant.backend in ("torch-int8", "openvino"):
        model = load_sentence_transformer(variant.model_dir)
    return sum(p.numel() for p in model.parameters())


def _onnx_parameters(variant: Variant) -> int:
    import onnx

    graph = onnx.load(str(Path(variant.model_dir) / str(variant.model_file)), load_external_data=False).graph
    return int(sum(np.prod(t.dims) for t in graph.initializer if len(t.dims) > 0))


def _openvino_parameters(variant: Variant) -> int:
    """Elements of the graph's non-scalar constants: its weights, plus int8 scales where quantized."""
    import openvino as ov

    graph = ov.Core().read_model(str(Path(variant.model_dir) / str(variant.model_file)))
    sizes = (
        int(np.prod(op.get_output_shape(0))) for op in graph.get_ops() if op.get_type_name() == "Constant"
    )
    return sum(size for size in sizes if size > 1)


@task(name="evaluate-quality")
def evaluate_group_task(
    variants: list[Variant],
    data: PreparedData,
    heldout_teacher: CachedEmbeddings,
    batch_size: int = 64,
    device: str = "cpu",
) -> list[QualityResult]:
    """STS-B and held-out Spearman, MSE to the teacher, dimension and size of variants of one network."""
    return evaluate_group(variants, data, heldout_teacher, batch_size, device)


def quality_key(
    variant: Variant, data: PreparedData, heldout_teacher: CachedEmbeddings, batch_size: int
) -> str:
    inputs = {
        "variant": variant.key,
        "precision": variant.precision,
        "data": data.fingerprint,
        "heldout_teacher": heldout_teacher.key,
        "batch_size": batch_size,
    }
    if variant.rotated:  # no MSE to the teacher for it (other rows keep their keys)
        inputs["rotated"] = True
    return stage_key(QUALITY_STAGE, QUALITY_VERSION, inputs)


def evaluate_all(
    variants: list[Variant],
    data: PreparedData,
    heldout_teacher: CachedEmbeddings,
    batch_size: int = 64,
    evaluate: Callable[..., list[QualityResult]] = evaluate_group,
    artifacts: Path | None = None,
    submit: Callable[..., PrefectFuture[list[QualityResult]]] | None = None,
    device: str = "cpu",
) -> list[QualityResult]:
    """Quality of every variant, in variant order; one ``evaluate`` call per network (the flow: the task).

    With ``artifacts``, scores of variants with a content key are stored there, and a network whose
    variants all have stored scores is not encoded again. With ``submit`` (takes ``evaluate``'s arguments
    and returns a future, e.g. on a Dask cluster), every network to score is submitted at once.
    """
    store = ArtifactStore(artifacts) if artifacts is not None else None
    groups: dict[tuple[str, str, str], list[Variant]] = {}
    for variant in variants:
        groups.setdefault(encoder_key(variant), []).append(variant)
    by_name: dict[str, QualityResult] = {}
    to_score = []
    for group in groups.values():
        keys = [quality_key(v, data, heldout_teacher, batch_size) if v.key else "" for v in group]
        if store is not None and all(keys):
            stored = [store.get(QUALITY_STAGE, key) for key in keys]
            if all(stored):
                log.info("reusing the quality scores of %s (unchanged models)", [v.name for v in group])
                for variant, entry in zip(group, stored, strict=True):
                    by_name[variant.name] = QualityResult(**entry.result)
                continue
        args = (group, data, heldout_teacher, batch_size, device)
        to_score.append((group, keys, submit(*args) if submit is not None else None, args))
    for group, keys, future, args in to_score:
        results = future.result() if future is not None else evaluate(*args)
        for variant, key, result in zip(group, keys, results, strict=True):
            by_name[variant.name] = result
            if store is not None and key:
                store.build(QUALITY_STAGE, key, lambda _out, _work, r=result: r.as_dict())
    return [by_name[v.name] for v in variants]


BACKGROUND_CPU_WARN_PCT = 10.0  # other processes' share of the CPU while timing above which a run warns


class CpuWatch:
    """How much of the machine's CPU time other processes used while a block ran: system-wide busy time
    minus this process's own (all its threads), over wall time x logical cores, in percent. Read
    ``background_pct`` after the block; ``None`` where the platform gives no system-wide CPU times."""

    background_pct: float | None = None

    def __enter__(self) -> CpuWatch:
        self._start = self._sample()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return
        busy, own, wall = (b - a for a, b in zip(self._start, end, strict=True))
        cores = psutil.cpu_count() or 1
        self.background_pct = round(100 * max(0.0, busy - own) / (wall * cores), 1)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            system, own = psutil.cpu_times(), psutil.Process().cpu_times()
        except (psutil.Error, OSError, NotImplementedError):
            return None
        # steal (the hypervisor's) and guest (already inside user) are not other processes' work
        busy = sum(getattr(system, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
        return busy, own.user + own.system, time.monotonic()


@dataclass(frozen=True)
class SpeedResult:
    """Sentences/s per variant, timed side by side. ``devices`` says where each was timed (``cpu`` /
    ``cuda``); ``reference`` maps each device to the row its speed-ups are taken against: the teacher, or
    ``teacher@cpu`` for CPU-only runtimes when the teacher itself was timed on a GPU."""

    sentences_per_second: dict[str, float]
    all_timings_s: dict[str, list[float]]
    sentences: int
    batch_size: int
    threads: int
    cpu: str
    devices: dict[str, str] = field(default_factory=dict)
    device_labels: dict[str, str] = field(default_factory=dict)
    reference: dict[str, str] = field(default_factory=dict)
    background_cpu_pct: float | None = None  # other processes' share of the CPU while timing (CpuWatch)

    @property
    def noisy(self) -> bool:
        """Other processes used more than ``BACKGROUND_CPU_WARN_PCT`` of the CPU while it was timed."""
        return self.background_cpu_pct is not None and self.background_cpu_pct > BACKGROUND_CPU_WARN_PCT

    def device_of(self, name: str) -> str:
        return self.devices.get(name, "cpu")

    def teacher_speed(self, name: str, teacher: str) -> float:
        """The teacher's sentences/s on the device ``name`` was timed on."""
        return self.sentences_per_second[self.reference.get(self.device_of(name), teacher)]

    def label(self, name: str) -> str:
        """Where ``name`` was timed, e.g. ``cuda (NVIDIA H200)``."""
        return self.device_labels.get(self.device_of(name), self.device_of(name))


def teacher_on_cpu(variants: list[Variant], device: str) -> Variant | None:
    """The teacher, timed again on the CPU, when the teacher runs on a GPU and some variant cannot."""
    teacher = variants[0]
    if runs_on(teacher.backend, device) == "cpu" or all(
        runs_on(v.backend, device) != "cpu" for v in variants
    ):
        return None
    return replace(teacher, name=f"{teacher.name}@cpu")


def measure_throughput(
    variants: list[Variant], data: PreparedData, config: BenchmarkConfig, device: str = "cpu"
) -> SpeedResult:
    """Sentences/second for every variant, timed side by side in this process, on ``device`` where each
    variant's runtime can run there (else on the CPU, beside the teacher timed on the CPU too)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    sentences = read_lines(data.heldout_file)[: config.speed_sentences]
    if len(sentences) < config.speed_sentences:
        log.warning(
            "only %d held-out sentences for the speed benchmark (asked %d)",
            len(sentences),
            config.speed_sentences,
        )
    cpu_teacher = teacher_on_cpu(variants, device)
    timed = variants + ([cpu_teacher] if cpu_teacher else [])
    where = {v.name: "cpu" if v is cpu_teacher else runs_on(v.backend, device) for v in timed}
    models = {}
    for variant in timed:
        shared = next(
            (
                models[v.name]
                for v in timed
                if v.name in models
                and encoder_key(v) == encoder_key(variant)
                and where[v.name] == where[variant.name]
            ),
            None,
        )
        models[variant.name] = shared or load_model(variant, where[variant.name])
        warm = sentences[: config.batch_size * config.warmup_batches]
        if warm:
            encode(models[variant.name], variant, warm, config.batch_size)
    timings: dict[str, list[float]] = {v.name: [] for v in timed}
    with CpuWatch() as watch, tqdm(total=config.repeats * len(timed), desc="throughput", unit="run") as bar:
        for _ in range(config.repeats):
            for variant in timed:
                start = time.perf_counter()
                # encode() returns numpy arrays: a GPU's work has finished (copied back) when it returns
                encode(models[variant.name], variant, sentences, config.batch_size)
                timings[variant.name].append(time.perf_counter() - start)
                bar.update(1)
    per_second = {name: len(sentences) / statistics.median(t) for name, t in timings.items()}
    for name, value in per_second.items():
        log.info("%s: %.1f sentences/s on %s", name, value, where[name])
    reference = {where[variants[0].name]: variants[0].name}
    if cpu_teacher:
        reference["cpu"] = cpu_teacher.name
    speed = SpeedResult(
        per_second,
        timings,
        len(sentences),
        config.batch_size,
        torch.get_num_threads(),
        cpu_name(),
        devices=where,
        device_labels={d: device_label(d) for d in set(where.values())},
        reference=reference,
        background_cpu_pct=watch.background_pct,
    )
    if speed.noisy:
        log.warning(
            "other processes used %.0f%% of this machine's CPU while speed was timed: this run's sentences/s "
            "and speed-ups are noisier than usual; time again with nothing else running (e.g. `distill "
            "benchmark`, or a run whose stages are all reused)",
            speed.background_cpu_pct,
        )
    return speed


@task(name="measure-throughput")
def measure_throughput_task(
    variants: list[Variant], data: PreparedData, config: BenchmarkConfig, device: str = "cpu"
) -> SpeedResult:
    """Prefect task around :func:`measure_throughput`."""
    return measure_throughput(variants, data, config, device)


def speed_metrics(speed: SpeedResult) -> dict[str, float]:
    """Run-level MLflow metrics of the speed measurement (what was going on beside it)."""
    if speed.background_cpu_pct is None:
        return {}
    return {"benchmark.background_cpu_pct": speed.background_cpu_pct}


# CPU features that change what int8 / bf16 inference costs (VNNI, AMX, AVX-512, AVX2)
_SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimd")


def machine_tags(threads: int | None = None) -> dict[str, str]:
    """Where speed was measured: CPU model and the flags that matter for int8 / bf16, GPU, threads."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "machine.cpu": cpu_name(),
        "machine.cpu_flags": " ".join(f for f in _SPEED_FLAGS if f in flags) or "unknown",
        "machine.gpu": gpu,
        "machine.threads": str(threads or torch.get_num_threads()),
        "machine.hostname": platform.node(),
    }
