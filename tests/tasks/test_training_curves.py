"""Trainer log entries -> MLflow curve points."""

import math

from tasks.training_curves import curve_metrics


def test_known_keys_become_named_curves_and_the_rest_is_skipped() -> None:
    entry = {"loss": 0.5, "learning_rate": 1e-4, "eval_sts-dev_spearman_cosine": 0.8, "epoch": 1, "other": 3}
    points = {m.key: m.value for m in curve_metrics(entry, step=10, timestamp_ms=0)}
    assert points == {
        "training/loss": 0.5,
        "training/learning_rate": 1e-4,
        "training/sts_dev_spearman": 0.8,
        "training/epoch": 1.0,
    }


def test_a_matryoshka_student_gets_a_curve_per_prefix_and_their_mean() -> None:
    entry = {
        "eval_sequential_score": 0.78,
        "eval_sts-dev_spearman_cosine": 0.86,
        "eval_sts-dev-128_spearman_cosine": 0.85,
        "eval_sts-dev-32_spearman_cosine": math.nan,  # not a number: skipped
        "eval_sts-dev-x_spearman_cosine": 0.1,
    }
    metrics = curve_metrics(entry, step=3, timestamp_ms=7)
    assert {m.key: m.value for m in metrics} == {
        "training/sts_dev_spearman_mean_over_dims": 0.78,
        "training/sts_dev_spearman": 0.86,
        "training/sts_dev_spearman_dim128": 0.85,
    }
    assert {(m.step, m.timestamp) for m in metrics} == {(3, 7)}
