"""The compress stage as steps: PCA sweep, embedding quantization, torch / OpenVINO int8, ONNX (+ int8 chain).

Each technique lives in a module of its own (``tasks.pca``, ``tasks.onnx_export``, ``tasks.openvino_quant``,
``tasks.torch_quant``, ``tasks.variants`` for embedding quantization); a step here applies one technique to
one base variant, fits what needs fitting on corpus sentences (never on evaluation sentences), records the
lineage of each result and stores its files content-addressed (:mod:`tasks.artifacts`: the key hashes the
base's key, the step's settings and the corpus), so an unchanged step is not redone by a later run.

Each step is its own Prefect task; :func:`compress_variants` runs them one by one and turns a failing step
into a :class:`StepFailure` (a failed row in the table) while the other steps still finish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task

from tasks.artifacts import ArtifactStore, stage_key
from tasks.config import CompressionConfig
from tasks.data import PreparedData, read_lines
from tasks.onnx_export import export_onnx, pick_kernel
from tasks.openvino_quant import quantize_openvino_int8
from tasks.pca import reduce_with_pca
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import Variant, load_model

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
    """What every step reads: the config, the prepared data, the teacher's corpus embeddings, the store."""

    config: CompressionConfig
    data: PreparedData
    corpus_emb: CachedEmbeddings
    artifacts: Path

    def key(self, step: str, base: Variant, **settings: object) -> str:
        return stage_key(step, STAGE_VERSION, {"base": base.key, "corpus": self.corpus_emb.key, **settings})

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts)


def fit_sample(base: Variant, inputs: CompressInputs) -> np.ndarray:
    """Float embeddings of the first ``pca_fit_sentences`` corpus sentences by ``base`` (stored, so a
    later step or run does not encode them again; the teacher's come from its cache)."""
    rows = inputs.config.pca_fit_sentences
    if base.kind == "teacher":
        return np.asarray(inputs.corpus_emb.load()[:rows], dtype=np.float32)

    def build(out_dir: Path, _work: Path) -> dict:
        sentences = read_lines(inputs.data.corpus_file)[:rows]
        embeddings = load_model(base).encode(
            sentences, batch_size=64, convert_to_numpy=True, show_progress_bar=True
        )
        np.save(out_dir / "embeddings.npy", embeddings.astype(np.float32), allow_pickle=False)
        return {"rows": len(sentences)}

    key = inputs.key("fit-sample", base, rows=rows)
    entry = inputs.store().build("fit-sample", key, build, f"{base.name} fit sample")
    return np.load(entry.path / "embeddings.npy", allow_pickle=False)


