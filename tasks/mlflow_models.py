"""Log each variant as an MLflow model that loads back and returns the vectors the benchmark scored.

- A plain SentenceTransformer (torch, float32 vectors: teacher, students, PCA, static) is logged with the
  ``sentence_transformers`` flavor: ``mlflow.sentence_transformers.load_model(uri)`` gives the model, and
  ``mlflow.pyfunc.load_model(uri).predict(sentences)`` its vectors.
- Everything else (ONNX / OpenVINO graphs, torch dynamic int8, int8 or binary vectors) is a pyfunc model
  from code (:mod:`tasks.variant_pyfunc`): the files the variant runs on, ``variant.json`` saying how to run
  them, and this package's code, so ``mlflow.pyfunc.load_model(uri).predict(sentences)`` runs it the way
  the benchmark did.

Both carry a signature (a string column in; float32, int8 or uint8 vectors out), an input example and the
pinned requirements of this environment (no requirement inference, which would load every model again).
A rescoring row (binary vectors stored, float queries) takes the param ``side``: ``document`` (the default)
gives the stored bits, ``query`` the float vectors that are scored against them.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from tasks.models import load_sentence_transformer
from tasks.variants import Precision, Variant, runtime_spec, variant_files

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # runs:/<child run id>/model
INPUT_EXAMPLE = ["A man is playing a guitar.", "A cat sits on the mat."]
_PACKAGE_DIR = Path(__file__).resolve().parent
_OUTPUT_DTYPES: dict[str, str] = {"float32": "float32", "int8": "int8", "ubinary": "uint8"}
_BACKEND_PACKAGES = {
    "torch": (),
    "torch-int8": (),
    "onnx": ("optimum", "onnxruntime", "onnx"),
    "openvino": ("optimum-intel", "openvino"),
}


def is_sentence_transformer(variant: Variant) -> bool:
    """Whether the variant is a plain SentenceTransformer folder (logged with the flavor of that name)."""
    return variant.backend == "torch" and variant.precision == "float32"


def signature(embedding_dim: int, precision: Precision, rescore: bool = False) -> ModelSignature:
    """Strings in; one vector per string out, as the variant stores it (packed bits: dim / 8 bytes). A
    rescoring row also takes ``side`` (``document`` | ``query``: the float query vectors)."""
    width = -(-embedding_dim // 8) if precision == "ubinary" else embedding_dim
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype(_OUTPUT_DTYPES[precision]), (-1, width))]),
        params=ParamSchema([ParamSpec("side", "string", "document")]) if rescore else None,
    )


def pip_requirements(variant: Variant) -> list[str]:
    """This environment's versions of what loading the variant needs."""
    names = ("sentence-transformers", "transformers", "torch", "numpy", "pandas")
    names += _BACKEND_PACKAGES[variant.backend]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@contextmanager
def active_run(run_id: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run in this thread (``log_model`` logs to the active run), then
    restore the previous one. The caller ends the run with the status it chooses."""
    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield
        return
    mlflow.start_run(run_id=run_id, nested=current is not None)
    try:
        yield
    finally:
        mlflow.end_run()


def log_variant_model(variant: Variant, run_id: str, embedding_dim: int) -> str:
    """Log ``variant`` as the MLflow model ``model`` of run ``run_id``; returns its ``models:/`` URI."""
    start = time.perf_counter()
    sig = signature(embedding_dim, variant.precision, variant.rescore)
    with active_run(run_id):
        if is_sentence_transformer(variant):
            info = mlflow.sentence_transformers.log_model(
                load_sentence_transformer(variant.model_dir),
                name=MODEL_NAME,
                signature=sig,
                input_example=INPUT_EXAMPLE,
                pip_requirements=pip_requirements(variant),
            )
        else:
            with tempfile.TemporaryDirectory(prefix="variant-model-") as tmp:
                artifacts = stage_pyfunc_artifacts(variant, Path(tmp))
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(_PACKAGE_DIR / "variant_pyfunc.py"),
                    artifacts=artifacts,
                    code_paths=[str(Path(tmp) / "code" / "tasks")],
                    signature=sig,
                    input_example=INPUT_EXAMPLE,
                    pip_requirements=pip_requirements(variant),
                )
    log.info("logged %s as an MLflow model in %.1f s", variant.name, time.perf_counter() - start)
    return info.model_uri


def stage_pyfunc_artifacts(variant: Variant, tmp: Path) -> dict[str, str]:
    """Copy into ``tmp`` what the pyfunc model needs: the variant's files only (hard links where the file
    system allows), its runtime spec, the int8 ranges and this package's code."""
    root = Path(variant.model_dir)
    model_dir = tmp / "model"
    for file in variant_files(variant):
        target = model_dir / file.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(file)
        except OSError:
            shutil.copy2(file, target)
    spec_file = tmp / "variant.json"
    spec_file.write_text(json.dumps(runtime_spec(variant), indent=2), encoding="utf-8")
    artifacts = {"model": str(model_dir), "variant": str(spec_file)}
    if variant.calibration_file is not None:
        artifacts["calibration"] = str(variant.calibration_file)
    shutil.copytree(_PACKAGE_DIR, tmp / "code" / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    return artifacts
