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
from matplotlib import ticker  # noqa: E402
from prefect import task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402

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
    "speed_device",  # where sentences_per_second was timed; speed-ups are against the teacher there
    "on_frontier",  # Pareto-optimal for speed-up vs retention (a 1.0/0.0 MLflow metric)
    "on_storage_frontier",  # Pareto-optimal for bytes per vector vs retention
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
    "train_sentences",  # distillation corpus its network was trained on (blank: not trained)
]
# Where a benchmarked model came from (flows/benchmark.py adds these after the others).
SOURCE_COLUMNS = ("model_ref", "source_run_id", "same_data_as_source", "same_teacher_as_source")
TEXT_COLUMNS = (*TABLE_COLUMNS[: TABLE_COLUMNS.index("speed_device") + 1], *SOURCE_COLUMNS)  # not metrics
STS_LABELS_MARK = "†"
STS_LABELS_LEGEND = (
    f"{STS_LABELS_MARK} uses_sts_labels: saw STS-B train labels (a CoSENT student or made from one), so its "
    "STS-B and held-out STS figures are not comparable with label-free rows."
)
METRIC_COLUMNS = [c for c in TABLE_COLUMNS if c not in TEXT_COLUMNS]


def pareto_mask(x: np.ndarray, y: np.ndarray, *, maximize_x: bool) -> np.ndarray:
    """True where no other point is at least as good on both axes and strictly better on one (y is
    maximized, x maximized or minimized); NaN points are never on the frontier and dominate nothing.
    Identical points do not dominate each other."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not maximize_x:
        x = -x
    valid = np.isfinite(x) & np.isfinite(y)
    xv, yv = x[valid], y[valid]
    # dominated[i]: some j has x_j >= x_i and y_j >= y_i, one of them strictly (O(n^2), n is small)
    at_least = (xv[None, :] >= xv[:, None]) & (yv[None, :] >= yv[:, None])
    strictly = (xv[None, :] > xv[:, None]) | (yv[None, :] > yv[:, None])
    mask = np.zeros(len(x), dtype=bool)
    mask[valid] = ~(at_least & strictly).any(axis=1)
    return mask


def add_frontiers(table: pd.DataFrame) -> pd.DataFrame:
    """Set ``on_frontier`` (speed-up vs retention) and ``on_storage_frontier`` (bytes per vector vs
    retention) among the ok rows; failed rows are False and take no part. Rows that saw STS-B labels and
    label-free rows get frontiers of their own: a label-trained row's STS-B score is not comparable."""
    table = table.copy()
    for column in ("on_frontier", "on_storage_frontier"):
        table[column] = False
    labelled = table["uses_sts_labels"].astype(bool).to_numpy()
    for group in (labelled, ~labelled):
        rows = (table["status"] == "ok").to_numpy() & group
        retention = table["sts_test_retention_pct"].to_numpy(dtype=float)[rows]
        for column, x, maximize_x in (
            ("on_frontier", "speedup_vs_teacher", True),
            ("on_storage_frontier", "bytes_per_vector", False),
        ):
            mask = table[column].to_numpy(dtype=bool, copy=True)
            mask[rows] = pareto_mask(table[x].to_numpy(dtype=float)[rows], retention, maximize_x=maximize_x)
            table[column] = mask
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Every numeric column of a built table (the fixed ones plus one per held-out suite)."""
    return [c for c in table.columns if c not in TEXT_COLUMNS]


def speed_note(speed: SpeedResult) -> str:
    """How speed was timed, for the report under the table."""
    repeats = len(next(iter(speed.all_timings_s.values())))
    note = (
        f"Speed: {speed.sentences} held-out sentences, batch {speed.batch_size}, {speed.threads} threads, "
        f"{speed.cpu}; median of {repeats} interleaved repeats."
    )
    pct = speed.background_cpu_pct
    if pct is not None:
        note += f" Other processes used {pct:.0f}% of the machine's CPU while timing"
        if speed.noisy:
            note += ": the speed figures are noisier than usual; time again with nothing else running"
        note += "."
    return note


def gpu_note(speed: SpeedResult) -> str:
    """What the report says when some rows were timed on a GPU."""
    gpus = sorted({label for name, label in speed.device_labels.items() if name != "cpu"})
    if not gpus:
        return ""
    return (
        f" Timed on {', '.join(gpus)} where the runtime runs there; ONNX, OpenVINO and torch-int8 rows on "
        "the CPU, their speed-ups against the teacher timed on the CPU in the same run (speed_device column)."
    )


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
    teacher_q, teacher = quality[0], variants[0].name
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
                "speed_device": speed.label(variant.name),
                "sts_dev_spearman": q.sts_dev_spearman,
                "sts_test_spearman": q.sts_test_spearman,
                "sts_test_pearson": q.sts_test_pearson,
                "sts_test_retention_pct": 100.0 * q.sts_test_spearman / teacher_q.sts_test_spearman,
                "heldout_mean_spearman": float(np.mean(list(suites.values()))) if suites else math.nan,
                "heldout_agreement_spearman": q.heldout_agreement_spearman,
                "mse_to_teacher": q.mse_to_teacher,
                "sentences_per_second": sps,
                "speedup_vs_teacher": sps / speed.teacher_speed(variant.name, teacher),
                "size_mb": q.size_mb,
                "size_reduction_vs_teacher": teacher_q.size_mb / q.size_mb if q.size_mb else math.nan,
                "parameters": q.parameters,
                "embedding_dim": q.dim,
                "bytes_per_vector": q.bytes_per_vector,
                "build_seconds": variant.build_seconds,
                "train_sentences": math.nan if variant.train_sentences is None else variant.train_sentences,
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
    table = add_frontiers(pd.DataFrame(rows))
    return table[TABLE_COLUMNS + [c for c in table.columns if c not in TABLE_COLUMNS]]


def format_table(table: pd.DataFrame) -> str:
    """Markdown with readable precision (what the CLI prints and the .md file holds); rows that saw STS-B
    labels are marked, with a legend under the table."""
    shown = table.copy()
    labelled = table["uses_sts_labels"].astype(bool)
    shown["variant"] = shown["variant"] + labelled.map({True: STS_LABELS_MARK, False: ""})
    shown["uses_sts_labels"] = labelled.map({True: "yes", False: "no"})
    shown["reused"] = table["reused"].astype(bool).map({True: "yes", False: "no"})
    for column in ("on_frontier", "on_storage_frontier"):
        if column in table:
            shown[column] = table[column].astype(bool).map({True: "yes", False: ""})
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
        "train_sentences": 0,
    }.items():
        shown[column] = shown[column].map(lambda v, d=digits: "" if pd.isna(v) else f"{v:.{d}f}")
    text = shown.to_markdown(index=False, disable_numparse=True)
    return text + "\n\n" + STS_LABELS_LEGEND if labelled.any() else text


def _minor_log_label(value: float, _: object) -> str:
    """Label the 2s and 5s of a decade on a log axis, leave the other minor ticks bare."""
    mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0.0
    return f"{value:g}" if any(math.isclose(mantissa, m) for m in (2.0, 5.0)) else ""


def plot_tradeoff(table: pd.DataFrame, path: Path) -> Path:
    """Two panels, STS-B retention against speed-up and against bytes per vector (log x axes): every ok
    variant by kind, the Pareto frontier as a staircase, and labels on frontier points only."""
    table = table[table["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x, xlabel, frontier, step in (
        # staircase of the dominated region: "pre" where y falls along x, "post" where it rises
        (left, "speedup_vs_teacher", "speed-up vs teacher (x, same run, log)", "on_frontier", "pre"),
        (right, "bytes_per_vector", "bytes per stored vector (log)", "on_storage_frontier", "post"),
    ):
        shown = table[table[x] > 0]  # a log axis: no zero or NaN
        for kind, group in shown.groupby("kind", sort=False):
            ax.scatter(group[x], group["sts_test_retention_pct"], s=40, alpha=0.8, label=kind)
        front = shown[shown[frontier].astype(bool)].sort_values(x)
        if len(front):
            ax.step(
                front[x],
                front["sts_test_retention_pct"],
                where=step,
                color="black",
                lw=1,
                alpha=0.6,
                marker="o",
                markersize=11,
                markerfacecolor="none",
                label="Pareto frontier",
            )
        for _, row in front.iterrows():
            ax.annotate(
                row["variant"],
                (row[x], row["sts_test_retention_pct"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
        if len(shown):
            ax.set_xscale("log")
            # plain numbers (1, 2, 5, 10, 20, ...) rather than 2x10^0
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.FuncFormatter(_minor_log_label))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("STS-B test Spearman retained (%)")
        ax.grid(alpha=0.3, which="both")
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
def write_report(
    table: pd.DataFrame, out_dir: Path, speed: SpeedResult, artifact_key: str = "distillation-tradeoff"
) -> dict[str, Path]:
    """Write CSV, Markdown and plots to ``out_dir`` and publish the table as the Prefect table artifact
    ``artifact_key``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": out_dir / "tradeoff.csv",
        "markdown": out_dir / "tradeoff.md",
        "tradeoff_plot": plot_tradeoff(table, out_dir / "tradeoff.png"),
        "bars_plot": plot_bars(table, out_dir / "variants.png"),
    }
    table.to_csv(files["csv"], index=False)
    note = speed_note(speed) + gpu_note(speed)
    files["markdown"].write_text(format_table(table) + "\n\n" + note + "\n", encoding="utf-8")
    create_table_artifact(
        key=artifact_key,
        table=table.round(4).astype(object).where(table.notna(), "").to_dict(orient="records"),
        description="Speed / STS trade-off, ratios to the teacher measured in the same run. "
        + note
        + (" " + STS_LABELS_LEGEND if table["uses_sts_labels"].any() else ""),
    )
    return files


