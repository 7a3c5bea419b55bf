"""Content-addressed stage outputs: a trained student, a static student, a compressed model, quality scores.

Every stage output lives in ``<work_dir>/artifacts/<stage>/<key>/``, where the key hashes everything that
determines it (the parent's key, the settings of the step, the data fingerprint and the stage's code
version). Any later flow run with the same inputs reuses it instead of rebuilding it.

An entry is complete or absent: it is built in a temporary sibling folder, gets ``result.json`` (what the
stage returns, JSON only: nothing is unpickled) and ``manifest.json`` (size and sha256 of every file), and is
renamed into place. A reader checks the manifest; an entry with a missing, truncated or altered file is moved
aside and rebuilt, never used. Builders of the same key take a file lock, so two concurrent runs build it
once; a stable ``.<key>.work`` folder next to the entry keeps what a killed build can resume from (Trainer
checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.files import file_sha256

log = logging.getLogger(__name__)

STORE_FORMAT = 1
RESULT = "result.json"
MANIFEST = "manifest.json"


def stage_key(stage: str, version: int, inputs: Mapping[str, Any]) -> str:
    """A stable key for a stage output: hash of the stage, its code version and its inputs (JSON)."""
    payload = json.dumps(
        {"format": STORE_FORMAT, "stage": stage, "version": version, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def files_fingerprint(*paths: Path) -> str:
    """sha256 over the names and contents of ``paths`` (in the order given)."""
    parts = "".join(f"{Path(path).name}\0{file_sha256(path)}\n" for path in paths)
    return hashlib.sha256(parts.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A complete stage output: its folder and what the stage returned."""

    path: Path
    key: str
    result: dict[str, Any]
    reused: bool


class BrokenEntry(ValueError):
    """A stored entry that does not match its manifest."""


class ArtifactStore:
    """The ``artifacts`` folder of a work directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_folder(self, stage: str, key: str) -> Path:
        """Where an interrupted build of ``key`` leaves what it can resume from."""
        return self.root / stage / f".{key}.work"

    @contextmanager
    def lock(self, stage: str, key: str, timeout: float = -1) -> Iterator[None]:
        """Exclusive right to build ``key``; released when the holder's process ends, even by SIGKILL."""
        path = self.root / stage / f".{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=timeout):
            yield

    def get(self, stage: str, key: str) -> Entry | None:
        """The verified entry, or ``None``; a damaged entry is logged, moved aside and reported as absent."""
        path = self.folder(stage, key)
        if not path.exists():
            return None
        try:
            result = verify(path)
        except BrokenEntry as exc:
            log.warning("%s: %s; rebuilding it", path, exc)
            self.discard(path)
            return None
        return Entry(path, key, result, reused=True)

    def discard(self, path: Path) -> None:
        trash = path.with_name(f".{path.name}.broken-{uuid.uuid4().hex[:8]}")
        try:
            path.rename(trash)  # atomic: a concurrent reader sees the entry or nothing
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def build(
        self,
        stage: str,
        key: str,
        build: Callable[[Path, Path], dict[str, Any]],
        describe: str = "",
    ) -> Entry:
        """Reuse the entry for ``key``, or run ``build(out_dir, work_dir)`` and store what it wrote.

        ``build`` fills ``out_dir`` (a fresh temporary folder) and returns the JSON-able result; ``work_dir``
        survives a crash, for what the next attempt can resume from, and is removed once the entry is stored.
        """
        what = describe or f"{stage}/{key}"
        entry = self.get(stage, key)
        if entry is not None:
            log.info("reusing %s (%s): built by an earlier run", what, entry.path)
            return entry
        with self.lock(stage, key):
            entry = self.get(stage, key)  # another run may have built it while we waited
            if entry is not None:
                log.info("reusing %s (%s): built by a concurrent run", what, entry.path)
                return entry
            final = self.folder(stage, key)
            work = self.work_folder(stage, key)
            work.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            start = time.perf_counter()
            try:
                result = build(tmp, work)
                seal(tmp, result)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            log.info("new %s stored in %.1f s (%s)", what, time.perf_counter() - start, final)
            return Entry(final, key, result, reused=False)


def seal(folder: Path, result: dict[str, Any]) -> None:
    """Write ``result.json`` and the manifest of every file in ``folder``."""
    (folder / RESULT).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"format": STORE_FORMAT, "files": files}, indent=1))


def verify(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest; return ``result.json``. Raises :class:`BrokenEntry`."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokenEntry(f"no readable {MANIFEST} ({type(exc).__name__})") from None
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            raise BrokenEntry(f"{rel} is missing")
        if path.stat().st_size != expected["size"]:
            raise BrokenEntry(f"{rel} has {path.stat().st_size} bytes, expected {expected['size']}")
        if file_sha256(path) != expected["sha256"]:
            raise BrokenEntry(f"{rel} does not match its checksum")
    try:
        return json.loads((folder / RESULT).read_text())
    except (OSError, ValueError) as exc:
        raise BrokenEntry(f"no readable {RESULT} ({type(exc).__name__})") from None
