"""The compress stage as steps: PCA sweep, embedding quantization, torch / OpenVINO int8, ONNX (+ int8 chain).

Each technique lives in a module of its own (``tasks.pca``, ``tasks.onnx_export``, ``tasks.openvino_quant``,
``tasks.torch_quant``, ``tasks.variants`` for embedding quantization); a step here applies one technique to
one base variant, fits what needs fitting on corpus sentences (never on evaluation sentences), records the
lineage of each result and stores its files content-addressed (:mod:`tasks.artifacts`: the key hashes the
base's key, the step's settings and the corpus), so an unchanged step is not redone by a later run.

The steps come from ``compress.steps`` (:class:`tasks.config.CompressionConfig`), each with its targets and
settings; a model step's ``then`` steps apply to its output (a chain). Each step runs as its own Prefect task
per target, with the step's retries and time limit; :func:`compress_variants` turns a failing step into a
:class:`StepFailure` (a failed row in the table) while the other steps still finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prefect import Task, task

from tasks.artifacts import ArtifactStore, stage_key
from tasks.config import (
    CompressionConfig,
    CompressStep,
    EmbBinaryStep,
    EmbInt8Step,
    OnnxInt8Step,
    OnnxStep,
    OpenVinoInt8Step,
    PcaStep,
    TorchInt8Step,
    TruncateStep,
)
from tasks.data import PreparedData, read_lines
from tasks.onnx_export import export_onnx, pick_kernel
from tasks.openvino_quant import quantize_openvino_int8
from tasks.pca import append_truncation, reduce_with_pca
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import Variant, load_model

if TYPE_CHECKING:
    from prefect.futures import PrefectFuture

log = logging.getLogger(__name__)

STAGE_VERSION = 1  # bump when a change here changes what a step produces


@dataclass(frozen=True)
class StepFailure:
    """A compress step that raised: its row is reported as failed, the other steps go on."""

    target: str
    step: str
    error: str

    @property
    def name(self) -> str:
        return f"{self.target}-{self.step}"


@dataclass(frozen=True)
class CompressInputs:
    """What every step reads: the prepared data, the teacher's corpus embeddings, the artifact store."""

    data: PreparedData
    corpus_emb: CachedEmbeddings
    artifacts: Path
    device: str = "cpu"  # where fit / calibration samples are encoded (not part of any key)

    def key(self, step: str, base: Variant, **settings: object) -> str:
        return stage_key(step, STAGE_VERSION, {"base": base.key, "corpus": self.corpus_emb.key, **settings})

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts)


def fit_sample(base: Variant, inputs: CompressInputs, rows: int) -> np.ndarray:
    """Float embeddings of the first ``rows`` corpus sentences by ``base`` (stored, so a later step or run
    does not encode them again; the teacher's come from its cache)."""
    if base.kind == "teacher":
        return np.asarray(inputs.corpus_emb.load()[:rows], dtype=np.float32)

    def build(out_dir: Path, _work: Path) -> dict:
        sentences = read_lines(inputs.data.corpus_file)[:rows]
        embeddings = load_model(base, inputs.device).encode(
            sentences, batch_size=64, convert_to_numpy=True, show_progress_bar=True
        )
        np.save(out_dir / "embeddings.npy", embeddings.astype(np.float32), allow_pickle=False)
        return {"rows": len(sentences)}

    key = inputs.key("fit-sample", base, rows=rows)
    entry = inputs.store().build("fit-sample", key, build, f"{base.name} fit sample")
    return np.load(entry.path / "embeddings.npy", allow_pickle=False)


