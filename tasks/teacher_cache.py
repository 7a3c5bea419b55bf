"""Teacher-embedding cache: encode a sentence list with the teacher once, keep it as .npy shards.

Key = fingerprint of the teacher (weights, config, tokenizer, pooling, normalization, max_seq_length)
+ hash of the sentence list + dtype. An entry is a folder ``<cache_dir>/<key>/`` holding ``meta.json`` and
``shard-00000.npy`` ...; it is written under a temporary name and renamed when complete, so a crashed
run leaves no half-written entry. Shards are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from tasks.data import read_lines
from tasks.models import fingerprint_model_dir, load_sentence_transformer

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000
PROGRESS_ROWS = 1_024  # progress-bar granularity
CACHE_FORMAT = 1


@dataclass(frozen=True)
class CachedEmbeddings:
    """Where a cache entry lives, and what producing it cost (0 encoded = a cache hit)."""

    path: Path
    key: str
    rows: int
    dim: int
    dtype: str
    sentences_encoded: int
    seconds: float

    def load(self, mmap: bool = True) -> np.ndarray:
        return load_embeddings(self.path, mmap=mmap)


def cache_key(teacher_fingerprint: str, sentences: list[str], dtype: str) -> str:
    sentences_hash = hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()
    payload = json.dumps(
        {"format": CACHE_FORMAT, "teacher": teacher_fingerprint, "sentences": sentences_hash, "dtype": dtype}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_embeddings(entry: Path, mmap: bool = True) -> np.ndarray:
    meta = json.loads((Path(entry) / "meta.json").read_text())
    shards = [
        np.load(Path(entry) / name, mmap_mode="r" if mmap else None, allow_pickle=False)
        for name in meta["shards"]
    ]
    array = shards[0] if len(shards) == 1 else np.concatenate(shards)
    if array.shape != (meta["rows"], meta["dim"]) or str(array.dtype) != meta["dtype"]:
        raise ValueError(f"cache entry {entry} is inconsistent with its meta.json: delete the folder")
    return array


def get_or_encode(
    teacher_dir: Path,
    sentences_file: Path,
    cache_dir: Path,
    *,
    dtype: str = "float32",
    batch_size: int = 64,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> CachedEmbeddings:
    """Return the cached teacher embeddings of the sentences in ``sentences_file``, encoding on a miss."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype={dtype!r}: the teacher cache stores float32 or float16")
    start = time.perf_counter()
    sentences = read_lines(sentences_file)
    key = cache_key(fingerprint_model_dir(Path(teacher_dir), max_seq_length), sentences, dtype)
    entry = Path(cache_dir) / key
    if (entry / "meta.json").is_file():
        meta = json.loads((entry / "meta.json").read_text())
        log.info("teacher cache hit %s: %d x %d embeddings, nothing encoded", key, meta["rows"], meta["dim"])
        return CachedEmbeddings(entry, key, meta["rows"], meta["dim"], dtype, 0, time.perf_counter() - start)

    log.info("teacher cache miss %s: encoding %d sentences with %s", key, len(sentences), teacher_dir)
    model = load_sentence_transformer(
        teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code
    )
    tmp = entry.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        shards: list[str] = []
        dim = 0
        with tqdm(total=len(sentences), desc="teacher embeddings", unit="sent") as bar:
            for index, offset in enumerate(range(0, len(sentences), SHARD_ROWS)):
                chunk = sentences[offset : offset + SHARD_ROWS]
                parts = []
                for block in range(0, len(chunk), PROGRESS_ROWS):
                    texts = chunk[block : block + PROGRESS_ROWS]
                    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
                    parts.append(emb.astype(dtype))
                    bar.update(len(texts))
                emb = np.concatenate(parts)
                dim = emb.shape[1]
                name = f"shard-{index:05d}.npy"
                np.save(tmp / name, emb, allow_pickle=False)
                shards.append(name)
        meta = {
            "rows": len(sentences),
            "dim": dim,
            "dtype": dtype,
            "shards": shards,
            "teacher": str(teacher_dir),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another run finished the same entry first: keep theirs
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info(
        "teacher encoded %d sentences in %.1f s (%.0f sents/s)",
        len(sentences),
        seconds,
        len(sentences) / seconds,
    )
    return CachedEmbeddings(entry, key, len(sentences), dim, dtype, len(sentences), seconds)


@task(name="cache-teacher-embeddings")
def cache_teacher_embeddings(
    teacher_dir: Path,
    sentences_file: Path,
    cache_dir: Path,
    dtype: str = "float32",
    batch_size: int = 64,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> CachedEmbeddings:
    """Prefect task around :func:`get_or_encode` (the cache is content-addressed files, not task results)."""
    return get_or_encode(
        teacher_dir,
        sentences_file,
        cache_dir,
        dtype=dtype,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        trust_remote_code=trust_remote_code,
    )
