"""A variant = a model folder plus how to run it (torch / ONNX / OpenVINO) and how its vectors are stored.

Every row of the trade-off table is a ``Variant``. ``load_model`` and ``encode`` are the one place that knows
how to run each kind, so quality, MSE and speed are measured the same way for all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from tasks.devices import runs_on
from tasks.models import dir_size_bytes, load_sentence_transformer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Kind = Literal[
    "teacher", "layer-reduced", "light", "static", "pca", "truncated", "quantized", "embedding-quantized"
]
Precision = Literal["float32", "int8", "ubinary"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".xml")
# Files beside a graph that hold its weights: ONNX external data, OpenVINO's .bin next to the .xml.
_COMPANIONS = {".onnx": ".onnx_data", ".xml": ".bin"}


@dataclass(frozen=True)
class Variant:
    """One model in the trade-off table.

    Args:
        name: Row name (also the MLflow child-run name).
        kind: teacher / layer-reduced / light / static / pca / truncated / quantized / embedding-quantized.
        model_dir: SentenceTransformer folder.
        parent: The variant this one was made from (lineage).
        backend: ``torch``, ``onnx``, ``openvino`` or ``torch-int8`` (dynamic int8 applied at load).
        model_file: ONNX / OpenVINO file inside ``model_dir`` (e.g. ``onnx/model_qint8_avx2.onnx``).
        precision: How output vectors are stored: float32, int8 (calibrated ranges) or ubinary (1 bit/dim).
        calibration_file: ``.npy`` with the int8 ranges (2 x dim: each dimension's lower and upper end of
            the int8 grid, as ``quantize_embeddings(ranges=...)`` takes them; ``tasks.compress.int8_ranges``).
        rescore: For ``ubinary``: score each stored binary vector against the other sentence's float vector
            (the query side, never stored), as sentence-transformers' rescoring does; STS pairs are scored
            as (float sentence1, binary sentence2).
        int8_exclude: For ``torch-int8``: regexes of module names kept in float32.
        int8_per_channel: For ``torch-int8``: per-channel weight scales (else per tensor).
        params: Extra MLflow params (layers, PCA dims, kernel, ...).
        build_seconds: Time it took to make this variant.
        train_sentences: Distillation corpus sentences its network was trained on (``None``: not trained,
            e.g. the teacher or a static model made without training). ``derive`` inherits it.
        uses_sts_labels: Trained on STS-B train labels (CoSENT), or derived from such a variant: its STS-B
            and held-out STS figures are not comparable with label-free rows. ``derive`` inherits it.
        rotated: Its vectors live on other axes than the teacher's (a Matryoshka student's principal axes),
            so an MSE to the teacher's vectors means nothing; cosines are unchanged. ``derive`` inherits it.
        head_on: For a PCA or truncation row of a torch network: that network's folder. ``model_dir`` is
            it plus one linear ``Dense``, so quality scoring encodes the network once for both rows and
            applies the head (:func:`tasks.pca.read_head`). ``derive`` inherits it while the folder stays.
        key: Content key: what the variant computes (the teacher's fingerprint, a stored stage output's key,
            or ``derive``'s hash of the parent's key and the step); quality scores are reused by it.
        reused: Its model came from an earlier run's stored output instead of being built in this run.
    """

    name: str
    kind: Kind
    model_dir: Path
    parent: str | None = None
    backend: Literal["torch", "onnx", "openvino", "torch-int8"] = "torch"
    model_file: str | None = None
    precision: Precision = "float32"
    calibration_file: Path | None = None
    rescore: bool = False
    int8_exclude: tuple[str, ...] = ()  # torch-int8: module-name regexes left in float32
    int8_per_channel: bool = True
    params: dict[str, str] = field(default_factory=dict)
    build_seconds: float = 0.0
    train_sentences: int | None = None
    uses_sts_labels: bool = False
    rotated: bool = False
    head_on: Path | None = None
    key: str = ""
    reused: bool = False

    @property
    def lineage(self) -> str:
        return self.params.get("lineage", self.name)

    def derive(
        self, name: str, kind: Kind, step: str, params: dict[str, str] | None = None, **fields: object
    ) -> Variant:
        """A variant made from this one by ``step``; folder and runtime inherited unless ``fields`` say.

        Its key hashes this variant's key, the step and its params, unless ``fields`` give one.
        """
        from tasks.artifacts import stage_key

        derived = {"parent": self.key, "step": step, **(params or {})}
        fields.setdefault("key", stage_key("variant", 1, derived))
        inherited = {
            "model_dir": self.model_dir,
            "backend": self.backend,
            "model_file": self.model_file,
            "uses_sts_labels": self.uses_sts_labels,
            "rotated": self.rotated,
            "train_sentences": self.train_sentences,
            "reused": self.reused,  # nothing of its own stored: as reused as its parent
            # same folder and runtime: still the network plus the head; another folder or runtime: its own
            "head_on": None if {"model_dir", "backend", "model_file"} & set(fields) else self.head_on,
        }
        return Variant(
            name,
            kind,
            parent=self.name,
            params={**(params or {}), "technique": step, "lineage": f"{self.lineage} > {step}"},
            **{**inherited, **fields},
        )


def load_model(variant: Variant, device: str = "cpu") -> SentenceTransformer:
    """The variant's network, on ``device`` where its runtime can run there (ONNX, OpenVINO and torch int8
    always on the CPU: :func:`tasks.devices.runs_on`)."""
    if variant.backend in ("onnx", "openvino"):
        return load_sentence_transformer(
            variant.model_dir, backend=variant.backend, model_kwargs={"file_name": variant.model_file}
        )
    model = load_sentence_transformer(variant.model_dir, device=runs_on(variant.backend, device))
    if variant.backend == "torch-int8":
        from tasks.torch_quant import quantize_dynamic_int8

        return quantize_dynamic_int8(model, variant.int8_exclude, variant.int8_per_channel)
    return model


def encode(model: SentenceTransformer, variant: Variant, sentences: list[str], batch_size: int) -> np.ndarray:
    """Embeddings as the variant stores them (float32, int8 or packed bits)."""
    embeddings = model.encode(
        sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return quantize(embeddings, variant)


def quantize(embeddings: np.ndarray, variant: Variant) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    if variant.precision == "float32":
        return embeddings.astype(np.float32, copy=False)
    ranges = None
    if variant.precision == "int8":
        if variant.calibration_file is None:
            raise ValueError(f"variant {variant.name}: int8 needs a calibration_file with the ranges")
        ranges = np.load(variant.calibration_file, allow_pickle=False)
    return quantize_embeddings(embeddings, variant.precision, ranges=ranges)


def pair_similarity(
    a: np.ndarray, b: np.ndarray, precision: Precision, queries: np.ndarray | None = None
) -> np.ndarray:
    """Row-wise similarity suited to the storage: cosine for float32 and int8, -Hamming for packed bits.

    ``queries``: the float vectors of the ``a`` side, for a variant that rescores (``Variant.rescore``):
    then each stored ``b`` is scored against its float query instead (:func:`rescored_similarity`).
    """
    if queries is not None:
        return rescored_similarity(queries, b)
    if precision == "ubinary":
        differing = np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(axis=1)
        return -differing.astype(np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return (a64 * b64).sum(axis=1) / np.maximum(norms, 1e-12)


def rescored_similarity(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """Row-wise cosine between float ``queries`` and packed-bit ``documents`` read as +-1 per dimension."""
    dim = queries.shape[1]
    signs = np.unpackbits(documents, axis=1)[:, :dim].astype(np.float64) * 2 - 1
    q64 = queries.astype(np.float64)
    norms = np.linalg.norm(q64, axis=1) * np.sqrt(dim)
    return (q64 * signs).sum(axis=1) / np.maximum(norms, 1e-12)


def bytes_per_vector(dim: int, precision: Precision) -> int:
    return {"float32": dim * 4, "int8": dim, "ubinary": -(-dim // 8)}[precision]


def size_bytes(variant: Variant, model: SentenceTransformer | None = None) -> int:
    """On-disk size of what this variant needs: its weights (the graph file and its weights for ONNX and
    OpenVINO, the int8 state dict for torch-int8, given the loaded ``model``) plus the non-weight files."""
    root = Path(variant.model_dir)
    if variant.backend == "torch":
        return dir_size_bytes(root, exclude=_NOT_TORCH_WEIGHTS)
    if variant.backend == "torch-int8":
        from tasks.torch_quant import state_dict_bytes

        if model is None:
            raise ValueError("the size of a torch-int8 variant needs its loaded model")
        non_weights = sum(p.stat().st_size for p in variant_files(variant) if not _is_weight_file(p))
        return non_weights + state_dict_bytes(model)
    return sum(p.stat().st_size for p in variant_files(variant))


_NOT_TORCH_WEIGHTS = ("checkpoints", "onnx", "openvino")


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(_WEIGHT_SUFFIXES)


def variant_files(variant: Variant) -> list[Path]:
    """The files of ``model_dir`` this variant runs on: for torch, the folder without checkpoints and
    exported graphs; for ONNX / OpenVINO, the non-weight files plus its graph and that graph's weights."""
    root = Path(variant.model_dir)
    files = [
        p for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != "checkpoints"
    ]
    if variant.backend in ("torch", "torch-int8"):
        return [p for p in files if p.relative_to(root).parts[0] not in _NOT_TORCH_WEIGHTS]
    graph = root / str(variant.model_file)
    companion = graph.with_suffix(_COMPANIONS.get(graph.suffix, graph.suffix))
    needed = [p for p in files if not _is_weight_file(p)] + [graph]
    if companion != graph and companion.exists():
        needed.append(companion)
    return needed


def variant_from_spec(spec: dict, model_dir: Path, calibration_file: Path | None = None) -> Variant:
    """The variant a :func:`runtime_spec` describes, running the files in ``model_dir``."""
    return Variant(
        spec["name"],
        spec["kind"],
        Path(model_dir),
        backend=spec["backend"],
        model_file=spec["model_file"],
        precision=spec["precision"],
        calibration_file=calibration_file,
        int8_exclude=tuple(spec["int8_exclude"]),
        int8_per_channel=spec["int8_per_channel"],
        rescore=bool(spec.get("rescore", False)),  # absent from models logged before rescoring existed
    )


def runtime_spec(variant: Variant) -> dict[str, object]:
    """How to run the variant's files (the fields :func:`load_model` and :func:`encode` read), as JSON."""
    return {
        "name": variant.name,
        "kind": variant.kind,
        "backend": variant.backend,
        "model_file": variant.model_file,
        "precision": variant.precision,
        "int8_exclude": list(variant.int8_exclude),
        "int8_per_channel": variant.int8_per_channel,
        "rescore": variant.rescore,
    }
