import gzip
import inspect
import logging
from pathlib import Path

import pytest

from tasks.config import DataConfig
from tasks.data import (
    DataError,
    StsPairs,
    build_corpus,
    check_data,
    decontaminate_suites,
    iter_wiki_sentences,
    prepare_data,
    read_heldout_suites,
    read_lines,
    read_sts,
    read_stsb,
)

HEADER = "split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\tsource1\tsource2\n"


def _write_stsb(folder: Path, rows: list[str], name: str = "stsb.tsv.gz", header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / name, "wt", encoding="utf-8") as handle:
        handle.write(header + "".join(r + "\n" for r in rows))
    return folder


def _row(split: str, score: str, s1: str = "A man sings.", s2: str = "A man is singing.") -> str:
    return f"{split}\tmain-captions\tMSRvid\t2012test\t0001\t{score}\t{s1}\t{s2}\t\t"


def _write_wiki(folder: Path, count: int) -> None:
    with gzip.open(folder / "wiki_en_sentences.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("curid\tsentence\n")
        for i in range(count):
            handle.write(f"{i}\tWiki sentence number {i} is here.\n")


def test_real_stsb_has_the_published_split_sizes(data_dir: Path) -> None:
    stsb = read_stsb(DataConfig(data_dir=data_dir))
    assert {k: len(v) for k, v in stsb.items()} == {"train": 5749, "dev": 1500, "test": 1379}
    all_scores = [s for pairs in stsb.values() for s in pairs.scores]
    assert min(all_scores) == 0.0 and max(all_scores) == 1.0  # normalized from 0..5


@pytest.mark.parametrize("file_name", ["stsb.tsv.gz", "stsbenchmark.tsv.gz"])
def test_both_file_layouts_are_read(tmp_path: Path, file_name: str) -> None:
    header = (
        HEADER
        if file_name == "stsb.tsv.gz"
        else "split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\n"
    )
    rows = [
        r.rsplit("\t", 2)[0] if file_name != "stsb.tsv.gz" else r
        for r in (_row("train", "5.000"), _row("dev", "2.5"), _row("test", "0"))
    ]
    folder = _write_stsb(tmp_path / "d", rows, file_name, header)
    stsb = read_stsb(DataConfig(data_dir=folder))
    assert stsb["train"].scores == [1.0] and stsb["dev"].scores == [0.5] and stsb["test"].scores == [0.0]


@pytest.mark.parametrize(
    ("score", "message"), [("abc", "is not a number"), ("7.5", "outside 0..5"), ("", "not a number")]
)
def test_bad_score_names_file_and_line(tmp_path: Path, score: str, message: str) -> None:
    folder = _write_stsb(tmp_path / "d", [_row("train", "1.0"), _row("dev", score), _row("test", "1")])
    with pytest.raises(DataError, match=rf"stsb.tsv.gz: line 3: .*{message}"):
        read_stsb(DataConfig(data_dir=folder))


def test_missing_split_is_reported(tmp_path: Path) -> None:
    folder = _write_stsb(tmp_path / "d", [_row("train", "1.0"), _row("dev", "1.0")])
    with pytest.raises(DataError, match=r"\['test'\] have no rows"):
        read_stsb(DataConfig(data_dir=folder))


def test_folder_without_files_says_what_to_put_there(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no STS benchmark file: expected one of \['stsb.tsv.gz'"):
        read_stsb(DataConfig(data_dir=tmp_path))


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        read_stsb(DataConfig(data_dir=tmp_path / "nope"))


def test_corpus_excludes_eval_sentences_and_holds_out_the_rest(tmp_path: Path) -> None:
    folder = _write_stsb(
        tmp_path / "d",
        [
            _row("train", "1", "Train one.", "Wiki sentence number 0 is here."),
            _row("dev", "1", "Dev a.", "Dev b."),
            _row("test", "1", "Wiki sentence number 1 is here.", "Test b."),
        ],
    )
    _write_wiki(folder, 30)
    config = DataConfig(data_dir=folder, corpus_wiki_sentences=5, heldout_sentences=10)
    corpus, heldout = build_corpus(config, read_stsb(config))
    assert corpus[:2] == ["Train one.", "Wiki sentence number 0 is here."]
    assert "Wiki sentence number 1 is here." not in corpus  # an STS-B test sentence
    assert len(corpus) == 2 + 4  # wiki 0 was already there from train; 5 wiki rows taken
    assert len(heldout) == 10 and not set(heldout) & set(corpus)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corpus_wiki_sentences": 0, "include_stsb_train": False}, "corpus is empty"),
        ({"corpus_wiki_sentences": 50}, "ran out"),
    ],
)
def test_corpus_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    folder = _write_stsb(
        tmp_path / "d", [_row("train", "1"), _row("dev", "1", "x", "y"), _row("test", "1", "z", "w")]
    )
    _write_wiki(folder, 30)
    config = DataConfig(data_dir=folder, heldout_sentences=10, **kwargs)
    with pytest.raises(DataError, match=message):
        build_corpus(config, read_stsb(config))


def test_prepare_data_writes_files_once(data_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(data_dir=data_dir, corpus_wiki_sentences=100, heldout_sentences=20, max_eval_pairs=30)
    first = prepare_data.fn(config, tmp_path)
    second = prepare_data.fn(config, tmp_path)
    assert first == second
    assert len(read_lines(first.heldout_file)) == 20
    assert first.corpus_size == len(read_lines(first.corpus_file)) > 100  # + STS-B train sentences
    assert len(read_sts(first.sts_file("test"))) == 30
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]


def _pairs(*pairs: tuple[str, str]) -> StsPairs:
    return StsPairs([a for a, _ in pairs], [b for _, b in pairs], [0.5] * len(pairs))


def test_decontamination_drops_seen_pairs_and_sentences_then_samples(caplog) -> None:
    seen = _pairs(("Train a.", "Train b."))
    clean = [(f"Clean {i} a.", f"Clean {i} b.") for i in range(30)]
    suite = _pairs(("Train b.", "Train a."), ("Train a.", "New."), ("New.", "Corpus s."), *clean)
    tiny = _pairs(("Only.", "Few."))
    with caplog.at_level(logging.WARNING, logger="tasks.data"):
        kept, counts = decontaminate_suites({"big": suite, "tiny": tiny}, [seen], ["Corpus s."], 20)
    assert counts == {
        "big": {"total": 33, "contaminated": 3, "clean": 30, "scored": 20},
        "tiny": {"total": 1, "contaminated": 0, "clean": 1, "scored": 0},
    }
    assert list(kept) == ["big"] and "held-out suite tiny dropped" in caplog.text
    assert set(zip(kept["big"].sentences1, kept["big"].sentences2, strict=True)) < set(clean)
    again, _ = decontaminate_suites({"big": suite}, [seen], ["Corpus s."], 20)
    assert again["big"] == kept["big"]  # a seeded sample


@pytest.mark.parametrize("include_stsb_train", [True, False])
def test_real_heldout_suites_share_nothing_with_training_or_selection(
    data_dir: Path, tmp_path: Path, include_stsb_train: bool
) -> None:
    config = DataConfig(
        data_dir=data_dir,
        corpus_wiki_sentences=200,
        include_stsb_train=include_stsb_train,
        heldout_sentences=60,
        max_eval_pairs=80,
        heldout_suite_max_pairs=40,
    )
    prepared = prepare_data.fn(config, tmp_path)
    stsb = read_stsb(config)  # uncapped: checkpoint selection and CoSENT see all of dev and train
    seen = [stsb["train"], stsb["dev"]]
    seen_pairs = {frozenset(p) for s in seen for p in zip(s.sentences1, s.sentences2, strict=True)}
    forbidden = {x for s in seen for x in s.sentences1 + s.sentences2} | set(read_lines(prepared.corpus_file))
    assert set(prepared.heldout_suites) == {"sts12", "sts13", "sts14", "sts15", "sts16"}
    for name, scored in prepared.heldout_suites.items():
        pairs = read_sts(prepared.suite_file(name))
        assert len(pairs) == scored == 40
        assert not {frozenset(p) for p in zip(pairs.sentences1, pairs.sentences2, strict=True)} & seen_pairs
        assert not set(pairs.sentences1 + pairs.sentences2) & forbidden
        counts = prepared.heldout_suite_counts[name]
        assert counts["total"] == counts["contaminated"] + counts["clean"] and counts["scored"] == scored
    counts = prepared.heldout_suite_counts
    assert {n: c["total"] for n, c in counts.items()} == {
        "sts12": 3108,
        "sts13": 1500,
        "sts14": 3750,
        "sts15": 3000,
        "sts16": 1186,
    }
    # at least the exact STS-B train pairs (shared/data/README.md) are removed
    for name, train_pairs in {
        "sts12": 1002,
        "sts13": 597,
        "sts14": 1861,
        "sts15": 1102,
        "sts16": 197,
    }.items():
        assert counts[name]["contaminated"] >= train_pairs


def test_corpus_does_not_depend_on_the_heldout_suites(data_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(data_dir=data_dir, corpus_wiki_sentences=100, heldout_sentences=20, max_eval_pairs=30)
    with_suites = prepare_data.fn(config, tmp_path / "a")
    without = prepare_data.fn(config.model_copy(update={"heldout_suites": ()}), tmp_path / "b")
    assert read_lines(with_suites.corpus_file) == read_lines(without.corpus_file)
    assert without.heldout_suites == {} and without.heldout_suite_counts == {}


def _gz(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(gzip.compress(data))
    return folder / name


def _stsb_bytes() -> bytes:
    rows = [_row("train", "1.0"), _row("dev", "2.5"), _row("test", "5")]
    return (HEADER + "".join(r + "\n" for r in rows)).encode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda raw: gzip.compress(raw)[:40],
            r"stsb.tsv.gz: the gzip data ends early, (at the start|after line \d)",
        ),
        (lambda raw: b"\x00\x01not gzip at all" * 10, r"stsb.tsv.gz: is not a gzip file .*replace it"),
        (lambda raw: raw, r"stsb.tsv.gz: is not a gzip file"),  # plain text under a .gz name
        (lambda raw: b"", r"stsb.tsv.gz: the file is empty; expected a header line"),
        (
            lambda raw: gzip.compress(raw.replace(b"A man sings.", b"A man sings \xe9.", 1)),
            r"stsb.tsv.gz: line 2: the text is not UTF-8 .*re-encode",
        ),
        (
            lambda raw: gzip.compress(raw.replace(b"\tA man sings.\tA man is singing.\t\t", b"", 1)),
            r"stsb.tsv.gz: line 2: 6 tab-separated fields where the header has 10 \(split, genre",
        ),
        (
            lambda raw: gzip.compress(raw.replace(b"A man sings.", b"A man\tsings.", 1)),
            r"stsb.tsv.gz: line 2: 11 tab-separated fields",
        ),
        (
            lambda raw: gzip.compress(raw.replace(b"A man sings.", b" ", 1)),
            r"stsb.tsv.gz: line 2: sentence1 is empty",
        ),
    ],
)
def test_unreadable_stsb_is_a_data_error_naming_file_line_and_fix(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "stsb.tsv.gz").write_bytes(make(_stsb_bytes()))
    with pytest.raises(DataError, match=message):
        read_stsb(DataConfig(data_dir=folder))


