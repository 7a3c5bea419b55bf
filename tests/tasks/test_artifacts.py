"""The content-addressed store: build once, reuse, never use a damaged entry, build once under concurrency."""

import threading
import time
from pathlib import Path

import pytest

from tasks.artifacts import MANIFEST, ArtifactStore, stage_key


def _writer(calls: list[str], payload: bytes = b"weights" * 1000):
    def build(out_dir: Path, work_dir: Path) -> dict:
        calls.append(str(out_dir))
        (out_dir / "model").mkdir()
        (out_dir / "model" / "weights.bin").write_bytes(payload)
        return {"score": 0.5}

    return build


def test_stage_key_is_stable_and_sensitive_to_every_input() -> None:
    key = stage_key("students", 1, {"layers": [0, 5], "loss": "mse"})
    assert key == stage_key("students", 1, {"loss": "mse", "layers": [0, 5]})
    assert key != stage_key("students", 2, {"layers": [0, 5], "loss": "mse"})
    assert key != stage_key("students", 1, {"layers": [0, 4], "loss": "mse"})
    assert key != stage_key("static", 1, {"layers": [0, 5], "loss": "mse"})


def test_build_once_then_reuse(tmp_path: Path) -> None:
    store, calls = ArtifactStore(tmp_path), []
    first = store.build("s", "k1", _writer(calls))
    second = store.build("s", "k1", _writer(calls))
    assert len(calls) == 1 and not first.reused and second.reused
    assert second.result == {"score": 0.5} and second.path == tmp_path / "s" / "k1"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".k1.lock", "k1"]  # no tmp, no work dir


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: (e / "model" / "weights.bin").write_bytes(b"x" * 7000),  # same size, other bytes
        lambda e: (e / "model" / "weights.bin").write_bytes(b"weights"),  # truncated
        lambda e: (e / "model" / "weights.bin").unlink(),  # missing file
        lambda e: (e / MANIFEST).unlink(),  # no manifest
        lambda e: (e / MANIFEST).write_text("{not json"),
        lambda e: (e / "result.json").write_text("[]"),  # result altered
    ],
    ids=["altered", "truncated", "missing-file", "no-manifest", "bad-manifest", "altered-result"],
)
def test_a_damaged_entry_is_rebuilt_never_used(tmp_path: Path, damage, caplog) -> None:
    store, calls = ArtifactStore(tmp_path), []
    entry = store.build("s", "k1", _writer(calls))
    damage(entry.path)
    again = store.build("s", "k1", _writer(calls))
    assert len(calls) == 2 and not again.reused and again.result == {"score": 0.5}
    assert (again.path / "model" / "weights.bin").read_bytes() == b"weights" * 1000
    assert "rebuilding it" in caplog.text and str(entry.path) in caplog.text


def test_a_failed_build_leaves_nothing_but_its_work_folder(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def crash(out_dir: Path, work_dir: Path) -> dict:
        (work_dir / "checkpoint-1").mkdir()
        (out_dir / "half").write_text("half-written")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.build("s", "k1", crash)
    assert store.get("s", "k1") is None
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".k1.lock", ".k1.work"]
    seen = []
    store.build("s", "k1", lambda out, work: seen.append(sorted(p.name for p in work.iterdir())) or {})
    assert seen == [["checkpoint-1"]]  # the next attempt finds what it can resume from
    assert not store.work_folder("s", "k1").exists()


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list[str] = []

    def slow(out_dir: Path, work_dir: Path) -> dict:
        time.sleep(0.3)
        return _writer(calls)(out_dir, work_dir)

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(ArtifactStore(tmp_path).build("s", "k", slow)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 3
    assert sorted(r.reused for r in results) == [False, True, True]