def summary_markdown(table: pd.DataFrame, selection_md: str, mlflow_run_url: str | None) -> str:
    """A short Markdown summary: heading, the caller's champion paragraph, a link to the MLflow run and
    the frontier rows (either frontier), fastest first."""
    lines = ["# Distillation summary", "", selection_md.strip(), ""]
    if mlflow_run_url:
        lines += [f"[MLflow run]({mlflow_run_url})", ""]
    speed, storage = table["on_frontier"].astype(bool), table["on_storage_frontier"].astype(bool)
    front = table[speed | storage].sort_values("speedup_vs_teacher", ascending=False, kind="stable")
    if front.empty:
        return "\n".join([*lines, "No variant is on a frontier."]) + "\n"

    def fmt(value: object, digits: int) -> str:
        return "" if pd.isna(value) else f"{float(value):.{digits}f}"

    labelled = front["uses_sts_labels"].astype(bool)
    rows = pd.DataFrame(
        {
            "variant": front["variant"] + labelled.map({True: STS_LABELS_MARK, False: ""}),
            "retention %": front["sts_test_retention_pct"].map(lambda v: fmt(v, 1)),
            "speed-up": front["speedup_vs_teacher"].map(lambda v: fmt(v, 2)),
            "bytes/vector": front["bytes_per_vector"].map(lambda v: fmt(v, 0)),
            "size MB": front["size_mb"].map(lambda v: fmt(v, 1)),
            "frontier": [
                ", ".join(name for name, on in (("speed", fast), ("storage", small)) if on)
                for fast, small in zip(speed[front.index], storage[front.index], strict=True)
            ],
        }
    )
    lines += ["Pareto frontiers: no other variant beats these on both speed (or storage) and retention.", ""]
    lines.append(rows.to_markdown(index=False, disable_numparse=True))
    if labelled.any():
        lines += ["", STS_LABELS_LEGEND]
    return "\n".join(lines) + "\n"


def publish_summary(table: pd.DataFrame, selection_md: str, mlflow_run_url: str | None) -> str:
    """Publish :func:`summary_markdown` as the Prefect markdown artifact ``distillation-summary``."""
    markdown = summary_markdown(table, selection_md, mlflow_run_url)
    create_markdown_artifact(
        key="distillation-summary",
        markdown=markdown,
        description="Champion and Pareto-frontier variants of the speed / STS trade-off.",
    )
    return markdown
