from pathlib import Path

import numpy as np
import pytest

from tasks.variants import (
    Variant,
    bytes_per_vector,
    encode,
    load_model,
    pair_similarity,
    quantize,
    rescored_similarity,
)


@pytest.mark.parametrize(("precision", "expected"), [("float32", 1536), ("int8", 384), ("ubinary", 48)])
def test_bytes_per_vector(precision: str, expected: int) -> None:
    assert bytes_per_vector(384, precision) == expected


def test_cosine_and_hamming_similarities() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(pair_similarity(a, b, "float32"), [1.0, -1.0])
    bits_a = np.packbits(np.array([[1, 1, 0, 0, 1, 0, 1, 0]], dtype=np.uint8), axis=1)
    bits_b = np.packbits(np.array([[1, 0, 0, 0, 1, 1, 1, 0]], dtype=np.uint8), axis=1)
    assert pair_similarity(bits_a, bits_b, "ubinary").tolist() == [-2.0]


def test_rescoring_compares_a_float_query_with_the_signs_of_a_stored_vector(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    queries, documents = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    bits = quantize(documents, Variant("bits", "embedding-quantized", tmp_path, precision="ubinary"))
    expected = pair_similarity(queries, np.where(documents > 0, 1.0, -1.0), "float32")
    np.testing.assert_allclose(rescored_similarity(queries, bits), expected, atol=1e-12)  # 12 dims: 2 bytes


def test_derive_inherits_the_sts_label_flag(tmp_path: Path) -> None:
    teacher = Variant("teacher", "teacher", tmp_path, params={"model": "m"})
    assert teacher.params == {"model": "m"} and not teacher.uses_sts_labels
    cosent = Variant("c", "layer-reduced", tmp_path, parent="teacher", uses_sts_labels=True)
    derived = cosent.derive("c-pca8", "pca", "pca8", {"pca_dims": "8"}, model_dir=tmp_path / "pca")
    assert derived.uses_sts_labels
    assert derived.params["pca_dims"] == "8" and derived.lineage == "c > pca8"
    assert not teacher.derive("t-pca8", "pca", "pca8").uses_sts_labels


def test_a_head_stays_with_its_folder(tmp_path: Path) -> None:
    pca = Variant("t-pca8", "pca", tmp_path / "pca", parent="teacher", head_on=tmp_path / "teacher")
    assert pca.derive("t-pca8-emb-int8", "embedding-quantized", "emb-int8").head_on == tmp_path / "teacher"
    exported = pca.derive("t-pca8-onnx", "quantized", "onnx", backend="onnx", model_file="onnx/model.onnx")
    assert exported.head_on is None
    assert pca.derive("t-pca8-dim4", "truncated", "truncate4", model_dir=tmp_path / "cut").head_on is None


def test_int8_needs_calibration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a calibration_file"):
        quantize(
            np.zeros((2, 4), np.float32), Variant("x", "embedding-quantized", tmp_path, precision="int8")
        )


@pytest.mark.parametrize(
    ("precision", "dtype", "width"),
    [("float32", np.float32, 32), ("int8", np.int8, 32), ("ubinary", np.uint8, 4)],
)
def test_encode_returns_the_promised_storage(
    tiny_model_dir: Path, tmp_path: Path, precision, dtype, width
) -> None:
    ranges = tmp_path / "ranges.npy"
    np.save(ranges, np.vstack((-np.ones(32), np.ones(32))).astype(np.float32))
    variant = Variant(
        "v",
        "embedding-quantized",
        tiny_model_dir,
        precision=precision,
        calibration_file=ranges if precision == "int8" else None,
    )
    out = encode(load_model(variant), variant, ["one sentence", "and another one"], batch_size=8)
    assert out.dtype == dtype and out.shape == (2, width)


@pytest.mark.parametrize("clip", [0.0, 0.01])
def test_a_symmetric_grid_scales_and_rounds(tmp_path: Path, clip: float) -> None:
    """quantize with symmetric ranges gives round(x / step): zero stays zero, no per-dimension shift or
    reweighting, so int8 cosines are the float cosines up to rounding."""
    from tasks.compress import int8_ranges

    rng = np.random.default_rng(0)
    sample = rng.normal(0, 0.1, (2_000, 16)) + np.linspace(-0.2, 0.2, 16)  # a different offset per dimension
    ranges = int8_ranges(sample, "symmetric", clip)
    np.save(tmp_path / "ranges.npy", ranges)
    step = float(ranges[1, 0] - ranges[0, 0]) / 255
    steps = rng.integers(-127, 128, (50, 16))
    x = ((steps + rng.uniform(-0.4, 0.4, steps.shape)) * step).astype(np.float32)  # no ties at .5
    variant = Variant(
        "v", "embedding-quantized", tmp_path, precision="int8", calibration_file=tmp_path / "ranges.npy"
    )
    out = quantize(np.vstack((x, np.zeros((1, 16), np.float32))), variant)
    np.testing.assert_array_equal(out[:-1], steps)
    assert not out[-1].any()
    np.testing.assert_allclose(
        pair_similarity(out[:25], out[25:50], "int8"), pair_similarity(x[:25], x[25:], "float32"), atol=0.01
    )
