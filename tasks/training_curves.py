"""Training curves of students in their MLflow child runs: loss, learning rate and sts-dev Spearman per step.

While a student trains, :class:`MlflowCurves` (a Trainer callback) logs each of the Trainer's log entries to
the student's child run, opened before training (:class:`tasks.tracking.ChildRuns`); the run names its
parent explicitly, so no thread-local "active run" is involved. The Trainer's whole log history is stored
with the student (``training_log.json``); when a later run reuses the student instead of training it,
:func:`log_history` replays that history into the new child run, so every run's students have curves to
overlay in MLflow's compare view.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from tasks.tracking_store import short_error, with_retries

log = logging.getLogger(__name__)

HISTORY_FILE = "training_log.json"
# Trainer log keys -> MLflow metric names (grouped under "training/" in the UI)
CURVES = {
    "loss": "training/loss",
    "learning_rate": "training/learning_rate",
    "grad_norm": "training/grad_norm",
    "eval_loss": "training/eval_loss",
    "eval_sts-dev_spearman_cosine": "training/sts_dev_spearman",
    "epoch": "training/epoch",
    # a Matryoshka student: the mean over its dimensions (what picks its checkpoint), and each prefix below
    "eval_sequential_score": "training/sts_dev_spearman_mean_over_dims",
}
PREFIX_CURVE = re.compile(r"eval_sts-dev-(\d+)_spearman_cosine")


def curve_metrics(entry: dict, step: int, timestamp_ms: int) -> list[Metric]:
    """The curve points of one Trainer log entry (unknown keys and non-numbers skipped)."""
    names = dict(CURVES)
    for key in entry:
        match = PREFIX_CURVE.fullmatch(key)
        if match:
            names[key] = f"training/sts_dev_spearman_dim{match.group(1)}"
    metrics = []
    for key, name in names.items():
        value = entry.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            metrics.append(Metric(name, float(value), timestamp_ms, step))
    return metrics


def log_history(run_id: str, history: list[dict]) -> int:
    """Log a stored Trainer history into ``run_id``; returns the number of points."""
    now = int(time.time() * 1000)
    points = [m for entry in history for m in curve_metrics(entry, int(entry.get("step", 0)), now)]
    client = MlflowClient()
    for start in range(0, len(points), 900):  # MLflow takes at most 1,000 metrics per batch
        batch = points[start : start + 900]
        with_retries(lambda b=batch: client.log_batch(run_id, metrics=b), what="logging training curves")
    return len(points)


def read_history(path: Path) -> list[dict]:
    """A stored history (plain JSON), or [] when there is none (students stored before curves were kept)."""
    try:
        history = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [entry for entry in history if isinstance(entry, dict)] if isinstance(history, list) else []


class MlflowCurves(TrainerCallback):
    """Log each Trainer log entry (training loss, learning rate, evaluations) to an MLflow run, live."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        self._warned = False

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001 (Trainer's API)
        metrics = curve_metrics(logs or {}, int(state.global_step), int(time.time() * 1000))
        if not metrics:
            return
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:  # a curve point is not worth failing a training run for
            if not self._warned:
                log.warning(
                    "could not log training curves to MLflow run %s (%s)", self.run_id, short_error(exc)
                )
                self._warned = True