def int8_ranges(embeddings: np.ndarray, path: Path) -> Path:
    """Per-dimension min and max (2 x dim) of calibration embeddings, saved as .npy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32))
    return path


def _ranges_entry(base: Variant, inputs: CompressInputs, sample: Callable[[], np.ndarray]):
    def build(out_dir: Path, _work: Path) -> dict:
        embeddings = sample()
        int8_ranges(embeddings, out_dir / "int8-ranges.npy")
        return {"calibration_sentences": len(embeddings)}

    key = inputs.key("int8-ranges", base, rows=inputs.config.pca_fit_sentences)
    return inputs.store().build("int8-ranges", key, build, f"{base.name} int8 ranges")


# --- steps: each takes a base variant and returns the variants it made ---------------------------------


def pca_step(base: Variant, inputs: CompressInputs) -> list[Variant]:
    made = []
    for dims in inputs.config.pca_dims:

        def build(out_dir: Path, _work: Path, dims: int = dims) -> dict:
            start = time.perf_counter()
            fit = fit_sample(base, inputs)
            result = reduce_with_pca(base.model_dir, fit, dims, out_dir / "model")
            return {"explained_variance": result.explained_variance, "seconds": time.perf_counter() - start}

        key = inputs.key("pca", base, dims=dims, rows=inputs.config.pca_fit_sentences)
        entry = inputs.store().build("pca", key, build, f"{base.name}-pca{dims}")
        made.append(
            base.derive(
                f"{base.name}-pca{dims}",
                "pca",
                f"pca{dims}",
                {"pca_dims": str(dims), "explained_variance": f"{entry.result['explained_variance']:.4f}"},
                model_dir=entry.path / "model",
                build_seconds=entry.result["seconds"],
                key=key,
                reused=entry.reused,
            )
        )
    return made


def embedding_step(base: Variant, inputs: CompressInputs) -> list[Variant]:
    """int8 (per-dimension ranges calibrated on the base's corpus embeddings) and binary vectors."""
    made = []
    for precision in inputs.config.embedding_precisions:
        name = f"{base.name}-emb-{'binary' if precision == 'ubinary' else precision}"
        if precision == "int8":
            entry = _ranges_entry(base, inputs, lambda: fit_sample(base, inputs))
            rows = entry.result["calibration_sentences"]
            made.append(
                base.derive(
                    name,
                    "embedding-quantized",
                    "emb-int8",
                    {"calibration_sentences": str(rows)},
                    precision="int8",
                    calibration_file=entry.path / "int8-ranges.npy",
                    key=entry.key,
                    reused=entry.reused,
                )
            )
        else:
            made.append(
                base.derive(
                    name,
                    "embedding-quantized",
                    f"emb-{precision}",
                    {"calibration_sentences": "0"},
                    precision=precision,
                )
            )
    return made


def torch_int8_step(base: Variant, inputs: CompressInputs) -> list[Variant]:
    """PyTorch dynamic int8, applied when the model is loaded: nothing to store."""
    config = inputs.config
    return [
        base.derive(
            f"{base.name}-torch-int8",
            "quantized",
            "torch-int8",
            {
                "per_channel": str(config.torch_int8_per_channel),
                "exclude": ",".join(config.torch_int8_exclude),
            },
            backend="torch-int8",
            int8_exclude=config.torch_int8_exclude,
            int8_per_channel=config.torch_int8_per_channel,
        )
    ]


def openvino_int8_step(base: Variant, inputs: CompressInputs) -> list[Variant]:
    rows = inputs.config.openvino_calibration_sentences

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


def onnx_step(base: Variant, inputs: CompressInputs) -> list[Variant]:
    """ONNX fp32 export, ONNX Runtime dynamic int8 and, with ``chain``, int8 model + int8 embeddings."""
    config = inputs.config
    kernel = pick_kernel(config.onnx_kernel) if config.onnx_int8 else None

    def build(out_dir: Path, _work: Path) -> dict:
        export = export_onnx(base.model_dir, out_dir / "model", kernel)
        return {
            "fp32_file": export.fp32_file,
            "int8_file": export.int8_file,
            "kernel": export.kernel,
            "export_seconds": export.export_seconds,
            "quantize_seconds": export.quantize_seconds,
        }

    key = inputs.key("onnx", base, kernel=kernel)
    entry = inputs.store().build("onnx", key, build, f"{base.name}-onnx")
    export = entry.result
    onnx = {"model_dir": entry.path / "model", "backend": "onnx", "reused": entry.reused}
    made = []
    if config.onnx:
        made.append(
            base.derive(
                f"{base.name}-onnx",
                "quantized",
                "onnx",
                {"model_file": export["fp32_file"]},
                model_file=export["fp32_file"],
                build_seconds=export["export_seconds"],
                key=f"{key}-fp32",
                **onnx,
            )
        )
    if not export["int8_file"]:
        return made
    int8_model = base.derive(
        f"{base.name}-onnx-int8",
        "quantized",
        f"onnx-int8-{export['kernel']}",
        {"model_file": export["int8_file"], "kernel": str(export["kernel"])},
        model_file=export["int8_file"],
        build_seconds=export["export_seconds"] + export["quantize_seconds"],
        key=f"{key}-int8",
        **onnx,
    )
    made.append(int8_model)
    if config.chain and "int8" in config.embedding_precisions:

        def sample() -> np.ndarray:
            sentences = read_lines(inputs.data.corpus_file)[: config.pca_fit_sentences]
            return load_model(int8_model).encode(sentences, batch_size=64, convert_to_numpy=True)

        ranges = _ranges_entry(int8_model, inputs, sample)
        made.append(
            int8_model.derive(
                f"{int8_model.name}-emb-int8",
                "embedding-quantized",
                "emb-int8",
                {"calibration_sentences": str(ranges.result["calibration_sentences"])},
                precision="int8",
                calibration_file=ranges.path / "int8-ranges.npy",
                build_seconds=int8_model.build_seconds,
                key=ranges.key,
                reused=ranges.reused,
            )
        )
    return made


Step = Callable[[Variant, CompressInputs], list[Variant]]
STEPS: dict[str, Step] = {
    "pca": pca_step,
    "embeddings": embedding_step,
    "torch-int8": torch_int8_step,
    "openvino-int8": openvino_int8_step,
    "onnx": onnx_step,
}
# One Prefect task per step, so the UI shows each with its own state and duration.
STEP_TASKS = {name: task(step, name=f"compress-{name}", log_prints=False) for name, step in STEPS.items()}


def plan_steps(base: Variant, config: CompressionConfig) -> list[str]:
    """The steps ``config`` asks for on ``base``, in order."""
    steps = []
    if base.name in config.pca_targets and config.pca_dims:
        steps.append("pca")
    if base.name in config.targets:
        steps += ["embeddings"] if config.embedding_precisions else []
        steps += ["torch-int8"] if config.torch_int8 else []
        steps += ["openvino-int8"] if config.openvino_int8 else []
        steps += ["onnx"] if config.onnx or config.onnx_int8 else []
    return steps


def run_step_in_process(name: str, base: Variant, inputs: CompressInputs) -> list[Variant]:
    return STEPS[name](base, inputs)


def run_step_as_task(name: str, base: Variant, inputs: CompressInputs) -> list[Variant]:
    """Run a step as its Prefect task; raises what the step raised."""
    state = STEP_TASKS[name].with_options(task_run_name=f"compress-{name}-{base.name}")(
        base, inputs, return_state=True
    )
    return state.result()


def compress_variants(
    bases: list[Variant],
    config: CompressionConfig,
    data: PreparedData,
    corpus_emb: CachedEmbeddings,
    artifacts: Path,
    run_step: Callable[[str, Variant, CompressInputs], list[Variant]] = run_step_in_process,
) -> tuple[list[Variant], list[StepFailure]]:
    """New variants made from ``bases`` as the config asks, and the steps that failed (the rest go on)."""
    inputs = CompressInputs(config, data, corpus_emb, Path(artifacts))
    made: list[Variant] = []
    failures: list[StepFailure] = []
    for base in bases:
        for step in plan_steps(base, config):
            try:
                made += run_step(step, base, inputs)
            except Exception as exc:  # one step's failure is its row's, not the run's
                log.error("compress step %s on %s failed: %s: %s", step, base.name, type(exc).__name__, exc)
                failures.append(StepFailure(base.name, step, f"{type(exc).__name__}: {exc}"))
    log.info("compress stage made %d variants: %s", len(made), [v.name for v in made])
    if failures:
        log.warning("compress steps failed: %s", [f.name for f in failures])
    return made, failures
