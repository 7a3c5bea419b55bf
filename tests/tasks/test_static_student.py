import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tasks.config import StaticStudentConfig
from tasks.models import load_sentence_transformer
from tasks.static_student import MIN_TRAIN_SENTENCES, distill_static, train_static
from tasks.variants import Variant, encode, load_model
from tests.conftest import tiny_prepared


@pytest.mark.parametrize("pca_dims", [16, None])
def test_static_student_loads_and_encodes(tiny_model_dir: Path, tmp_path: Path, pca_dims: int | None) -> None:
    source = Variant("teacher", "teacher", tiny_model_dir)
    student = distill_static(source, tmp_path, pca_dims)
    assert student.name == f"teacher-static{pca_dims or ''}"
    variant = student.as_variant()
    assert variant.kind == "static" and variant.parent == "teacher"
    assert variant.lineage == f"teacher > static{pca_dims or ''}"
    # model2vec stores float16 weights (half the size); the variant hands out float32 vectors like all others
    assert load_sentence_transformer(student.model_dir).encode(["a man"]).dtype == np.float16
    out = encode(load_model(variant), variant, ["the man is playing", "a dog in the park"], batch_size=2)
    assert out.shape == (2, pca_dims or 32) and out.dtype == np.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_trained_static_student_learns_from_the_teacher_and_is_stored(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    data, corpus = tiny_prepared(tiny_model_dir, data_dir, tmp_path / "data")
    source = Variant("teacher", "teacher", tiny_model_dir, key="teacher-key")
    settings = StaticStudentConfig(pca_dims=16, patience=2)
    distilled = distill_static(source, tmp_path / "artifacts", 16)
    student = train_static(source, data.corpus_file, corpus, tmp_path / "artifacts", settings, seed=0)

    assert student.name == "teacher-static16-trained" and not student.reused
    assert student.train_sentences == corpus.rows - max(1, corpus.rows // 10)
    variant = student.as_variant()
    assert variant.kind == "static" and variant.lineage == "teacher > static16-trained"
    assert variant.train_sentences == student.train_sentences and not variant.uses_sts_labels
    assert variant.params["static_training"] == "tokenlearn"
    trained = load_sentence_transformer(student.model_dir)
    untrained = load_sentence_transformer(distilled.model_dir)
    sentences = ["the man is playing", "a dog in the park", "a woman is on the cat"]
    out = trained.encode(sentences)
    assert out.shape == (3, 16) and out.dtype == np.float16  # trained in float32, stored like model2vec's
    # training moved the token table: the trained model's cosines to the teacher differ from model2vec's
    teacher = load_sentence_transformer(tiny_model_dir)
    target = teacher.similarity(teacher.encode(sentences), teacher.encode(sentences)).numpy()
    before = untrained.similarity(untrained.encode(sentences), untrained.encode(sentences)).numpy()
    after = trained.similarity(out, out).numpy()
    assert not np.allclose(before, after, atol=1e-3)
    assert np.isfinite(target).all()

    again = train_static(source, data.corpus_file, corpus, tmp_path / "artifacts", settings, seed=0)
    assert again.reused and again.model_dir == student.model_dir
    other_lr = settings.model_copy(update={"learning_rate": 1e-2})
    assert train_static(source, data.corpus_file, corpus, tmp_path / "artifacts", other_lr, seed=0).key != (
        student.key
    )


def test_trained_static_student_needs_a_corpus(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    data, corpus = tiny_prepared(tiny_model_dir, data_dir, tmp_path / "data")
    few = dataclasses.replace(corpus, rows=MIN_TRAIN_SENTENCES - 1)
    with pytest.raises(ValueError, match="static.train needs at least 10 corpus sentences"):
        train_static(
            Variant("teacher", "teacher", tiny_model_dir),
            data.corpus_file,
            few,
            tmp_path,
            StaticStudentConfig(),
            0,
        )
    assert not (tmp_path / "static-trained").exists()