def int8_ranges(
    embeddings: np.ndarray, calibration: str = "minmax", clip_percentile: float = 0.0
) -> np.ndarray:
    """The int8 grid fitted on calibration embeddings: 2 x dim, each dimension's lower and upper end, as
    ``quantize_embeddings(..., ranges=...)`` takes them (it maps ``[low, high]`` onto -128..127 in 256 equal
    steps, clipping what lies outside).

    - ``minmax``: each dimension's min and max. Each dimension is centred on its midpoint and scaled by its
      own range, so the cosine of two int8 vectors is the cosine of centred, reweighted vectors.
    - ``percentile``: each dimension's ``clip_percentile`` and ``100 - clip_percentile`` percentiles
      (outliers clipped; centred and scaled per dimension like ``minmax``).
    - ``symmetric``: centred on zero with one step for every dimension, sized so that the
      ``100 - clip_percentile`` percentile of the absolute values over all dimensions maps to 127: the int8
      vector is ``round(x / step)`` (clipped), so its cosines are the float cosines up to rounding.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"int8 calibration needs a non-empty 2-d array of embeddings, got shape {x.shape}")
    if calibration == "minmax":
        low, high = x.min(axis=0), x.max(axis=0)
    elif calibration == "percentile":
        low, high = np.percentile(x, [clip_percentile, 100 - clip_percentile], axis=0)
    elif calibration == "symmetric":
        bound = float(np.percentile(np.abs(x), 100 - clip_percentile))
        step = (bound if bound > 0 else 1.0) / 127
        # quantize_embeddings computes floor((x - low) / step) - 128 with step = (high - low) / 255; these
        # ends make that round(x / step): 0 stays 0 and +-bound becomes +-127
        low, high = np.full(x.shape[1], -128.5 * step), np.full(x.shape[1], 126.5 * step)
    else:
        raise ValueError(f"unknown int8 calibration {calibration!r}: use symmetric, minmax or percentile")
    return np.vstack((low, high)).astype(np.float32)


# --- steps: each takes a base variant and returns the variants it made ---------------------------------


def head_on(base: Variant) -> Path | None:
    """The network a reduction of ``base`` extends by one Dense: ``base``'s folder where it is a plain torch
    network with float output (quality scoring then encodes it once for both); else none."""
    plain = base.backend == "torch" and base.precision == "float32" and base.head_on is None
    return Path(base.model_dir) if plain else None


def pca_step(base: Variant, step: PcaStep, inputs: CompressInputs) -> list[Variant]:
    made = []
    for dims in step.dims:

        def build(out_dir: Path, _work: Path, dims: int = dims) -> dict:
            start = time.perf_counter()
            fit = fit_sample(base, inputs, step.fit_sentences)
            result = reduce_with_pca(base.model_dir, fit, dims, out_dir / "model")
            return {"explained_variance": result.explained_variance, "seconds": time.perf_counter() - start}

        key = inputs.key("pca", base, dims=dims, rows=step.fit_sentences)
        entry = inputs.store().build("pca", key, build, f"{base.name}-pca{dims}")
        made.append(
            base.derive(
                f"{base.name}-pca{dims}",
                "pca",
                f"pca{dims}",
                {
                    "pca_dims": str(dims),
                    "fit_sentences": str(step.fit_sentences),
                    "explained_variance": f"{entry.result['explained_variance']:.4f}",
                },
                model_dir=entry.path / "model",
                head_on=head_on(base),
                build_seconds=entry.result["seconds"],
                key=key,
                reused=entry.reused,
            )
        )
    return made


def truncate_step(base: Variant, step: TruncateStep, inputs: CompressInputs) -> list[Variant]:
    made = []
    for dims in step.dims:

        def build(out_dir: Path, _work: Path, dims: int = dims) -> dict:
            start = time.perf_counter()
            append_truncation(base.model_dir, dims, out_dir / "model")
            return {"seconds": time.perf_counter() - start}

        key = inputs.key("truncate", base, dims=dims)
        entry = inputs.store().build("truncate", key, build, f"{base.name}-dim{dims}")
        made.append(
            base.derive(
                f"{base.name}-dim{dims}",
                "truncated",
                f"truncate{dims}",
                {"truncate_dims": str(dims)},
                model_dir=entry.path / "model",
                head_on=head_on(base),
                build_seconds=entry.result["seconds"],
                key=key,
                reused=entry.reused,
            )
        )
    return made


def emb_int8_step(base: Variant, step: EmbInt8Step, inputs: CompressInputs) -> list[Variant]:
    """int8 vectors, their grid fitted (``step.calibration``) on the base's own corpus embeddings."""
    rows = step.calibration_sentences
    calibration, clip = step.calibration, step.effective_clip_percentile()

    def build(out_dir: Path, _work: Path) -> dict:
        start = time.perf_counter()
        embeddings = fit_sample(base, inputs, rows)
        np.save(out_dir / "int8-ranges.npy", int8_ranges(embeddings, calibration, clip), allow_pickle=False)
        return {
            "calibration_sentences": len(embeddings),
            "calibration": calibration,
            "clip_percentile": clip,
            "seconds": time.perf_counter() - start,
        }

    # minmax keeps the key it had before there was a choice (its stored ranges are still right); every other
    # method and percentile is a different grid, with a key of its own
    method = {} if calibration == "minmax" else {"calibration": calibration, "clip_percentile": clip}
    key = inputs.key("int8-ranges", base, rows=rows, **method)
    entry = inputs.store().build("int8-ranges", key, build, f"{base.name} int8 ranges ({calibration})")
    return [
        base.derive(
            f"{base.name}-emb-int8",
            "embedding-quantized",
            "emb-int8",
            {
                "calibration_sentences": str(entry.result["calibration_sentences"]),
                "calibration": calibration,
                "clip_percentile": str(clip),
            },
            precision="int8",
            calibration_file=entry.path / "int8-ranges.npy",
            build_seconds=base.build_seconds + entry.result["seconds"],
            key=key,
            reused=entry.reused,
        )
    ]


