"""The speed / STS trade-off table: one row per variant, ratios to the teacher, files, plots and artifacts."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402

from tasks.benchmark import QualityResult, SpeedResult  # noqa: E402
from tasks.compress import StepFailure  # noqa: E402
from tasks.variants import Variant  # noqa: E402

log = logging.getLogger(__name__)

# Column order of the table (also the MLflow metric names of each child run).
TABLE_COLUMNS = [
    "variant",
    "kind",
    "parent",
    "lineage",
    "uses_sts_labels",
    "status",
    "reused",
    "sts_dev_spearman",
    "sts_test_spearman",
    "sts_test_pearson",
    "sts_test_retention_pct",
    "heldout_mean_spearman",
    "heldout_agreement_spearman",
    "mse_to_teacher",
    "sentences_per_second",
    "speedup_vs_teacher",
    "size_mb",
    "size_reduction_vs_teacher",
    "parameters",
    "embedding_dim",
    "bytes_per_vector",
    "build_seconds",
]
TEXT_COLUMNS = ("variant", "kind", "parent", "lineage", "uses_sts_labels", "status", "reused")  # not metrics
STS_LABELS_MARK = "†"
STS_LABELS_LEGEND = (
    f"{STS_LABELS_MARK} uses_sts_labels: saw STS-B train labels (a CoSENT student or made from one), so its "
    "STS-B and held-out STS figures are not comparable with label-free rows."
)
METRIC_COLUMNS = [c for c in TABLE_COLUMNS if c not in TEXT_COLUMNS]


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Every numeric column of a built table (the fixed ones plus one per held-out suite)."""
    return [c for c in table.columns if c not in TEXT_COLUMNS]


def build_table(
    variants: list[Variant],
    quality: list[QualityResult],
    speed: SpeedResult,
    failures: list[StepFailure] | tuple[StepFailure, ...] = (),
) -> pd.DataFrame:
    """Rows in variant order, then one row per failed step (``status`` says why, no figures); the first
    variant must be the teacher (the reference of every ratio)."""
    if not variants or variants[0].kind != "teacher":
        raise ValueError("the first variant must be the teacher")
    teacher_q, teacher_sps = quality[0], speed.sentences_per_second[variants[0].name]
    rows = []
    for variant, q in zip(variants, quality, strict=True):
        sps = speed.sentences_per_second[variant.name]
        suites = q.heldout_spearman or {}
        rows.append(
            {
                "variant": variant.name,
                "kind": variant.kind,
                "parent": variant.parent or "",
                "lineage": variant.lineage,
                "uses_sts_labels": variant.uses_sts_labels,
                "status": "ok",
                "reused": variant.reused,
                "sts_dev_spearman": q.sts_dev_spearman,
                "sts_test_spearman": q.sts_test_spearman,
                "sts_test_pearson": q.sts_test_pearson,
                "sts_test_retention_pct": 100.0 * q.sts_test_spearman / teacher_q.sts_test_spearman,
                "heldout_mean_spearman": float(np.mean(list(suites.values()))) if suites else math.nan,
                "heldout_agreement_spearman": q.heldout_agreement_spearman,
                "mse_to_teacher": q.mse_to_teacher,
                "sentences_per_second": sps,
                "speedup_vs_teacher": sps / teacher_sps,
                "size_mb": q.size_mb,
                "size_reduction_vs_teacher": teacher_q.size_mb / q.size_mb if q.size_mb else math.nan,
                "parameters": q.parameters,
                "embedding_dim": q.dim,
                "bytes_per_vector": q.bytes_per_vector,
                "build_seconds": variant.build_seconds,
                **{f"heldout_{name}_spearman": value for name, value in suites.items()},
            }
        )
    by_name = {v.name: v for v in variants}
    for failure in failures:
        target = by_name.get(failure.target)
        rows.append(
            {
                "variant": failure.name,
                "kind": "failed",
                "parent": failure.target,
                "lineage": f"{target.lineage if target else failure.target} > {failure.step}",
                "uses_sts_labels": bool(target and target.uses_sts_labels),
                "status": f"failed: {failure.error}"[:300],
                "reused": False,
            }
        )
    table = pd.DataFrame(rows)
    return table[TABLE_COLUMNS + [c for c in table.columns if c not in TABLE_COLUMNS]]


