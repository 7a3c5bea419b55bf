from pathlib import Path

import numpy as np
import pytest

from tasks.models import load_sentence_transformer
from tasks.static_student import distill_static
from tasks.variants import Variant, encode, load_model


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
