import math
from pathlib import Path

import pandas as pd
import pytest

from tasks.benchmark import QualityResult, SpeedResult
from tasks.report import (
    METRIC_COLUMNS,
    STS_LABELS_LEGEND,
    TABLE_COLUMNS,
    build_table,
    format_table,
    plot_bars,
    plot_tradeoff,
)
from tasks.variants import Variant


def _quality(spearman: float, size_mb: float, mse: float = 0.1, agreement: float = 0.9) -> QualityResult:
    return QualityResult(
        spearman, spearman, spearman, spearman, mse, 384, 1536, 1000, size_mb, None, agreement
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
