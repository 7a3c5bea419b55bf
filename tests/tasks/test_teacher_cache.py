import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tasks import teacher_cache
from tasks.teacher_cache import CacheEntryError, cache_key, get_or_encode, load_embeddings


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
    assert [info["shape"] for info in meta["shard_info"]] == [[10, 32]] * 3 + [[7, 32]]
    for name, info in zip(meta["shards"], meta["shard_info"], strict=True):
        data = (entry.path / name).read_bytes()
        assert (info["bytes"], info["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
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
    shard = entry / "shard-00000.npy"
    np.save(shard, np.array([[{"evil": 1}]], dtype=object), allow_pickle=True)
    info = {"bytes": shard.stat().st_size, "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    meta = {"format": teacher_cache.CACHE_FORMAT, "rows": 1, "dim": 1, "dtype": "float32"}
    meta |= {"shards": [shard.name], "shard_info": [{**info, "shape": [1, 1], "dtype": "float32"}]}
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_embeddings(entry, mmap=False)
    with pytest.raises(CacheEntryError, match=str(entry)):
        load_embeddings(entry, mmap=False)


def test_bad_dtype_is_refused_before_encoding(tiny_model_dir, sentences_file, tmp_path) -> None:
    with pytest.raises(ValueError, match="float32 or float16"):
        get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache", dtype="int8")
    assert not (tmp_path / "cache").exists()


def test_key_is_order_sensitive() -> None:
    assert cache_key("t", ["a", "b"], "float32") != cache_key("t", ["b", "a"], "float32")


# --- a broken entry is detected, logged, discarded and encoded again -------------------------------------


def _noise(entry: Path) -> None:  # right shape and dtype, other values: only the checksum tells
    shard = entry / "shard-00001.npy"
    original = np.load(shard)
    np.save(shard, np.random.default_rng(0).standard_normal(original.shape).astype(original.dtype))


def _truncate(entry: Path) -> None:
    shard = entry / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _random_bytes(entry: Path) -> None:
    (entry / "shard-00001.npy").write_bytes(os.urandom(1000))


def _random_bytes_same_size(entry: Path) -> None:
    shard = entry / "shard-00001.npy"
    shard.write_bytes(os.urandom(shard.stat().st_size))


def _foreign_shard(entry: Path) -> None:  # another entry's valid shard of the same shape
    (entry / "shard-00001.npy").write_bytes((entry / "shard-00002.npy").read_bytes())


def _missing_shard(entry: Path) -> None:
    (entry / "shard-00001.npy").unlink()


def _missing_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _meta_not_json(entry: Path) -> None:
    (entry / "meta.json").write_text('{"rows": 37, "dim"')


def _meta_not_an_object(entry: Path) -> None:
    (entry / "meta.json").write_text("[]")


def _meta_without_checksums(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    del meta["shard_info"]
    (entry / "meta.json").write_text(json.dumps(meta))


def _meta_path_outside(entry: Path) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta["shards"][1] = "../../sentences.txt"
    (entry / "meta.json").write_text(json.dumps(meta))


def _meta_binary(entry: Path) -> None:
    (entry / "meta.json").write_bytes(b"\xff\xfe\x00garbage")


def _entry_is_a_file(entry: Path) -> None:
    for path in entry.iterdir():
        path.unlink()
    entry.rmdir()
    entry.write_text("not a folder")


CORRUPTIONS = [
    _noise,
    _truncate,
    _random_bytes,
    _random_bytes_same_size,
    _foreign_shard,
    _missing_shard,
    _missing_meta,
    _meta_not_json,
    _meta_not_an_object,
    _meta_without_checksums,
    _meta_path_outside,
    _meta_binary,
    _entry_is_a_file,
]


@pytest.fixture()
def small_shards(monkeypatch) -> None:
    monkeypatch.setattr(teacher_cache, "SHARD_ROWS", 10)  # 37 sentences: 4 shards


@pytest.mark.usefixtures("small_shards")
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_broken_entry_is_encoded_again(tiny_model_dir, sentences_file, tmp_path, caplog, corrupt) -> None:
    cache = tmp_path / "cache"
    first = get_or_encode(tiny_model_dir, sentences_file, cache)
    expected = np.array(first.load(mmap=False))
    corrupt(first.path)

    with caplog.at_level(logging.WARNING, logger="tasks.teacher_cache"):
        again = get_or_encode(tiny_model_dir, sentences_file, cache)

    assert again.sentences_encoded == 37 and again.path == first.path
    np.testing.assert_allclose(again.load(), expected, rtol=1e-6, atol=1e-6)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(first.path) in warnings[0] and "broken" in warnings[0]
    assert [p.name for p in cache.iterdir()] == [first.key]  # nothing left aside
    assert get_or_encode(tiny_model_dir, sentences_file, cache).sentences_encoded == 0


@pytest.mark.usefixtures("small_shards")
@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _random_bytes, _random_bytes_same_size, _missing_shard, _missing_meta, _meta_not_json],
    ids=lambda f: f.__name__.strip("_"),
)
def test_loading_a_broken_entry_names_it(tiny_model_dir, sentences_file, tmp_path, corrupt) -> None:
    entry = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    corrupt(entry.path)
    with pytest.raises(CacheEntryError, match="Delete that folder") as info:
        entry.load(mmap=False)
    assert info.value.entry == entry.path and str(entry.path) in str(info.value)


@pytest.mark.usefixtures("small_shards")
def test_verified_load_catches_noise(tiny_model_dir, sentences_file, tmp_path) -> None:
    entry = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    _noise(entry.path)
    load_embeddings(entry.path)  # size, shape and dtype agree: only hashing tells
    with pytest.raises(CacheEntryError, match="sha256"):
        load_embeddings(entry.path, verify=True)


def test_cache_entry_error_pickles(tmp_path) -> None:
    import pickle

    error = pickle.loads(pickle.dumps(CacheEntryError(tmp_path, "shard-00000.npy is missing")))
    assert error.entry == tmp_path and "shard-00000.npy is missing" in str(error)


@pytest.mark.usefixtures("small_shards")
def test_concurrent_runs_on_a_broken_entry_both_succeed(tiny_model_dir, sentences_file, tmp_path) -> None:
    cache = tmp_path / "cache"
    first = get_or_encode(tiny_model_dir, sentences_file, cache)
    expected = np.array(first.load(mmap=False))
    _noise(first.path)
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(np.array(get_or_encode(tiny_model_dir, sentences_file, cache).load()))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 3
    for array in results:
        np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-6)
    assert [p.name for p in cache.iterdir()] == [first.key]


@pytest.mark.usefixtures("small_shards")
def test_publish_replaces_a_broken_entry_another_run_left(
    monkeypatch, tiny_model_dir, sentences_file, tmp_path
) -> None:
    """The entry turns up broken between the miss and the rename: it is discarded, ours goes in."""
    cache = tmp_path / "cache"
    first = get_or_encode(tiny_model_dir, sentences_file, cache)
    expected = np.array(first.load(mmap=False))
    broken = tmp_path / "broken"
    first.path.rename(broken)
    _truncate(broken)
    real_verified_hit = teacher_cache._verified_hit
    calls = []

    def miss_then_real(entry, rows, dtype):
        calls.append(entry)
        if len(calls) == 1:  # the lookup: a miss; then another "run" leaves a broken entry
            broken.rename(entry)
            return None
        return real_verified_hit(entry, rows, dtype)

    monkeypatch.setattr(teacher_cache, "_verified_hit", miss_then_real)
    again = get_or_encode(tiny_model_dir, sentences_file, cache)
    assert again.sentences_encoded == 37 and len(calls) == 2
    np.testing.assert_allclose(again.load(), expected, rtol=1e-6, atol=1e-6)
    assert [p.name for p in cache.iterdir()] == [first.key]


# --- memory: streamed sentences, memory-mapped shards, a lazy view over several ---------------------------


def test_sentences_are_streamed_with_the_key_of_the_whole_list(tmp_path: Path) -> None:
    from tasks.data import read_lines

    path = tmp_path / "mixed.txt"
    path.write_bytes("first one\r\n\nsecond\rthird, ünïcode\n\n\nlast without newline".encode())
    assert list(teacher_cache.iter_lines(path)) == read_lines(path)
    sentences = read_lines(path)
    assert teacher_cache.sentences_digest(iter(sentences)) == (
        hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
        4,
    )
    assert cache_key("t", iter(sentences), "float32") == cache_key("t", sentences, "float32")


@pytest.mark.usefixtures("small_shards")
def test_encoding_never_holds_the_sentence_list(
    monkeypatch, tiny_model_dir, sentences_file, tmp_path
) -> None:
    from tasks.data import read_lines

    expected_key = cache_key(
        teacher_cache.fingerprint_model_dir(tiny_model_dir, None), read_lines(sentences_file), "float32"
    )
    real_read_text, real_read_bytes = Path.read_text, Path.read_bytes

    def not_the_corpus(real):
        def read(self, *args, **kwargs):
            assert self != sentences_file, "the sentence file was read whole"
            return real(self, *args, **kwargs)

        return read

    monkeypatch.setattr(Path, "read_text", not_the_corpus(real_read_text))
    monkeypatch.setattr(Path, "read_bytes", not_the_corpus(real_read_bytes))
    encoded: list[int] = []
    real_load = teacher_cache.load_sentence_transformer

    def counting_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        real_encode = model.encode
        monkeypatch.setattr(
            model, "encode", lambda texts, **kw: encoded.append(len(texts)) or real_encode(texts, **kw)
        )
        return model

    monkeypatch.setattr(teacher_cache, "load_sentence_transformer", counting_model)
    entry = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    assert entry.key == expected_key  # entries written before streaming stay hits
    assert max(encoded) <= 10 and sum(encoded) == 37  # one shard at a time
    assert get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache").sentences_encoded == 0


@pytest.mark.usefixtures("small_shards")
def test_several_shards_load_as_a_lazy_view(tiny_model_dir, sentences_file, tmp_path) -> None:
    entry = get_or_encode(tiny_model_dir, sentences_file, tmp_path / "cache")
    view = entry.load()
    assert isinstance(view, teacher_cache.ShardedEmbeddings)
    shards = list(entry.shards())
    assert [len(s) for s in shards] == [10, 10, 10, 7] and all(isinstance(s, np.memmap) for s in shards)
    whole = np.concatenate(shards)
    assert view.shape == (37, 32) and len(view) == 37 and view.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(view), whole)
    np.testing.assert_array_equal(np.asarray(view, dtype=np.float64), whole.astype(np.float64))
    prefix = view[:8]  # inside the first shard: a view of its memory map, no copy
    assert isinstance(prefix, np.memmap) and np.shares_memory(prefix, view.shards[0])
    index = np.array([36, 0, 15, 15, -1, 9, 10])
    mask = np.zeros(37, dtype=bool)
    mask[[3, 12, 30]] = True
    for key in (
        slice(None),
        slice(5, 25),
        slice(8, 12),
        slice(30, 100),
        slice(36, 36),
        slice(None, None, 3),
        slice(None, None, -1),
        index,
        list(index),
        mask,
        (slice(2, 14), 0),
        (slice(2, 14), slice(4, 8)),
        (11, slice(None, 4)),
        7,
        -2,
    ):
        np.testing.assert_array_equal(view[key], whole[key])
    with pytest.raises(IndexError):
        view[37]
    with pytest.raises(IndexError):
        view[np.array([0, 40])]