def test_bom_crlf_and_blank_lines_are_read(tmp_path: Path) -> None:
    text = _stsb_bytes().replace(b"\n", b"\r\n", 2) + b"\n\n"
    _gz(tmp_path / "d", "stsb.tsv.gz", b"\xef\xbb\xbf" + text)
    stsb = read_stsb(DataConfig(data_dir=tmp_path / "d"))
    assert stsb["train"].sentences2 == ["A man is singing."] and stsb["test"].scores == [1.0]


def test_wiki_reading_stops_at_what_is_used(tmp_path: Path) -> None:
    folder = _write_stsb(
        tmp_path / "d", [_row("train", "1"), _row("dev", "1", "x", "y"), _row("test", "1", "z", "w")]
    )
    lines = ["curid\tsentence"] + [f"{i}\tWiki sentence number {i} is here." for i in range(30)]
    lines[5] = "4\t   "  # a blank sentence is skipped
    lines[25] = "broken row"  # past what is read: never looked at
    raw = gzip.compress("\n".join(lines).encode())
    (folder / "wiki_en_sentences.tsv.gz").write_bytes(raw)
    config = DataConfig(
        data_dir=folder, corpus_wiki_sentences=5, heldout_sentences=10, include_stsb_train=False
    )
    corpus, heldout = build_corpus(config, read_stsb(config))
    assert len(corpus) == 5 and len(heldout) == 10 and "" not in corpus
    (folder / "wiki_en_sentences.tsv.gz").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(
        DataError, match=r"wiki_en_sentences.tsv.gz: the gzip data ends early, after line \d+"
    ):
        build_corpus(config, read_stsb(config))


