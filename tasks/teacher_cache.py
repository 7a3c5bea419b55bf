"""Teacher-embedding cache: encode a sentence list with the teacher once, keep it as .npy shards.

Key = fingerprint of the teacher (weights, config, tokenizer, pooling, normalization, max_seq_length)
+ hash of the sentence list + dtype. An entry is a folder ``<cache_dir>/<key>/`` holding ``meta.json`` and
``shard-00000.npy`` ...; it is written under a temporary name and renamed when complete, so a crashed
run leaves no half-written entry. ``meta.json`` records each shard's size, sha256, shape and dtype: a hit
is used only after every shard checks out. A broken entry (truncated, missing, overwritten or unreadable
shard, missing or malformed ``meta.json``) is logged, moved aside and encoded again, never used.
Shards are read with ``allow_pickle=False``.

Memory stays bounded by a shard, not the corpus: the sentence file is hashed and encoded as a stream, one
shard at a time, and readers get the shards memory-mapped (:meth:`CachedEmbeddings.shards`) or a lazy view
over them (:class:`ShardedEmbeddings`) whose row slices read only the shards they cover.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from tqdm.auto import tqdm

from tasks.files import file_sha256
from tasks.models import fingerprint_model_dir, load_sentence_transformer

log = logging.getLogger(__name__)

SHARD_ROWS = 50_000
PROGRESS_ROWS = 1_024  # progress-bar granularity
# 2: meta.json records each shard's bytes, sha256, shape and dtype. The format is part of the key, so
# entries of an older format are simply misses.
CACHE_FORMAT = 2
DTYPES = ("float32", "float16")
_SHARD_NAME = re.compile(r"shard-\d{5}\.npy")
_RENAME_TRIES = 3


class CacheEntryError(ValueError):
    """A teacher-cache entry that cannot be used; the message names the folder, what is wrong and the fix."""

    def __init__(self, entry: Path, problem: str) -> None:
        self.entry = Path(entry)
        self.problem = problem
        super().__init__(
            f"teacher cache entry {entry} is broken: {problem}. Delete that folder; the next run "
            "encodes the sentences again"
        )

    def __reduce__(self):  # picklable (Prefect may persist a task's exception)
        return type(self), (self.entry, self.problem)


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

    def load(self, mmap: bool = True) -> np.ndarray | ShardedEmbeddings:
        """All rows, lazily: the memory-mapped array of a single shard, else a :class:`ShardedEmbeddings`
        view (``load()[:rows]`` reads only the first shards; ``np.asarray(load())`` reads them all)."""
        return load_embeddings(self.path, mmap=mmap)

    def shards(self, mmap: bool = True) -> Iterator[np.ndarray]:
        """The entry's shards in row order, each memory-mapped (checked against ``meta.json``) when opened."""
        return iter_shards(self.path, mmap=mmap)