def emb_binary_step(base: Variant, step: EmbBinaryStep, inputs: CompressInputs) -> list[Variant]:
    """Binary vectors (1 bit per dimension): nothing to fit or store; with ``rescore``, also the row that
    scores them against float queries."""
    binary = base.derive(
        f"{base.name}-emb-binary", "embedding-quantized", "emb-ubinary", {"calibration_sentences": "0"},
        precision="ubinary",
    )  # fmt: skip
    if not step.rescore:
        return [binary]
    rescored = base.derive(
        f"{base.name}-emb-binary-rescore", "embedding-quantized", "emb-ubinary-rescore",
        {"calibration_sentences": "0", "rescore": "float query vs binary vector"},
        precision="ubinary", rescore=True,
    )  # fmt: skip
    return [binary, rescored]


def torch_int8_step(base: Variant, step: TorchInt8Step, inputs: CompressInputs) -> list[Variant]:
    """PyTorch dynamic int8, applied when the model is loaded: nothing to store."""
    settings = {"per_channel": str(step.per_channel), "exclude": ",".join(step.exclude)}
    return [
        base.derive(
            f"{base.name}-torch-int8",
            "quantized",
            "torch-int8",
            settings,
            backend="torch-int8",
            int8_exclude=step.exclude,
            int8_per_channel=step.per_channel,
        )
    ]


def openvino_int8_step(base: Variant, step: OpenVinoInt8Step, inputs: CompressInputs) -> list[Variant]:
    rows = step.calibration_sentences

    def build(out_dir: Path, _work: Path) -> dict:
        calibration = read_lines(inputs.data.corpus_file)[:rows]
        result = quantize_openvino_int8(base.model_dir, out_dir / "model", calibration)
        return {"model_file": result.int8_file, "calibration": len(calibration), "seconds": result.seconds}

    key = inputs.key("openvino-int8", base, rows=rows)
    entry = inputs.store().build("openvino-int8", key, build, f"{base.name}-openvino-int8")
    model_file = entry.result["model_file"]
    return [
        base.derive(
            f"{base.name}-openvino-int8",
            "quantized",
            "openvino-int8",
            {"model_file": model_file, "calibration_sentences": str(entry.result["calibration"])},
            model_dir=entry.path / "model",
            backend="openvino",
            model_file=model_file,
            build_seconds=entry.result["seconds"],
            key=key,
            reused=entry.reused,
        )
    ]


def _onnx_export(base: Variant, inputs: CompressInputs, kernel: str | None):
    def build(out_dir: Path, _work: Path) -> dict:
        export = export_onnx(base.model_dir, out_dir / "model", kernel)
        return {
            "fp32_file": export.fp32_file,
            "int8_file": export.int8_file,
            "kernel": export.kernel,
            "seconds": export.export_seconds + export.quantize_seconds,
        }

    step = "onnx-int8" if kernel else "onnx"
    return inputs.store().build(step, inputs.key(step, base, kernel=kernel), build, f"{base.name}-{step}")


def onnx_step(base: Variant, step: OnnxStep, inputs: CompressInputs) -> list[Variant]:
    """ONNX fp32 export, run by ONNX Runtime."""
    entry = _onnx_export(base, inputs, None)
    model_file = entry.result["fp32_file"]
    return [
        base.derive(
            f"{base.name}-onnx",
            "quantized",
            "onnx",
            {"model_file": model_file},
            model_dir=entry.path / "model",
            backend="onnx",
            model_file=model_file,
            build_seconds=entry.result["seconds"],
            key=entry.key,
            reused=entry.reused,
        )
    ]


def onnx_int8_step(base: Variant, step: OnnxInt8Step, inputs: CompressInputs) -> list[Variant]:
    """ONNX export + ONNX Runtime dynamic int8 with the kernel this CPU runs best (or the one asked for)."""
    entry = _onnx_export(base, inputs, pick_kernel(step.kernel))
    result = entry.result
    return [
        base.derive(
            f"{base.name}-onnx-int8",
            "quantized",
            f"onnx-int8-{result['kernel']}",
            {"model_file": result["int8_file"], "kernel": str(result["kernel"])},
            model_dir=entry.path / "model",
            backend="onnx",
            model_file=result["int8_file"],
            build_seconds=result["seconds"],
            key=entry.key,
            reused=entry.reused,
        )
    ]