def test_plain_text_wiki_layout_reports_a_truncated_file(tmp_path: Path) -> None:
    folder = _write_stsb(
        tmp_path / "d", [_row("train", "1"), _row("dev", "1", "x", "y"), _row("test", "1", "z", "w")]
    )
    raw = gzip.compress("".join(f"Sentence number {i} is here.\n" for i in range(200)).encode())
    (folder / "wikipedia-en-sentences.txt.gz").write_bytes(raw)
    config = DataConfig(data_dir=folder, corpus_wiki_sentences=20, heldout_sentences=10)
    assert len(build_corpus(config, read_stsb(config))[1]) == 10
    (folder / "wikipedia-en-sentences.txt.gz").write_bytes(raw[:-30])
    with pytest.raises(DataError, match=r"wikipedia-en-sentences.txt.gz: the gzip data"):
        list(iter_wiki_sentences(config))


def test_corpus_that_runs_out_names_the_file(tmp_path: Path) -> None:
    folder = _write_stsb(
        tmp_path / "d", [_row("train", "1"), _row("dev", "1", "x", "y"), _row("test", "1", "z", "w")]
    )
    _write_wiki(folder, 0)  # header only
    config = DataConfig(
        data_dir=folder, corpus_wiki_sentences=5, heldout_sentences=10, include_stsb_train=False
    )
    with pytest.raises(
        DataError, match=r"wiki_en_sentences.tsv.gz: the Wikipedia corpus ran out.* gave 0 \+ 0"
    ):
        build_corpus(config, read_stsb(config))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("dataset\tscore\tsentence1\tsentence2\n", "has a header but no rows"),
        ("dataset\tscore\tsentence1\nSTS12\t1.0\ta\n", r"line 1: header .* lacks columns \['sentence2'\]"),
        ("dataset\tscore\tsentence1\tsentence2\nSTS12\t9\ta\tb\n", "line 2: score 9.0 is outside 0..5"),
        ("dataset\tscore\tsentence1\tsentence2\nSTS12\t1\ta\n", "line 2: 3 tab-separated fields"),
    ],
)
def test_bad_heldout_suite_is_reported(tmp_path: Path, content: str, message: str) -> None:
    _gz(tmp_path, "suite.tsv.gz", content.encode())
    config = DataConfig(data_dir=tmp_path, heldout_suites=("suite.tsv.gz",))
    with pytest.raises(DataError, match=rf"suite.tsv.gz: {message}"):
        read_heldout_suites(config)


