from pathlib import Path

import numpy as np
import pytest

from tasks.models import load_sentence_transformer
from tasks.pca import PcaConfigError, append_truncation, check_pca_dims, read_head, reduce_with_pca


def test_pca_model_saves_loads_and_encodes_k_dims(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_sentence_transformer(tiny_model_dir)
    fit = base.encode([f"fitting sentence number {i}" for i in range(60)])
    result = reduce_with_pca(tiny_model_dir, fit, 8, tmp_path / "pca8")
    assert 0 < result.explained_variance <= 1
    reduced = load_sentence_transformer(result.model_dir)
    out = reduced.encode(["a test sentence", "another one"])
    assert out.shape == (2, 8) and out.dtype == np.float32
    # the Dense layer is the fitted projection: centred teacher vectors times the components
    from sklearn.decomposition import PCA

    pca = PCA(n_components=8, random_state=42).fit(fit)
    np.testing.assert_allclose(out, pca.transform(base.encode(["a test sentence", "another one"])), atol=1e-4)


@pytest.mark.parametrize(
    ("dims", "model_dim", "rows", "message"),
    [
        (64, 32, 100, r"not in 1..32"),
        (0, 32, 100, r"not in 1..32"),
        (20, 32, 10, "at least 20 fitting sentences"),
    ],
)
def test_impossible_dims_are_refused(dims: int, model_dim: int, rows: int, message: str) -> None:
    with pytest.raises(PcaConfigError, match=message):
        check_pca_dims(dims, model_dim, rows)


@pytest.mark.parametrize("dims", [1, 8, 32])
def test_truncation_keeps_the_first_dims(tiny_model_dir: Path, tmp_path: Path, dims: int) -> None:
    sentences = ["a test sentence", "another one"]
    full = load_sentence_transformer(tiny_model_dir).encode(sentences)
    truncated = load_sentence_transformer(append_truncation(tiny_model_dir, dims, tmp_path / "cut")).encode(
        sentences
    )
    np.testing.assert_allclose(truncated, full[:, :dims], atol=1e-6)


@pytest.mark.parametrize("dims", [0, 33])
def test_truncation_beyond_the_model_is_refused(tiny_model_dir: Path, tmp_path: Path, dims: int) -> None:
    with pytest.raises(PcaConfigError, match=r"not in 1..32"):
        append_truncation(tiny_model_dir, dims, tmp_path / "cut")
    assert not (tmp_path / "cut").exists()


@pytest.mark.parametrize("reduction", ["pca", "truncate"])
def test_the_appended_dense_reads_back_as_a_head_on_the_networks_output(
    tiny_model_dir: Path, tmp_path: Path, reduction: str
) -> None:
    base = load_sentence_transformer(tiny_model_dir)
    sentences = [f"fitting sentence number {i}" for i in range(40)]
    if reduction == "pca":
        reduced_dir = reduce_with_pca(tiny_model_dir, base.encode(sentences), 8, tmp_path / "r").model_dir
    else:
        reduced_dir = append_truncation(tiny_model_dir, 8, tmp_path / "r")
    head = read_head(reduced_dir)
    expected = load_sentence_transformer(reduced_dir).encode(sentences)
    np.testing.assert_allclose(head(base.encode(sentences)), expected, atol=1e-5)
    assert head.parameters == (8 * 32 + 8 if reduction == "pca" else 8 * 32)
    with pytest.raises(ValueError, match="takes 32 dims, not 8"):
        head(expected)


def test_a_model_without_a_dense_at_the_end_has_no_head(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="not the Dense of a reduction"):
        read_head(tiny_model_dir)