class ShardedEmbeddings:
    """A read-only (rows, dim) view over an entry's shards, opened memory-mapped.

    Indexing with rows (an int, a slice, an index array or a boolean mask, optionally followed by column
    indices) returns an ndarray read from the shards those rows are in; ``np.asarray(view)`` concatenates
    every shard (the whole corpus in memory: for callers that really need all rows at once).
    """

    def __init__(self, shards: list[np.ndarray]) -> None:
        if not shards:
            raise ValueError("a sharded view needs at least one shard")
        self._shards = shards
        self._offsets = list(itertools.accumulate((len(shard) for shard in shards), initial=0))
        self.dtype = shards[0].dtype
        self.shape = (self._offsets[-1], shards[0].shape[1])
        self.ndim = 2

    @property
    def shards(self) -> list[np.ndarray]:
        return list(self._shards)

    @property
    def nbytes(self) -> int:
        return sum(shard.nbytes for shard in self._shards)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedEmbeddings(shape={self.shape}, dtype={self.dtype}, shards={len(self._shards)})"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.concatenate(self._shards)
        return array if dtype is None else array.astype(dtype, copy=False)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype, copy=copy)

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self._shards:
            yield from shard

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return np.asarray(self)
            rows = self[key[0]]
            return rows[key[1:]] if np.ndim(rows) == 1 else rows[(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            index = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= index < len(self):
                raise IndexError(f"row {key} is out of range for {len(self)} rows")
            shard = bisect.bisect_right(self._offsets, index) - 1
            return self._shards[shard][index - self._offsets[shard]]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._rows(start, max(start, stop))
        if key is Ellipsis:
            return np.asarray(self)
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"a boolean row mask must have {len(self)} entries, got {index.shape}")
            index = np.flatnonzero(index)
        if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise IndexError(
                f"rows must be an int, a slice, a 1-d index array or a boolean mask, not {key!r}"
            )
        index = np.where(index < 0, index + len(self), index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row indices out of range for {len(self)} rows")
        shard_of = np.searchsorted(self._offsets, index, side="right") - 1
        out = np.empty((index.size, self.shape[1]), dtype=self.dtype)
        for shard in np.unique(shard_of):
            chosen = shard_of == shard
            out[chosen] = self._shards[shard][index[chosen] - self._offsets[shard]]
        return out

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``: a view of one shard when they lie in one, else a copy of just those rows."""
        first = bisect.bisect_right(self._offsets, start) - 1 if start < len(self) else len(self._shards) - 1
        parts = []
        for shard in range(first, len(self._shards)):
            lo, hi = self._offsets[shard], self._offsets[shard + 1]
            if lo >= stop:
                break
            parts.append(self._shards[shard][max(start, lo) - lo : min(stop, hi) - lo])
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return self._shards[0][0:0]
        return np.concatenate(parts)


def iter_lines(path: Path) -> Iterator[str]:
    """The non-empty lines of a UTF-8 text file, streamed; the same list as ``tasks.data.read_lines``."""
    with open(path, encoding="utf-8") as handle:  # universal newlines, as Path.read_text
        for line in handle:
            line = line[:-1] if line.endswith("\n") else line
            if line:
                yield line


def sentences_digest(sentences: Iterable[str]) -> tuple[str, int]:
    """sha256 of the sentences joined by newlines, and their count, without holding them all."""
    digest = hashlib.sha256()
    count = 0
    for sentence in sentences:
        if count:
            digest.update(b"\n")
        digest.update(sentence.encode("utf-8"))
        count += 1
    return digest.hexdigest(), count


def _key(teacher_fingerprint: str, sentences_hash: str, dtype: str) -> str:
    payload = json.dumps(
        {"format": CACHE_FORMAT, "teacher": teacher_fingerprint, "sentences": sentences_hash, "dtype": dtype}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_key(teacher_fingerprint: str, sentences: Iterable[str], dtype: str) -> str:
    return _key(teacher_fingerprint, sentences_digest(sentences)[0], dtype)


def read_meta(entry: Path) -> dict[str, Any]:
    """The entry's ``meta.json``, checked for shape; raises :class:`CacheEntryError` naming what is wrong."""
    entry = Path(entry)
    path = entry / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheEntryError(entry, "it has no meta.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheEntryError(entry, f"meta.json is unreadable ({exc})") from exc
    problem = _meta_problem(meta)
    if problem:
        raise CacheEntryError(entry, f"meta.json is malformed ({problem})")
    return meta


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != CACHE_FORMAT:
        return f"format {meta.get('format')!r}, expected {CACHE_FORMAT}"
    for field in ("rows", "dim"):
        if not isinstance(meta.get(field), int) or isinstance(meta.get(field), bool) or meta[field] < 0:
            return f"{field} {meta.get(field)!r} is not a non-negative integer"
    if meta.get("dtype") not in DTYPES:
        return f"dtype {meta.get('dtype')!r} is not one of {list(DTYPES)}"
    shards, infos = meta.get("shards"), meta.get("shard_info")
    if not isinstance(shards, list) or not isinstance(infos, list) or len(shards) != len(infos):
        return "shards and shard_info are not lists of the same length"
    rows = 0
    for name, info in zip(shards, infos, strict=True):
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
            return f"shard name {name!r} is not shard-NNNNN.npy"
        if not isinstance(info, dict):
            return f"shard_info of {name} is not an object"
        shape = info.get("shape")
        if (
            not isinstance(info.get("bytes"), int)
            or not isinstance(info.get("sha256"), str)
            or len(info["sha256"]) != 64
            or not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(n, int) for n in shape)
            or shape[1] != meta["dim"]
            or info.get("dtype") != meta["dtype"]
        ):
            return f"shard_info of {name} lacks bytes / sha256 / a [rows, {meta['dim']}] shape / the dtype"
        rows += shape[0]
    if rows != meta["rows"]:
        return f"the shards hold {rows} rows, rows says {meta['rows']}"
    return None


def verify_entry(entry: Path) -> dict[str, Any]:
    """Check ``meta.json`` and every shard (size, sha256, header); return the meta or raise CacheEntryError.

    Reads every byte of the entry once (a 50k x 384 float32 shard is 75 MB).
    """
    entry = Path(entry)
    meta = read_meta(entry)
    for name, info in zip(meta["shards"], meta["shard_info"], strict=True):
        path = entry / name
        try:
            size = path.stat().st_size
            if size != info["bytes"]:
                raise CacheEntryError(
                    entry, f"{name} is {size} bytes, meta.json says {info['bytes']} (truncated or replaced)"
                )
            if file_sha256(path) != info["sha256"]:
                raise CacheEntryError(
                    entry, f"{name} does not match its sha256 in meta.json (overwritten or foreign data)"
                )
        except FileNotFoundError:
            raise CacheEntryError(entry, f"{name} is missing") from None
        except OSError as exc:
            raise CacheEntryError(entry, f"{name} is unreadable ({exc})") from exc
        _open_shard(entry, name, info, mmap=True)  # the header agrees with meta.json
    return meta


def _open_shard(entry: Path, name: str, info: dict[str, Any], mmap: bool) -> np.ndarray:
    try:
        array = np.load(entry / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CacheEntryError(entry, f"{name} is missing") from None
    except (OSError, ValueError, EOFError) as exc:  # bad header, truncated data, pickled objects
        raise CacheEntryError(entry, f"{name} is not a readable .npy array ({exc})") from exc
    if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
        raise CacheEntryError(
            entry,
            f"{name} holds a {list(array.shape)} {array.dtype} array, meta.json says "
            f"{info['shape']} {info['dtype']}",
        )
    return array


def iter_shards(entry: Path, mmap: bool = True, verify: bool = False) -> Iterator[np.ndarray]:
    """The entry's shards in row order, each opened (memory-mapped by default) only when reached.

    Checks ``meta.json`` first and each shard's size, shape and dtype as it is opened; ``verify=True`` also
    hashes every shard first. Raises :class:`CacheEntryError` (a ``ValueError`` naming the entry).
    """
    entry = Path(entry)
    meta = verify_entry(entry) if verify else read_meta(entry)
    for name, info in zip(meta["shards"], meta["shard_info"], strict=True):
        try:
            size = (entry / name).stat().st_size
        except FileNotFoundError:
            raise CacheEntryError(entry, f"{name} is missing") from None
        if size != info["bytes"]:
            raise CacheEntryError(entry, f"{name} is {size} bytes, meta.json says {info['bytes']}")
        yield _open_shard(entry, name, info, mmap)


def load_embeddings(entry: Path, mmap: bool = True, verify: bool = False) -> np.ndarray | ShardedEmbeddings:
    """The entry's embeddings as one (rows, dim) array-like, without reading the shards into memory.

    One shard: the memory-mapped array itself. Several: a :class:`ShardedEmbeddings` view over the
    memory-mapped shards (row slices read only the shards they cover; ``np.asarray`` concatenates them).
    Every shard is checked (size, shape, dtype) on opening; ``verify=True`` also hashes each. Raises
    :class:`CacheEntryError` (a ``ValueError`` naming the entry) on a broken entry.
    """
    entry = Path(entry)
    shards = list(iter_shards(entry, mmap=mmap, verify=verify))
    if not shards:
        return np.empty((0, read_meta(entry)["dim"]), dtype=read_meta(entry)["dtype"])
    return shards[0] if len(shards) == 1 else ShardedEmbeddings(shards)


def check_entry(entry: Path, rows: int, dtype: str) -> dict[str, Any]:
    """:func:`verify_entry`, and the entry holds ``rows`` embeddings of ``dtype``; raises CacheEntryError."""
    entry = Path(entry)
    if not entry.is_dir() or entry.is_symlink():
        raise CacheEntryError(entry, "it is not a folder")
    meta = verify_entry(entry)
    if meta["rows"] != rows or meta["dtype"] != dtype:
        raise CacheEntryError(entry, f"it holds {meta['rows']} {meta['dtype']} rows, expected {rows} {dtype}")
    return meta


def discard_entry(entry: Path, problem: str, rows: int | None = None, dtype: str | None = None) -> None:
    """Move a broken entry aside under a unique name, then delete it; safe when processes race.

    Only the process whose rename succeeds deletes what it moved. When ``rows`` and ``dtype`` are given and
    what it moved checks out (another process renamed a fresh entry into place after the broken one was
    checked), it is put back instead.
    """
    entry = Path(entry)
    log.warning("teacher cache entry %s is broken (%s): moving it aside and encoding again", entry, problem)
    trash = entry.with_name(f".{entry.name}.trash-{uuid.uuid4().hex[:8]}")
    try:
        entry.rename(trash)
    except FileNotFoundError:  # another process moved it first
        return
    except OSError as exc:
        log.warning("could not move %s aside (%s)", entry, exc)
        return
    if trash.is_dir() and not trash.is_symlink():
        if rows is not None and dtype is not None:
            try:
                check_entry(trash, rows, dtype)
            except CacheEntryError:
                pass
            else:  # a fresh, whole entry: put it back (unless yet another one is there by now)
                try:
                    trash.rename(entry)
                    return
                except OSError:
                    pass
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _verified_hit(entry: Path, rows: int, dtype: str) -> dict[str, Any] | None:
    """The entry's meta when it is there, whole and for these sentences; None on a miss (a broken entry is
    discarded)."""
    if not entry.exists() and not entry.is_symlink():
        return None
    try:
        return check_entry(entry, rows, dtype)
    except CacheEntryError as exc:
        discard_entry(entry, exc.problem, rows, dtype)
    try:  # another process may have put a whole entry there meanwhile
        return check_entry(entry, rows, dtype) if entry.exists() else None
    except CacheEntryError:
        return None


def get_or_encode(
    teacher_dir: Path,
    sentences_file: Path,
    cache_dir: Path,
    *,
    dtype: str = "float32",
    batch_size: int = 64,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> CachedEmbeddings:
    """Return the cached teacher embeddings of the sentences in ``sentences_file``, encoding on a miss.

    A hit is verified shard by shard first; a broken entry is logged, discarded and encoded again. The key
    does not depend on ``device``: the teacher encodes in float32 on either, and an entry serves both.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: the teacher cache stores float32 or float16")
    start = time.perf_counter()
    # Two streamed passes over the file (hash and count, then encode on a miss): memory stays bounded by a
    # shard however long the corpus is.
    sentences_hash, rows = sentences_digest(iter_lines(sentences_file))
    key = _key(fingerprint_model_dir(Path(teacher_dir), max_seq_length), sentences_hash, dtype)
    entry = Path(cache_dir) / key
    meta = _verified_hit(entry, rows, dtype)
    if meta is not None:
        log.info("teacher cache hit %s: %d x %d embeddings, nothing encoded", key, meta["rows"], meta["dim"])
        return CachedEmbeddings(entry, key, meta["rows"], meta["dim"], dtype, 0, time.perf_counter() - start)

    log.info("teacher cache miss %s: encoding %d sentences with %s on %s", key, rows, teacher_dir, device)
    model = load_sentence_transformer(
        teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code, device=device
    )
    tmp = entry.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        shards: list[str] = []
        shard_info: list[dict[str, Any]] = []
        dim = 0
        encoded = 0
        lines = iter_lines(sentences_file)
        with tqdm(total=rows, desc="teacher embeddings", unit="sent") as bar:
            for index in itertools.count():
                chunk = list(itertools.islice(lines, SHARD_ROWS))
                if not chunk:
                    break
                parts = []
                for block in range(0, len(chunk), PROGRESS_ROWS):
                    texts = chunk[block : block + PROGRESS_ROWS]
                    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
                    parts.append(emb.astype(dtype))
                    bar.update(len(texts))
                emb = np.concatenate(parts)
                del parts
                dim = emb.shape[1]
                encoded += len(chunk)
                name = f"shard-{index:05d}.npy"
                np.save(tmp / name, emb, allow_pickle=False)
                shards.append(name)
                shard_info.append(
                    {
                        "bytes": (tmp / name).stat().st_size,
                        "sha256": file_sha256(tmp / name),
                        "shape": list(emb.shape),
                        "dtype": str(emb.dtype),
                    }
                )
                del emb, chunk
        if encoded != rows:  # the file changed between the two passes
            raise RuntimeError(
                f"{sentences_file} changed while it was encoded ({rows} then {encoded} sentences)"
            )
        meta = {
            "format": CACHE_FORMAT,
            "rows": rows,
            "dim": dim,
            "dtype": dtype,
            "shards": shards,
            "shard_info": shard_info,
            "teacher": str(teacher_dir),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, entry, rows, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("teacher encoded %d sentences in %.1f s (%.0f sents/s)", rows, seconds, rows / seconds)
    return CachedEmbeddings(entry, key, rows, dim, dtype, rows, seconds)


def _publish(tmp: Path, entry: Path, rows: int, dtype: str) -> None:
    """Rename the finished ``tmp`` to ``entry``; when another run got there first, keep theirs if whole."""
    for _ in range(_RENAME_TRIES):
        try:
            tmp.rename(entry)
            return
        except OSError:
            # another run finished the same entry first: keep theirs, unless it is broken (then it is
            # discarded and the rename is tried again)
            if _verified_hit(entry, rows, dtype) is not None:
                return
    tmp.rename(entry)  # raises, naming both paths


@task(name="cache-teacher-embeddings")
def cache_teacher_embeddings(
    teacher_dir: Path,
    sentences_file: Path,
    cache_dir: Path,
    dtype: str = "float32",
    batch_size: int = 64,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
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
        device=device,
    )
