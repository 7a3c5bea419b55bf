"""Dimension reduction appended to a model as a ``Dense`` layer: PCA, or truncation to the first dimensions.

The PCA (scikit-learn) is fitted on the model's own embeddings of corpus sentences (never evaluation
sentences); for the teacher those are the cached teacher embeddings. The projection, centring included,
becomes a ``Dense`` module (weight = components, bias = -mean @ components.T, identity activation), so the
result saves, loads and encodes as an ordinary SentenceTransformer with k-dimensional output.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

from tasks.files import atomic_dir
from tasks.models import load_sentence_transformer

log = logging.getLogger(__name__)


class PcaConfigError(ValueError):
    """PCA dimensions that cannot be fitted."""


@dataclass(frozen=True)
class PcaResult:
    model_dir: Path
    dims: int
    explained_variance: float
    seconds: float


def check_dims(dims: int, model_dim: int, field: str = "dims") -> None:
    """Output dimensions a reduction of a ``model_dim``-dimensional model can have (``field`` names them)."""
    if not 1 <= dims <= model_dim:
        raise PcaConfigError(f"{field}: {dims} is not in 1..{model_dim} (the model's embedding dimension)")


def check_pca_dims(dims: int, model_dim: int, fit_rows: int, field: str = "dims") -> None:
    """``field`` names the dimensions in messages; its sibling ``fit_sentences`` the fitting rows."""
    check_dims(dims, model_dim, field)
    if dims > fit_rows:
        sibling = field.rsplit(".", 1)[0] + ".fit_sentences" if "." in field else "fit_sentences"
        raise PcaConfigError(
            f"{field}: {dims} dimensions need at least {dims} fitting sentences, got {fit_rows}; "
            f"raise {sibling} or lower the dimensions"
        )


def fit_pca(embeddings: np.ndarray, dims: int, seed: int = 42) -> PCA:
    check_pca_dims(dims, embeddings.shape[1], embeddings.shape[0])
    return PCA(n_components=dims, random_state=seed).fit(np.asarray(embeddings, dtype=np.float32))


def append_pca(model_dir: Path, pca: PCA, out_dir: Path) -> Path:
    """Save ``model_dir`` + a Dense PCA projection to ``out_dir`` (written to a temp name, then renamed)."""
    components = torch.tensor(pca.components_, dtype=torch.float32)  # (k, d)
    bias = -torch.tensor(pca.mean_, dtype=torch.float32) @ components.T
    return _save_appended(load_sentence_transformer(model_dir), linear_dense(components, bias), out_dir)


def append_truncation(model_dir: Path, dims: int, out_dir: Path) -> Path:
    """Save ``model_dir`` + a ``Dense`` layer that keeps the first ``dims`` output dimensions (identity rows,
    no bias) to ``out_dir``: what ``truncate_dim`` does at encode time, stored so that every backend and
    export sees it."""
    model = load_sentence_transformer(model_dir)
    full = model.get_embedding_dimension()
    check_dims(dims, full)
    return _save_appended(model, linear_dense(torch.eye(full, dtype=torch.float32)[:dims]), out_dir)


def linear_dense(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.nn.Module:
    """A ``Dense`` module computing ``x @ weight.T (+ bias)`` (identity activation): how PCA, truncation
    and a Matryoshka student's rotation are appended to a model; :func:`read_head` reads one back."""
    from sentence_transformers.sentence_transformer.modules import Dense

    dense = Dense(
        in_features=weight.shape[1],
        out_features=weight.shape[0],
        bias=bias is not None,
        activation_function=torch.nn.Identity(),
    )
    with torch.no_grad():
        dense.linear.weight.copy_(weight)
        if bias is not None:
            dense.linear.bias.copy_(bias)
    return dense


def _save_appended(model: object, dense: torch.nn.Module, out_dir: Path) -> Path:
    """Save ``model`` + ``dense`` to ``out_dir`` (written to a temp name, then renamed)."""
    model.append(dense)
    with atomic_dir(out_dir) as tmp:
        model.save(str(tmp))
    return Path(out_dir)


@dataclass(frozen=True)
class LinearHead:
    """The ``Dense`` that :func:`append_pca` / :func:`append_truncation` appended, as arrays: applied to the
    network's float output it gives the reduced model's output without encoding again."""

    weight: np.ndarray  # (k, d)
    bias: np.ndarray  # (k,); zeros where the Dense has none
    parameters: int  # the Dense's own: weight, and bias where it has one

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"the head takes {self.weight.shape[1]} dims, not {embeddings.shape[1]}")
        return (np.asarray(embeddings, dtype=np.float32) @ self.weight.T + self.bias).astype(np.float32)


def read_head(model_dir: Path) -> LinearHead:
    """The last module of ``model_dir``, which must be an identity-activation ``Dense``."""
    from sentence_transformers.sentence_transformer.modules import Dense

    modules = json.loads((Path(model_dir) / "modules.json").read_text())
    last = modules[-1]
    if not last["type"].endswith(".Dense"):
        raise ValueError(f"{model_dir}: the last module is {last['type']}, not the Dense of a reduction")
    dense = Dense.load(str(Path(model_dir) / last["path"]), local_files_only=True)
    if not isinstance(dense.activation_function, torch.nn.Identity):
        raise ValueError(f"{model_dir}: the last Dense has an activation, so it is not a linear head")
    weight = dense.linear.weight.detach().float().numpy()
    bias = dense.linear.bias
    return LinearHead(
        weight,
        np.zeros(weight.shape[0], np.float32) if bias is None else bias.detach().float().numpy(),
        sum(p.numel() for p in dense.parameters()),
    )


def reduce_with_pca(
    model_dir: Path, fit_embeddings: np.ndarray, dims: int, out_dir: Path, seed: int = 42
) -> PcaResult:
    start = time.perf_counter()
    pca = fit_pca(fit_embeddings, dims, seed)
    append_pca(model_dir, pca, out_dir)
    explained = float(pca.explained_variance_ratio_.sum())
    log.info("PCA %d -> %d keeps %.1f%% of the variance", fit_embeddings.shape[1], dims, 100 * explained)
    return PcaResult(Path(out_dir), dims, explained, time.perf_counter() - start)
