import logging
from pathlib import Path

import numpy as np
import pytest

from tasks.compress import compress_variants
from tasks.config import CompressionConfig
from tasks.variants import Variant, encode, load_model
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
