import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.openvino_quant import OpenVinoConfigError, check_openvino_installed, quantize_openvino_int8
from tasks.variants import Variant, encode, load_model, size_bytes


def test_int8_model_loads_and_encodes_like_the_float_model(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    calibration = [f"the {w} is playing in the park" for w in ("man", "dog", "cat", "woman")] * 5
    export = quantize_openvino_int8(tiny_model_dir, tmp_path / "openvino-model", calibration)
    assert export.int8_file == "openvino/openvino_model_qint8_quantized.xml"
    assert (export.model_dir / export.int8_file).with_suffix(".bin").is_file()
    assert export.calibration_sentences == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder left

    sentences = ["a man is playing", "the cat is on the mat"]
    reference = load_model(Variant("t", "teacher", tiny_model_dir)).encode(sentences)
    variant = Variant("o", "quantized", export.model_dir, backend="openvino", model_file=export.int8_file)
    out = encode(load_model(variant), variant, sentences, batch_size=4)
    assert out.shape == (2, 32) and out.dtype == np.float32
    cosine = (out * reference).sum(axis=1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.9
    assert 0 < size_bytes(variant) < size_bytes(Variant("t", "teacher", export.model_dir)) * 2


def test_missing_openvino_is_reported_with_the_fix(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(OpenVinoConfigError, match="remove the openvino-int8 step from compress.steps"):
        check_openvino_installed()


def test_no_calibration_sentences_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_openvino_int8(tiny_model_dir, tmp_path / "out", [])
    assert not (tmp_path / "out").exists()
