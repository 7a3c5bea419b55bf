from pathlib import Path

import numpy as np
import pytest

from tasks.benchmark import Variant, evaluate_quality, measure_throughput
from tasks.config import BenchmarkConfig, DataConfig
from tasks.data import prepare_data
from tasks.teacher_cache import get_or_encode
from tests.conftest import build_tiny_model


@pytest.fixture()
def prepared(data_dir: Path, tmp_path: Path):
    return prepare_data.fn(
        DataConfig(
            data_dir=data_dir,
            corpus_wiki_sentences=10,
            include_stsb_train=False,
            heldout_sentences=50,
            max_eval_pairs=60,
        ),
        tmp_path,
    )


def test_teacher_against_itself_has_zero_mse(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    result = evaluate_quality(Variant("teacher", "teacher", tiny_model_dir), prepared, heldout)
    assert result.mse_to_teacher == pytest.approx(0.0, abs=1e-9)
    assert -1 <= result.sts_test_spearman <= 1 and -1 <= result.sts_dev_pearson <= 1
    assert result.dim == 32 and result.bytes_per_vector == 128
    assert result.parameters > 0 and result.size_mb > 0


def test_other_model_has_positive_mse(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", num_layers=2, seed=1)
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    result = evaluate_quality(Variant("other", "layer-reduced", other), prepared, heldout)
    student_emb = np.asarray(heldout.load())
    assert result.mse_to_teacher > 0 and student_emb.shape == (50, 32)


def test_throughput_times_every_variant_side_by_side(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", num_layers=1, seed=2)
    variants = [Variant("teacher", "teacher", tiny_model_dir), Variant("one-layer", "layer-reduced", other)]
    speed = measure_throughput(
        variants, prepared, BenchmarkConfig(speed_sentences=40, repeats=3, batch_size=16)
    )
    assert set(speed.sentences_per_second) == {"teacher", "one-layer"}
    assert all(len(t) == 3 for t in speed.all_timings_s.values())
    assert speed.sentences == 40 and speed.threads >= 1 and speed.cpu
