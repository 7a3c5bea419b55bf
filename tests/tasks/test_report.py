import math
from pathlib import Path

import pandas as pd
import pytest

from tasks.benchmark import QualityResult, SpeedResult
from tasks.report import TABLE_COLUMNS, build_table, format_table, plot_bars, plot_tradeoff
from tasks.variants import Variant


def _quality(spearman: float, size_mb: float, mse: float = 0.1) -> QualityResult:
    return QualityResult(spearman, spearman, spearman, spearman, mse, 384, 1536, 1000, size_mb)


@pytest.fixture()
def table() -> pd.DataFrame:
    variants = [
        Variant("teacher", "teacher", Path("t")),
        Variant("s3", "layer-reduced", Path("s"), parent="teacher"),
    ]
    speed = SpeedResult({"teacher": 100.0, "s3": 250.0}, {"teacher": [1.0], "s3": [0.4]}, 1000, 64, 2, "cpu")
    return build_table(variants, [_quality(0.80, 90.0, 0.0), _quality(0.78, 45.0)], speed)


def test_ratios_are_relative_to_the_teacher(table: pd.DataFrame) -> None:
    assert list(table.columns) == TABLE_COLUMNS
    student = table.iloc[1]
    assert student["sts_test_retention_pct"] == pytest.approx(97.5)
    assert student["speedup_vs_teacher"] == pytest.approx(2.5)
    assert student["size_reduction_vs_teacher"] == pytest.approx(2.0)
    assert table.iloc[0]["speedup_vs_teacher"] == 1.0


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


def test_nan_mse_renders_empty(table: pd.DataFrame) -> None:
    table.loc[1, "mse_to_teacher"] = math.nan
    assert "nan" not in format_table(table)
