import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.benchmark import BACKGROUND_CPU_WARN_PCT, QualityResult, SpeedResult, speed_metrics
from tasks.compress import StepFailure
from tasks.report import (
    METRIC_COLUMNS,
    STS_LABELS_LEGEND,
    TABLE_COLUMNS,
    build_table,
    format_table,
    gpu_note,
    metric_columns,
    pareto_mask,
    plot_bars,
    plot_tradeoff,
    speed_note,
    summary_markdown,
)
from tasks.variants import Variant


def _quality(
    spearman: float, size_mb: float, mse: float = 0.1, agreement: float = 0.9, bytes_per_vector: int = 1536
) -> QualityResult:
    return QualityResult(
        spearman, spearman, spearman, spearman, mse, 384, bytes_per_vector, 1000, size_mb, None, agreement
    )


@pytest.fixture()
def table() -> pd.DataFrame:
    variants = [
        Variant("teacher", "teacher", Path("t")),
        Variant("s3", "layer-reduced", Path("s"), parent="teacher"),
    ]
    speed = SpeedResult({"teacher": 100.0, "s3": 250.0}, {"teacher": [1.0], "s3": [0.4]}, 1000, 64, 2, "cpu")
    return build_table(variants, [_quality(0.80, 90.0, 0.0, 1.0), _quality(0.78, 45.0)], speed)


def test_ratios_are_relative_to_the_teacher(table: pd.DataFrame) -> None:
    assert list(table.columns) == TABLE_COLUMNS
    student = table.iloc[1]
    assert student["sts_test_retention_pct"] == pytest.approx(97.5)
    assert student["speedup_vs_teacher"] == pytest.approx(2.5)
    assert student["size_reduction_vs_teacher"] == pytest.approx(2.0)
    assert table.iloc[0]["speedup_vs_teacher"] == 1.0
    assert student["heldout_agreement_spearman"] == 0.9 and "heldout_agreement_spearman" in METRIC_COLUMNS
    assert "uses_sts_labels" not in METRIC_COLUMNS  # an MLflow param (see tracking), not a metric


def test_cpu_only_rows_are_compared_with_the_teacher_on_the_cpu() -> None:
    """On a GPU run, an ONNX row is timed on the CPU: its speed-up is against the teacher timed there."""
    variants = [
        Variant("teacher", "teacher", Path("t")),
        Variant("s3", "layer-reduced", Path("s"), parent="teacher"),
        Variant("s3-onnx", "quantized", Path("s"), parent="s3", backend="onnx"),
    ]
    speed = SpeedResult(
        {"teacher": 4000.0, "s3": 10000.0, "s3-onnx": 300.0, "teacher@cpu": 100.0},
        {},
        1000,
        64,
        16,
        "Test CPU (16 cores)",
        devices={"teacher": "cuda", "s3": "cuda", "s3-onnx": "cpu", "teacher@cpu": "cpu"},
        device_labels={"cuda": "cuda (Test GPU)", "cpu": "cpu (Test CPU (16 cores))"},
        reference={"cuda": "teacher", "cpu": "teacher@cpu"},
    )
    table = build_table(variants, [_quality(0.8, 90.0), _quality(0.78, 45.0), _quality(0.78, 20.0)], speed)
    rows = table.set_index("variant")
    assert rows["speedup_vs_teacher"].to_dict() == pytest.approx({"teacher": 1.0, "s3": 2.5, "s3-onnx": 3.0})
    assert rows["speed_device"].to_dict() == {
        "teacher": "cuda (Test GPU)",
        "s3": "cuda (Test GPU)",
        "s3-onnx": "cpu (Test CPU (16 cores))",
    }
    assert "speed_device" not in METRIC_COLUMNS
    assert "teacher timed on the CPU" in gpu_note(speed) and gpu_note(SpeedResult({}, {}, 1, 1, 1, "")) == ""


def test_each_row_states_its_training_corpus(tmp_path: Path) -> None:
    """train_sentences: the student's corpus size, inherited by rows made from it; blank for the teacher."""
    student = Variant("s3", "layer-reduced", Path("s"), parent="teacher", train_sentences=12072)
    variants = [
        Variant("teacher", "teacher", Path("t")),
        student,
        student.derive("s3-int8", "quantized", "x"),
    ]
    speed = SpeedResult({"teacher": 100.0, "s3": 250.0, "s3-int8": 260.0}, {}, 1000, 64, 2, "cpu")
    table = build_table(variants, [_quality(0.8, 90.0), _quality(0.78, 45.0), _quality(0.78, 45.0)], speed)
    assert math.isnan(table.iloc[0]["train_sentences"])
    assert list(table["train_sentences"][1:]) == [12072, 12072]
    assert "train_sentences" in METRIC_COLUMNS
    shown = format_table(table)
    assert (
        "| train_sentences" in shown.splitlines()[0].replace(" |", "|").replace("|", "| ")
        or "train_sentences" in shown
    )
    assert "12072" in shown


