from pathlib import Path

import numpy as np
import pytest

from tasks.onnx_export import OnnxConfigError, export_onnx, pick_kernel
from tasks.variants import Variant, encode, load_model, size_bytes


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        ({"avx2"}, "x86_64", "avx2"),
        ({"avx2", "avx512f", "avx512bw"}, "x86_64", "avx512"),
        ({"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "x86_64", "avx512_vnni"),
        (set(), "aarch64", "arm64"),
    ],
)
def test_auto_kernel_follows_cpu_flags(flags: set, machine: str, expected: str) -> None:
    assert pick_kernel("auto", flags, machine) == expected


@pytest.mark.parametrize(
    ("requested", "message"), [("avx512_vnni", "this CPU lacks it"), ("sse", "choose auto")]
)
def test_kernel_the_cpu_lacks_is_refused(requested: str, message: str) -> None:
    with pytest.raises(OnnxConfigError, match=message):
        pick_kernel(requested, {"avx2"}, "x86_64")


def test_export_fp32_and_int8_load_and_encode(tiny_model_dir: Path, tmp_path: Path) -> None:
    export = export_onnx(tiny_model_dir, tmp_path / "onnx-model", pick_kernel("auto"))
    assert export.fp32_file == "onnx/model.onnx" and export.int8_file and export.kernel in export.int8_file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reference = load_model(Variant("t", "teacher", tiny_model_dir)).encode(["a short sentence"])
    for model_file, tolerance in ((export.fp32_file, 1e-4), (export.int8_file, None)):
        variant = Variant("o", "quantized", export.model_dir, backend="onnx", model_file=model_file)
        out = encode(load_model(variant), variant, ["a short sentence"], batch_size=4)
        assert out.shape == (1, 32) and out.dtype == np.float32
        if tolerance:
            np.testing.assert_allclose(out, reference, atol=tolerance)
        assert size_bytes(variant) > 0
