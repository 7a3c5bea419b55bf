import json
from pathlib import Path

import numpy as np
import pytest

from tasks import teacher_cache
from tasks.teacher_cache import cache_key, get_or_encode, load_embeddings


@pytest.fixture()
def sentences_file(tmp_path: Path) -> Path:
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i} is short.\n" for i in range(37)))
    return path


def test_miss_encodes_then_hit_encodes_nothing(
    tiny_model_dir: Path, sentences_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = get_or_encode(tiny_model_dir, sentences_file, cache)
    second = get_or_encode(tiny_model_dir, sentences_file, cache)
    assert (first.sentences_encoded, second.sentences_encoded) == (37, 0)
    assert first.key == second.key and first.path == second.path
    np.testing.assert_array_equal(first.load(), second.load())
    assert first.load().shape == (37, 32) and first.load().dtype == np.float32


def test_entry_is_sharded_npy_without_temp_leftovers(
    monkeypatch, tiny_model_dir, sentences_file, tmp_path
) -> None:
    monkeypatch.setattr(teacher_cache, "SHARD_ROWS", 10)
    entry = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    meta = json.loads((entry.path / "meta.json").read_text())
    assert meta["shards"] == [f"shard-0000{i}.npy" for i in range(4)]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.key]


@pytest.mark.parametrize("change", ["sentences", "dtype", "max_seq_length"])
def test_key_changes_with_each_input(tiny_model_dir, sentences_file, tmp_path, change: str) -> None:
    base = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    kwargs: dict = {}
    path = sentences_file
    if change == "sentences":
        path = tmp_path / "other.txt"
        path.write_text(sentences_file.read_text() + "one more sentence.\n")
    elif change == "dtype":
        kwargs["dtype"] = "float16"
    else:
        kwargs["max_seq_length"] = 16
    other = get_or_encode(tiny_model_dir, path, tmp_path / "cache", **kwargs)
    assert other.key != base.key and other.sentences_encoded > 0


def test_crash_while_encoding_leaves_no_entry(monkeypatch, tiny_model_dir, sentences_file, tmp_path) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    np.save(entry / "shard-00000.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    (entry / "meta.json").write_text(
        json.dumps({"rows": 1, "dim": 1, "dtype": "object", "shards": ["shard-00000.npy"]})
    )
    with pytest.raises(ValueError, match="allow_pickle"):
        load_embeddings(entry, mmap=False)


def test_bad_dtype_is_refused_before_encoding(tiny_model_dir, sentences_file, tmp_path) -> None:
    with pytest.raises(ValueError, match="float32 or float16"):
        get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache", dtype="int8")
    assert not (tmp_path / "cache").exists()


def test_key_is_order_sensitive() -> None:
    assert cache_key("t", ["a", "b"], "float32") != cache_key("t", ["b", "a"], "float32")