def test_check_data_predicts_what_prepare_data_makes(data_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(data_dir=data_dir, corpus_wiki_sentences=100, heldout_sentences=20, max_eval_pairs=30)
    checked = check_data(config)
    prepared = prepare_data.fn(config, tmp_path)
    assert checked.corpus_size == prepared.corpus_size > 100  # + STS-B train sentences
    assert checked.heldout_size == prepared.heldout_size == 20
    assert checked.sts_pairs == prepared.sts_pairs
    assert set(checked.heldout_suite_pairs) == {"sts12", "sts13", "sts14", "sts15", "sts16"}


def test_check_data_of_a_hub_source_reads_nothing() -> None:
    checked = check_data(DataConfig(source="hub", data_dir=None, corpus_wiki_sentences=50))
    assert (checked.corpus_size, checked.heldout_size) == (50, 1000)


def test_prepare_data_does_not_retry_bad_input() -> None:
    from prefect.states import Failed

    condition = prepare_data.retry_condition_fn
    assert prepare_data.retries == 1 and inspect.isfunction(condition)  # Prefect calls plain functions only
    assert condition(prepare_data, None, Failed(data=DataError("stsb.tsv.gz: line 3: bad"))) is False
    assert condition(prepare_data, None, Failed(data=OSError("disk hiccup"))) is True
