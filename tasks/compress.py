"""The compress stage: PCA sweep, torch / ONNX / OpenVINO int8, embedding quantization and chains.

Each compression lives in a module of its own (``tasks.pca``, ``tasks.onnx_export``, ``tasks.variants`` for
embedding quantization); this task decides which to apply to which base variant, fits what needs fitting on
corpus sentences (never on evaluation sentences) and records the lineage of each result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from prefect import task

from tasks.config import CompressionConfig
from tasks.data import PreparedData, read_lines
from tasks.onnx_export import export_onnx, pick_kernel
from tasks.openvino_quant import quantize_openvino_int8
from tasks.pca import reduce_with_pca
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import Variant, load_model

log = logging.getLogger(__name__)


def fit_sample(base: Variant, data: PreparedData, corpus_emb: CachedEmbeddings, rows: int) -> np.ndarray:
    """Float embeddings of the first ``rows`` corpus sentences by ``base`` (cached ones for the teacher)."""
    if base.kind == "teacher":
        return np.asarray(corpus_emb.load()[:rows], dtype=np.float32)
    sentences = read_lines(data.corpus_file)[:rows]
    return load_model(base).encode(sentences, batch_size=64, convert_to_numpy=True, show_progress_bar=True)


def int8_ranges(embeddings: np.ndarray, path: Path) -> Path:
    """Per-dimension min and max (2 x dim) of calibration embeddings, saved as .npy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32))
    return path


@task(name="compress")
def compress_variants(
    bases: list[Variant],
    config: CompressionConfig,
    data: PreparedData,
    corpus_emb: CachedEmbeddings,
    out_root: Path,
) -> list[Variant]:
    """New variants made from ``bases`` as the config asks (PCA, ONNX, int8, binary, chains)."""
    kernel = pick_kernel(config.onnx_kernel) if config.onnx_int8 else None
    made: list[Variant] = []
    for base in bases:
        wants_pca = base.name in config.pca_targets and config.pca_dims
        wants_rest = base.name in config.targets
        if not (wants_pca or wants_rest):
            continue
        start = time.perf_counter()
        fit = fit_sample(base, data, corpus_emb, config.pca_fit_sentences)
        fit_seconds = time.perf_counter() - start
        folder = Path(out_root) / base.name
        folder.mkdir(parents=True, exist_ok=True)

        if wants_pca:
            for dims in config.pca_dims:
                result = reduce_with_pca(base.model_dir, fit, dims, folder / f"pca{dims}")
                made.append(
                    base.derive(
                        f"{base.name}-pca{dims}",
                        "pca",
                        f"pca{dims}",
                        {"pca_dims": str(dims), "explained_variance": f"{result.explained_variance:.4f}"},
                        model_dir=result.model_dir,
                        build_seconds=fit_seconds + result.seconds,
                    )
                )
        if not wants_rest:
            continue

        ranges = int8_ranges(fit, folder / "int8-ranges.npy")
        for precision in config.embedding_precisions:
            int8 = precision == "int8"
            made.append(
                base.derive(
                    f"{base.name}-emb-{'binary' if precision == 'ubinary' else precision}",
                    "embedding-quantized",
                    f"emb-{precision}",
                    {"calibration_sentences": str(len(fit)) if int8 else "0"},
                    precision=precision,
                    calibration_file=ranges if int8 else None,
                    build_seconds=fit_seconds if int8 else 0.0,
                )
            )
        if config.torch_int8:
            made.append(
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
            )
        if config.openvino_int8:
            calibration = read_lines(data.corpus_file)[: config.openvino_calibration_sentences]
            openvino = quantize_openvino_int8(base.model_dir, folder / "openvino-model", calibration)
            made.append(
                base.derive(
                    f"{base.name}-openvino-int8",
                    "quantized",
                    "openvino-int8",
                    {"model_file": openvino.int8_file, "calibration_sentences": str(len(calibration))},
                    model_dir=openvino.model_dir,
                    backend="openvino",
                    model_file=openvino.int8_file,
                    build_seconds=openvino.seconds,
                )
            )
        if not (config.onnx or config.onnx_int8):
            continue
        export = export_onnx(base.model_dir, folder / "onnx-model", kernel)
        onnx = {"model_dir": export.model_dir, "backend": "onnx"}
        if config.onnx:
            made.append(
                base.derive(
                    f"{base.name}-onnx",
                    "quantized",
                    "onnx",
                    {"model_file": export.fp32_file},
                    model_file=export.fp32_file,
                    build_seconds=export.export_seconds,
                    **onnx,
                )
            )
        if not export.int8_file:
            continue
        int8_model = base.derive(
            f"{base.name}-onnx-int8",
            "quantized",
            f"onnx-int8-{export.kernel}",
            {"model_file": export.int8_file, "kernel": str(export.kernel)},
            model_file=export.int8_file,
            build_seconds=export.export_seconds + export.quantize_seconds,
            **onnx,
        )
        made.append(int8_model)
        if config.chain and "int8" in config.embedding_precisions:
            start = time.perf_counter()
            sentences = read_lines(data.corpus_file)[: config.pca_fit_sentences]
            calibration = load_model(int8_model).encode(sentences, batch_size=64, convert_to_numpy=True)
            made.append(
                int8_model.derive(
                    f"{int8_model.name}-emb-int8",
                    "embedding-quantized",
                    "emb-int8",
                    {"calibration_sentences": str(len(sentences))},
                    precision="int8",
                    calibration_file=int8_ranges(calibration, folder / "onnx-int8-ranges.npy"),
                    build_seconds=int8_model.build_seconds + time.perf_counter() - start,
                )
            )
    log.info("compress stage made %d variants: %s", len(made), [v.name for v in made])
    return made
