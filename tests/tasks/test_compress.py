import logging
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from tasks.compress import CompressInputs, compress_variants, emb_binary_step, emb_int8_step, int8_ranges
from tasks.config import CompressionConfig, EmbBinaryStep, EmbInt8Step
from tasks.variants import Variant, encode, load_model, pair_similarity, quantize
from tests.conftest import tiny_compress_steps, tiny_prepared


@pytest.fixture
def prepared(tiny_model_dir: Path, data_dir: Path, tmp_path: Path):
    return tiny_prepared(tiny_model_dir, data_dir, tmp_path)


CONFIG = CompressionConfig(steps=tiny_compress_steps(["teacher"]))


def test_compress_makes_every_variant_with_lineage(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    data, corpus = prepared
    teacher = Variant("teacher", "teacher", tiny_model_dir, key="tiny")
    made, failures = compress_variants([teacher], CONFIG, data, corpus, tmp_path / "artifacts")
    assert failures == []
    by_name = {v.name: v for v in made}
    assert set(by_name) == {
        "teacher-pca16",
        "teacher-pca8",
        "teacher-dim16",
        "teacher-dim8",
        "teacher-emb-int8",
        "teacher-torch-int8",
        "teacher-emb-binary",
        "teacher-openvino-int8",
        "teacher-onnx",
        "teacher-onnx-int8",
        "teacher-onnx-int8-emb-int8",
    }
    openvino = by_name["teacher-openvino-int8"]
    assert openvino.backend == "openvino" and openvino.lineage == "teacher > openvino-int8"
    assert openvino.params["calibration_sentences"] == "20"
    chain = by_name["teacher-onnx-int8-emb-int8"]
    assert chain.parent == "teacher-onnx-int8" and chain.lineage.startswith("teacher > onnx-int8-")
    expected = {"pca": (np.float32, None), "quantized": (np.float32, 32)}
    for variant in made:
        out = encode(load_model(variant), variant, ["one sentence", "two sentences"], batch_size=4)
        if variant.kind == "pca":
            assert out.shape == (2, int(variant.params["pca_dims"])) and out.dtype == np.float32
        elif variant.kind == "truncated":
            assert variant.lineage == f"teacher > truncate{variant.params['truncate_dims']}"
            full = encode(load_model(teacher), teacher, ["one sentence", "two sentences"], batch_size=4)
            np.testing.assert_allclose(out, full[:, : int(variant.params["truncate_dims"])], atol=1e-6)
        elif variant.precision == "int8":
            assert out.shape == (2, 32) and out.dtype == np.int8
        elif variant.precision == "ubinary":
            assert out.shape == (2, 4) and out.dtype == np.uint8
        else:
            assert out.shape == (2, expected[variant.kind][1]) and out.dtype == np.float32


def test_an_unchanged_rerun_reuses_every_stored_output(
    tiny_model_dir: Path, prepared, tmp_path: Path, monkeypatch, caplog
) -> None:
    data, corpus = prepared
    teacher = Variant("teacher", "teacher", tiny_model_dir, key="tiny")
    first, _ = compress_variants([teacher], CONFIG, data, corpus, tmp_path / "artifacts")

    def must_not_run(*args, **kwargs):
        raise AssertionError("an unchanged step was redone")

    for name in ("export_onnx", "quantize_openvino_int8", "reduce_with_pca"):
        monkeypatch.setattr(f"tasks.compress.{name}", must_not_run)
    with caplog.at_level(logging.INFO, logger="tasks.artifacts"):
        second, failures = compress_variants([teacher], CONFIG, data, corpus, tmp_path / "artifacts")
    assert failures == []
    assert [(v.name, v.key, v.model_dir) for v in second] == [(v.name, v.key, v.model_dir) for v in first]
    stored = [v for v in second if v.kind != "quantized" or v.backend != "torch-int8"]
    assert all(v.reused for v in stored if v.precision != "ubinary")
    assert "reusing teacher-onnx" in caplog.text


def test_a_failing_step_fails_its_rows_only(
    tiny_model_dir: Path, prepared, tmp_path: Path, monkeypatch
) -> None:
    data, corpus = prepared

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr("tasks.compress.export_onnx", broken_export)
    teacher = Variant("teacher", "teacher", tiny_model_dir, key="tiny")
    made, failures = compress_variants([teacher], CONFIG, data, corpus, tmp_path / "artifacts")
    assert [(f.target, f.step, f.error) for f in failures] == [
        ("teacher", "onnx", "RuntimeError: exporter crashed"),
        ("teacher", "onnx-int8", "RuntimeError: exporter crashed"),
    ]
    names = {v.name for v in made}
    assert "teacher-openvino-int8" in names and "teacher-pca8" in names and "teacher-onnx" not in names
    assert not list((tmp_path / "artifacts").glob("onnx*/[!.]*"))  # nothing half-written is kept


# --- int8 calibration ------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _anisotropic(rng: np.random.Generator, rows: int, dim: int = 64) -> np.ndarray:
    """Unit vectors that share one large common direction (mean cosine ~0.8), like a CoSENT student's."""
    common = np.zeros(dim)
    common[: dim // 2] = 1.0
    return _unit(2.0 * _unit(common[None])[0] + rng.normal(0, 1, (rows, dim)) * np.linspace(0.05, 0.4, dim))


def _isotropic(rng: np.random.Generator, rows: int, dim: int = 64) -> np.ndarray:
    return _unit(rng.normal(0, 1, (rows, dim)))


def _int8_retention(space: str, calibration: str, clip: float, tmp_path: Path) -> float:
    """Spearman of int8 cosines against noisy "gold" scores, as a fraction of the float cosines' Spearman
    (what the benchmark's retention is), for 1,000 synthetic pairs."""
    rng = np.random.default_rng(0)
    make = _anisotropic if space == "anisotropic" else _isotropic
    sample = make(rng, 4_000)
    if space == "outliers":
        sample[:2] *= 50.0  # two broken calibration rows, 0.05% of the sample
    a, b = make(rng, 1_000), make(rng, 1_000)
    floats = pair_similarity(a, b, "float32")
    gold = floats + rng.normal(0, 0.02, len(floats))
    np.save(tmp_path / "ranges.npy", int8_ranges(sample, calibration, clip))
    variant = Variant(
        "v", "embedding-quantized", tmp_path, precision="int8", calibration_file=tmp_path / "ranges.npy"
    )
    int8 = pair_similarity(quantize(a, variant), quantize(b, variant), "int8")
    return float(spearmanr(int8, gold)[0] / spearmanr(floats, gold)[0])


@pytest.mark.parametrize(
    ("space", "calibration", "clip", "low", "high"),
    [
        # a shared direction: a grid centred per dimension (minmax, percentile) computes cosines of centred
        # vectors and loses the ranking; the zero-centred grid keeps it, with or without clipping
        ("anisotropic", "minmax", 0.0, 0.0, 0.9),
        ("anisotropic", "percentile", 0.1, 0.0, 0.9),
        ("anisotropic", "symmetric", 0.0, 0.995, 1.01),
        ("anisotropic", "symmetric", 0.01, 0.995, 1.01),
        # outliers in the calibration sample: min/max spends the 256 steps on them; clipping them keeps
        # the resolution (percentile still centres each dimension, so it keeps a little less)
        ("outliers", "minmax", 0.0, 0.0, 0.9),
        ("outliers", "percentile", 0.1, 0.98, 1.01),
        ("outliers", "symmetric", 0.0, 0.0, 0.95),
        ("outliers", "symmetric", 0.1, 0.995, 1.01),
    ],
)
def test_int8_calibration_keeps_the_float_ranking(
    space: str, calibration: str, clip: float, low: float, high: float, tmp_path: Path
) -> None:
    assert low <= _int8_retention(space, calibration, clip, tmp_path) < high


@pytest.mark.parametrize(
    ("calibration", "clip"), [("minmax", 0.0), ("percentile", 1.0), ("symmetric", 0.0), ("symmetric", 1.0)]
)
def test_int8_ranges_are_a_2_by_dim_grid(calibration: str, clip: float) -> None:
    sample = np.random.default_rng(1).normal(0, 1, (500, 8)).astype(np.float32)
    ranges = int8_ranges(sample, calibration, clip)
    assert ranges.shape == (2, 8) and ranges.dtype == np.float32 and (ranges[0] < ranges[1]).all()
    if calibration == "minmax":
        np.testing.assert_array_equal(ranges, np.vstack((sample.min(0), sample.max(0))))
    if calibration == "symmetric":  # one step for all dimensions
        assert np.ptp(ranges[1] - ranges[0]) == 0
        bound = np.abs(sample).max() if clip == 0 else np.percentile(np.abs(sample), 100 - clip)
        np.testing.assert_allclose((ranges[1] - ranges[0]) / 255, bound / 127, rtol=1e-6)


def test_int8_ranges_refuse_an_unknown_method_and_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="unknown int8 calibration 'median'"):
        int8_ranges(np.ones((4, 2)), "median")
    with pytest.raises(ValueError, match="non-empty 2-d array"):
        int8_ranges(np.zeros((0, 2)), "symmetric")


def test_the_calibration_method_is_part_of_the_content_key(
    tiny_model_dir: Path, prepared, tmp_path: Path
) -> None:
    data, corpus = prepared
    inputs = CompressInputs(data, corpus, tmp_path / "artifacts")
    teacher = Variant("teacher", "teacher", tiny_model_dir, key="tiny")
    steps = [
        EmbInt8Step(calibration_sentences=50, calibration="minmax"),
        EmbInt8Step(calibration_sentences=50, calibration="percentile", clip_percentile=0.1),
        EmbInt8Step(calibration_sentences=50, calibration="percentile", clip_percentile=1),
        EmbInt8Step(calibration_sentences=50),
        EmbInt8Step(calibration_sentences=50, clip_percentile=0),
    ]
    made = [emb_int8_step(teacher, step, inputs)[0] for step in steps]
    assert len({v.key for v in made}) == len({v.calibration_file for v in made}) == len(steps)
    # min/max ranges stored before there was a choice keep their key, so they are still reused
    assert made[0].key == inputs.key("int8-ranges", teacher, rows=50)
    assert [(v.params["calibration"], v.params["clip_percentile"]) for v in made] == [
        ("minmax", "0.0"),
        ("percentile", "0.1"),
        ("percentile", "1.0"),
        ("symmetric", "0.01"),
        ("symmetric", "0.0"),
    ]
    again = [emb_int8_step(teacher, step, inputs)[0] for step in steps]
    assert [(v.key, v.reused) for v in again] == [(v.key, True) for v in made]
    for variant in made:
        ranges = np.load(variant.calibration_file)
        assert ranges.shape == (2, 32)
        out = encode(load_model(variant), variant, ["one sentence", "two sentences"], batch_size=4)
        assert out.dtype == np.int8 and out.shape == (2, 32)


# --- submitted steps (runner.kind=dask) ------------------------------------------------------------------


class DoneFuture:
    """A finished future as ``prefect.futures.as_completed`` sees one; ``result()`` runs the step then."""

    _final_state = None

    def __init__(self, run) -> None:
        self.run = run

    def add_done_callback(self, fn) -> None:
        fn(self)

    def result(self):
        return self.run()


def fake_step(step, base: Variant, inputs) -> list[Variant]:
    """Names what a step would make (one variant per PCA dimension); ONNX "crashes"."""
    if step.technique == "onnx":
        raise RuntimeError("exporter crashed")
    made = [f"{step.technique}{d}" for d in step.dims] if step.technique == "pca" else [step.technique]
    return [base.derive(f"{base.name}-{m}", "quantized", m) for m in made]


def test_submitted_steps_give_the_sequential_rows_in_the_same_order(tmp_path: Path) -> None:
    """Every step submitted at once, a chained one after the step it follows: same rows, same order, same
    failures as one step after the other."""
    config = CompressionConfig(
        steps=[
            {
                "technique": "pca",
                "targets": ["teacher"],
                "dims": [16, 8],
                "then": [{"technique": "emb-int8"}],
            },
            {"technique": "onnx", "targets": ["teacher", "s"], "then": [{"technique": "emb-int8"}]},
            {"technique": "emb-binary", "targets": ["teacher", "s"]},
            {"technique": "onnx-int8", "targets": ["s"], "then": [{"technique": "emb-int8"}]},
        ]
    )
    bases = [
        Variant("teacher", "teacher", tmp_path, key="t"),
        Variant("s", "layer-reduced", tmp_path, key="s"),
    ]
    submitted: list[tuple[str, str]] = []

    def submit_step(step, base, inputs):
        submitted.append((step.technique, base.name))
        return DoneFuture(lambda: fake_step(step, base, inputs))

    one_by_one = compress_variants(bases, config, None, None, tmp_path, run_step=fake_step)
    at_once = compress_variants(
        bases, config, None, None, tmp_path, run_step=fake_step, submit_step=submit_step
    )
    assert at_once == one_by_one
    made, failures = at_once
    assert [v.name for v in made] == [
        "teacher-pca16",
        "teacher-pca16-emb-int8",
        "teacher-pca8",
        "teacher-pca8-emb-int8",
        "teacher-emb-binary",
        "s-emb-binary",
        "s-onnx-int8",
        "s-onnx-int8-emb-int8",
    ]
    assert [f.name for f in failures] == ["teacher-onnx", "s-onnx"]
    assert submitted[:6] == [
        ("pca", "teacher"), ("onnx", "teacher"), ("emb-binary", "teacher"),
        ("onnx", "s"), ("emb-binary", "s"), ("onnx-int8", "s"),
    ]  # fmt: skip
    # chained steps only on what a finished step made (none after the failed ONNX exports)
    assert sorted(submitted[6:]) == [
        ("emb-int8", "s-onnx-int8"), ("emb-int8", "teacher-pca16"), ("emb-int8", "teacher-pca8")
    ]  # fmt: skip


def test_binary_step_adds_a_rescoring_row_when_asked(tmp_path: Path) -> None:
    base = Variant("teacher", "teacher", tmp_path, key="t")
    (plain,) = emb_binary_step(base, EmbBinaryStep(), None)
    binary, rescored = emb_binary_step(base, EmbBinaryStep(rescore=True), None)
    assert binary == plain and not plain.rescore
    assert rescored.name == "teacher-emb-binary-rescore" and rescored.rescore
    assert rescored.precision == "ubinary" and rescored.key not in ("t", plain.key)  # scored on its own
    assert rescored.lineage == "teacher > emb-ubinary-rescore"
