import gzip
import logging
from pathlib import Path

import pytest

from tasks.config import DataConfig
from tasks.data import (
    DataError,
    StsPairs,
    build_corpus,
    decontaminate_suites,
    prepare_data,
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