def format_table(table: pd.DataFrame) -> str:
    """Markdown with readable precision (what the CLI prints and the .md file holds); rows that saw STS-B
    labels are marked, with a legend under the table."""
    shown = table.copy()
    labelled = table["uses_sts_labels"].astype(bool)
    shown["variant"] = shown["variant"] + labelled.map({True: STS_LABELS_MARK, False: ""})
    shown["uses_sts_labels"] = labelled.map({True: "yes", False: "no"})
    shown["reused"] = table["reused"].astype(bool).map({True: "yes", False: "no"})
    suite_columns = {c: 4 for c in table.columns if c.startswith("heldout_")}
    for column, digits in {
        **suite_columns,
        "sts_dev_spearman": 4,
        "sts_test_spearman": 4,
        "sts_test_pearson": 4,
        "sts_test_retention_pct": 1,
        "mse_to_teacher": 4,
        "sentences_per_second": 1,
        "speedup_vs_teacher": 2,
        "size_mb": 1,
        "size_reduction_vs_teacher": 2,
        "build_seconds": 0,
    }.items():
        shown[column] = shown[column].map(lambda v, d=digits: "" if pd.isna(v) else f"{v:.{d}f}")
    text = shown.to_markdown(index=False, disable_numparse=True)
    return text + "\n\n" + STS_LABELS_LEGEND if labelled.any() else text


def plot_tradeoff(table: pd.DataFrame, path: Path) -> Path:
    """Two panels: STS-B test Spearman vs speedup (the trade-off), and size vs retention."""
    table = table[table["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x, xlabel in (
        (left, "speedup_vs_teacher", "speed-up vs teacher (x, same run)"),
        (right, "size_reduction_vs_teacher", "size reduction vs teacher (x)"),
    ):
        for kind, group in table.groupby("kind", sort=False):
            ax.scatter(group[x], group["sts_test_retention_pct"], s=60, label=kind)
        for _, row in table.iterrows():
            ax.annotate(
                row["variant"],
                (row[x], row["sts_test_retention_pct"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("STS-B test Spearman retained (%)")
        ax.grid(alpha=0.3)
    left.legend(loc="lower left", fontsize=8)
    fig.suptitle("What each shortcut costs: STS-B retention against speed and size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(table: pd.DataFrame, path: Path) -> Path:
    """Per-variant bars: STS-B test Spearman, sentences/s, size, MSE to the teacher."""
    panels = [
        ("sts_test_spearman", "STS-B test Spearman"),
        ("sentences_per_second", "sentences / s"),
        ("size_mb", "size on disk (MB)"),
        ("mse_to_teacher", "MSE to teacher (x100, held-out)"),
    ]
    table = table[table["status"] == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (column, title) in zip(axes.ravel(), panels, strict=True):
        ax.barh(table["variant"], table[column].fillna(0))
        ax.set_title(title)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@task(name="write-report")
def write_report(table: pd.DataFrame, out_dir: Path, speed: SpeedResult) -> dict[str, Path]:
    """Write CSV, Markdown and plots to ``out_dir`` and publish the table as a Prefect artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": out_dir / "tradeoff.csv",
        "markdown": out_dir / "tradeoff.md",
        "tradeoff_plot": plot_tradeoff(table, out_dir / "tradeoff.png"),
        "bars_plot": plot_bars(table, out_dir / "variants.png"),
    }
    table.to_csv(files["csv"], index=False)
    note = (
        f"Speed: {speed.sentences} held-out sentences, batch {speed.batch_size}, {speed.threads} threads, "
        f"{speed.cpu}; median of {len(next(iter(speed.all_timings_s.values())))} interleaved repeats."
    )
    files["markdown"].write_text(format_table(table) + "\n\n" + note + "\n", encoding="utf-8")
    create_table_artifact(
        key="distillation-tradeoff",
        table=table.round(4).astype(object).where(table.notna(), "").to_dict(orient="records"),
        description="Speed / STS trade-off, ratios to the teacher measured in the same run. "
        + note
        + (" " + STS_LABELS_LEGEND if table["uses_sts_labels"].any() else ""),
    )
    return files