def test_teacher_must_come_first() -> None:
    with pytest.raises(ValueError, match="first variant must be the teacher"):
        build_table(
            [Variant("s", "layer-reduced", Path("s"))],
            [_quality(0.5, 1)],
            SpeedResult({"s": 1}, {}, 1, 1, 1, ""),
        )


def test_markdown_and_plots(table: pd.DataFrame, tmp_path: Path) -> None:
    text = format_table(table)
    assert "| s3 " in text and "97.5" in text and "2.50" in text
    for plot in (plot_tradeoff, plot_bars):
        path = plot(table, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_rows_that_saw_sts_labels_are_marked(tmp_path: Path) -> None:
    cosent = Variant("c", "layer-reduced", Path("c"), parent="teacher", uses_sts_labels=True)
    variants = [
        Variant("teacher", "teacher", Path("t")),
        cosent,
        cosent.derive("c-int8", "quantized", "int8"),
    ]
    names = [v.name for v in variants]
    speed = SpeedResult(dict.fromkeys(names, 1.0), dict.fromkeys(names, [1.0]), 10, 8, 1, "cpu")
    table = build_table(variants, [_quality(0.8, 90.0), _quality(0.8, 40.0), _quality(0.8, 20.0)], speed)
    assert table["uses_sts_labels"].tolist() == [False, True, True]
    assert table["variant"].tolist() == names  # the mark is only in the rendered table
    text = format_table(table)
    assert "| teacher " in text and "| c† " in text and "| c-int8† " in text
    assert text.endswith(STS_LABELS_LEGEND) and "saw STS-B train labels" in STS_LABELS_LEGEND


def test_label_free_table_has_no_legend(table: pd.DataFrame) -> None:
    text = format_table(table)
    assert "†" not in text and STS_LABELS_LEGEND not in text


def test_nan_mse_renders_empty(table: pd.DataFrame) -> None:
    table.loc[1, "mse_to_teacher"] = math.nan
    assert "nan" not in format_table(table)


NAN = math.nan


@pytest.mark.parametrize(
    ("x", "y", "maximize_x", "expected"),
    [
        ([1.0, 2.0, 3.0], [100.0, 90.0, 80.0], True, [True, True, True]),  # a clean trade-off
        ([1.0, 2.0, 1.5], [100.0, 90.0, 85.0], True, [True, True, False]),  # slower and worse than 2.0
        ([2.0, 2.0], [90.0, 95.0], True, [False, True]),  # tie on x, better y wins
        ([2.0, 2.0], [90.0, 90.0], True, [True, True]),  # identical points do not dominate each other
        ([1.0, NAN, 3.0], [100.0, 99.0, NAN], True, [True, False, False]),  # NaN never on, never dominates
        ([NAN, 1.0], [200.0, 50.0], True, [False, True]),
        ([5.0], [42.0], True, [True]),  # a single point
        ([], [], True, []),
        ([1536.0, 384.0, 48.0, 400.0], [100.0, 99.0, 90.0, 95.0], False, [True, True, True, False]),
    ],
)
def test_pareto_mask(x: list[float], y: list[float], maximize_x: bool, expected: list[bool]) -> None:
    mask = pareto_mask(np.array(x), np.array(y), maximize_x=maximize_x)
    assert mask.dtype == bool and mask.tolist() == expected


@pytest.fixture()
def frontier_table() -> pd.DataFrame:
    names = ["teacher", "fast", "slow-worse", "small"]
    variants = [Variant("teacher", "teacher", Path("t"))] + [
        Variant(name, "layer-reduced", Path(name), parent="teacher") for name in names[1:]
    ]
    speed = SpeedResult(
        {"teacher": 100.0, "fast": 300.0, "slow-worse": 150.0, "small": 100.0},
        dict.fromkeys(names, [1.0]),
        1000,
        64,
        2,
        "cpu",
    )
    quality = [
        _quality(0.80, 90.0),
        _quality(0.76, 45.0),
        _quality(0.70, 60.0),
        _quality(0.78, 90.0, bytes_per_vector=384),  # int8 vectors
    ]
    return build_table(variants, quality, speed, [StepFailure("fast", "onnx", "boom")])


def test_frontier_columns(frontier_table: pd.DataFrame) -> None:
    rows = frontier_table.set_index("variant")
    assert rows["on_frontier"].to_dict() == {
        "teacher": True,
        "fast": True,
        "slow-worse": False,  # slower and worse than "fast"
        "small": False,  # as fast as the teacher, keeps less
        "fast-onnx": False,  # failed rows are never on a frontier
    }
    assert rows["on_storage_frontier"].to_dict() == {
        "teacher": True,
        "fast": False,  # same bytes as the teacher, keeps less
        "slow-worse": False,
        "small": True,  # 4x fewer bytes
        "fast-onnx": False,
    }
    columns = list(frontier_table.columns)
    assert columns.index("on_frontier") == columns.index("speed_device") + 1
    assert columns.index("on_storage_frontier") == columns.index("speed_device") + 2


def test_frontier_columns_are_metrics(table: pd.DataFrame) -> None:
    assert {"on_frontier", "on_storage_frontier"} <= set(metric_columns(table))
    assert {"on_frontier", "on_storage_frontier"} <= set(METRIC_COLUMNS)
    assert [float(v) for v in table["on_frontier"]] == [1.0, 1.0]
    assert [float(v) for v in table["on_storage_frontier"]] == [1.0, 0.0]  # same bytes, teacher keeps more


def test_format_table_shows_frontier_as_yes(frontier_table: pd.DataFrame) -> None:
    text = format_table(frontier_table)
    assert "True" not in text and "False" not in text
    header, _, *rows = text.splitlines()
    column = [c.strip() for c in header.split("|")].index("on_frontier")
    flags = {row.split("|")[1].strip(): row.split("|")[column].strip() for row in rows}
    assert flags == {"teacher": "yes", "fast": "yes", "slow-worse": "", "small": "", "fast-onnx": ""}


def test_tradeoff_plot_with_frontiers_and_failures(frontier_table: pd.DataFrame, tmp_path: Path) -> None:
    path = plot_tradeoff(frontier_table, tmp_path / "tradeoff.png")
    assert path.stat().st_size > 0 and path.read_bytes()[:4] == b"\x89PNG"


def test_summary_markdown(frontier_table: pd.DataFrame) -> None:
    text = summary_markdown(frontier_table, "Champion: **fast**, 3x faster.", "http://mlflow/#/runs/1")
    assert text.startswith("# ") and "Champion: **fast**, 3x faster." in text
    assert "[MLflow run](http://mlflow/#/runs/1)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["fast", "teacher", "small"]  # by speed-up
    assert rows[0].split("|")[-2].strip() == "speed"
    assert rows[1].split("|")[-2].strip() == "speed, storage"
    assert rows[2].split("|")[-2].strip() == "storage"
    assert "97.5" in rows[2] and "384" in rows[2] and "slow-worse" not in text and "fast-onnx" not in text
    assert "MLflow run" not in summary_markdown(frontier_table, "x", None)


def test_rows_that_saw_sts_labels_have_a_frontier_of_their_own() -> None:
    """A CoSENT row that is faster and scores more on STS-B does not push label-free rows off theirs."""
    cosent = Variant("cosent", "layer-reduced", Path("c"), parent="teacher", uses_sts_labels=True)
    variants = [Variant("teacher", "teacher", Path("t")), Variant("s", "layer-reduced", Path("s")), cosent]
    speed = SpeedResult({"teacher": 100.0, "s": 200.0, "cosent": 300.0}, {}, 10, 8, 1, "cpu")
    quality = [_quality(0.80, 90.0), _quality(0.79, 40.0), _quality(0.82, 40.0)]
    table = build_table(variants, quality, speed).set_index("variant")
    assert table["on_frontier"].to_dict() == {"teacher": True, "s": True, "cosent": True}


@pytest.mark.parametrize(
    ("pct", "metrics", "says"),
    [
        (None, {}, None),
        (2.0, {"benchmark.background_cpu_pct": 2.0}, "Other processes used 2% of the machine's CPU while"),
        (BACKGROUND_CPU_WARN_PCT + 30, {"benchmark.background_cpu_pct": 40.0}, "noisier than usual"),
    ],
)
def test_the_report_says_how_busy_the_machine_was_while_timing(pct, metrics, says) -> None:
    speed = SpeedResult({"teacher": 1.0}, {"teacher": [1.0, 1.0]}, 10, 8, 2, "cpu", background_cpu_pct=pct)
    note = speed_note(speed)
    assert note.startswith("Speed: 10 held-out sentences, batch 8, 2 threads, cpu; median of 2 interleaved")
    assert speed_metrics(speed) == metrics
    if says is None:
        assert "Other processes" not in note
    else:
        assert says in note