STEPS: dict[str, Callable[..., list[Variant]]] = {
    "pca": pca_step,
    "truncate": truncate_step,
    "emb-int8": emb_int8_step,
    "emb-binary": emb_binary_step,
    "torch-int8": torch_int8_step,
    "openvino-int8": openvino_int8_step,
    "onnx": onnx_step,
    "onnx-int8": onnx_int8_step,
}
# One Prefect task per technique, so the UI shows each step with its own state and duration.
STEP_TASKS = {name: task(step, name=f"compress-{name}", log_prints=False) for name, step in STEPS.items()}

RunStep = Callable[[CompressStep, Variant, CompressInputs], list[Variant]]
# Submits a step to a Dask cluster (flows.runner) and returns its Prefect future.
SubmitStep = Callable[[CompressStep, Variant, CompressInputs], "PrefectFuture[list[Variant]]"]


def run_step_in_process(step: CompressStep, base: Variant, inputs: CompressInputs) -> list[Variant]:
    return STEPS[step.technique](base, step, inputs)


def step_task(step: CompressStep, base: Variant) -> Task[..., list[Variant]]:
    """The step's Prefect task, named after its target, with the step's retries and time limit."""
    return STEP_TASKS[step.technique].with_options(
        task_run_name=f"compress-{step.technique}-{base.name}",
        retries=step.retries,
        timeout_seconds=step.timeout_seconds,
    )


def run_step_as_task(step: CompressStep, base: Variant, inputs: CompressInputs) -> list[Variant]:
    """Run a step as its Prefect task, with the step's retries and time limit; raises what it raised."""
    return step_task(step, base)(base, step, inputs, return_state=True).result()


Outcome = list[Variant] | Exception  # what a step made, or why it failed


def _outcome(step: CompressStep, base: Variant, run: Callable[[], list[Variant]]) -> Outcome:
    try:
        return run()
    except Exception as exc:  # one step's failure is its row's, not the run's
        log.error("compress step %s on %s failed: %s: %s", step.technique, base.name, type(exc).__name__, exc)
        return exc


def compress_variants(
    bases: list[Variant],
    config: CompressionConfig,
    data: PreparedData,
    corpus_emb: CachedEmbeddings,
    artifacts: Path,
    run_step: RunStep = run_step_in_process,
    submit_step: SubmitStep | None = None,
    device: str = "cpu",
) -> tuple[list[Variant], list[StepFailure]]:
    """New variants made from ``bases`` by the active steps (per base, in step order, each followed by its
    chained ``then`` steps), and the steps that failed (the rest go on).

    With ``submit_step`` (a Dask cluster) every step is submitted at once, and a chained step as soon as the
    step it follows has made its output; both lists come out in the same order as with ``run_step``.
    """
    inputs = CompressInputs(data, corpus_emb, Path(artifacts), device)
    steps = config.active_steps()
    plan = [(step, base) for base in bases for step in steps if base.name in step.targets]
    first: list[Outcome] = []
    chained: dict[tuple[int, int, int], Outcome] = {}  # (plan index, output index, then index)
    if submit_step is None:
        for i, (step, base) in enumerate(plan):
            first.append(_outcome(step, base, partial(run_step, step, base, inputs)))
            for j, output in enumerate(_made(first[i])):
                for k, then in enumerate(getattr(step, "then", ())):
                    chained[i, j, k] = _outcome(then, output, partial(run_step, then, output, inputs))
    else:
        from prefect.futures import as_completed

        futures = {submit_step(step, base, inputs): i for i, (step, base) in enumerate(plan)}
        first = [[] for _ in plan]
        waiting: dict[tuple[int, int, int], tuple[CompressStep, Variant, PrefectFuture[list[Variant]]]] = {}
        for future in as_completed(list(futures)):
            i = futures[future]
            step, base = plan[i]
            first[i] = _outcome(step, base, future.result)
            for j, output in enumerate(_made(first[i])):
                for k, then in enumerate(getattr(step, "then", ())):
                    waiting[i, j, k] = (then, output, submit_step(then, output, inputs))
        chained = {
            key: _outcome(then, output, future.result) for key, (then, output, future) in waiting.items()
        }

    made: list[Variant] = []
    failures: list[StepFailure] = []

    def keep(step: CompressStep, base: Variant, outcome: Outcome) -> list[Variant]:
        if isinstance(outcome, Exception):
            failures.append(StepFailure(base.name, step.technique, f"{type(outcome).__name__}: {outcome}"))
            return []
        return outcome

    for i, (step, base) in enumerate(plan):
        for j, output in enumerate(keep(step, base, first[i])):
            made.append(output)
            for k, then in enumerate(getattr(step, "then", ())):
                made += keep(then, output, chained[i, j, k])
    log.info("compress stage made %d variants: %s", len(made), [v.name for v in made])
    if failures:
        log.warning("compress steps failed: %s", [f.name for f in failures])
    return made, failures


def _made(outcome: Outcome) -> list[Variant]:
    return [] if isinstance(outcome, Exception) else outcome
