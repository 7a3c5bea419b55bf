from pathlib import Path

import numpy as np
import pytest

from tasks.models import load_sentence_transformer
from tasks.torch_quant import check_patterns, linear_names
from tasks.variants import Variant, encode, load_model, size_bytes


@pytest.mark.parametrize(
    ("exclude", "kept_in_float"),
    [((), 0), ((r"layer\.\d+\.output\.dense$",), 4), ((r"attention",), 16)],
)
def test_exclusion_patterns_pick_modules(tiny_model_dir: Path, exclude: tuple, kept_in_float: int) -> None:
    model = load_sentence_transformer(tiny_model_dir)
    everything = linear_names(model)
    assert len(everything) - len(linear_names(model, exclude)) == kept_in_float


def test_bad_pattern_is_refused() -> None:
    with pytest.raises(ValueError, match="exclude: '\\(' is not a regular expression"):
        check_patterns(("(",))


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_variant_encodes_float32_and_is_smaller(tiny_model_dir: Path, per_channel: bool) -> None:
    variant = Variant("q", "quantized", tiny_model_dir, backend="torch-int8", int8_per_channel=per_channel)
    model = load_model(variant)
    out = encode(model, variant, ["a short sentence", "another one"], batch_size=2)
    assert out.shape == (2, 32) and out.dtype == np.float32
    reference = Variant("t", "teacher", tiny_model_dir)
    cos = (out * encode(load_model(reference), reference, ["a short sentence", "another one"], 2)).sum(1)
    assert (cos > 0.9).all()
    assert 0 < size_bytes(variant, model) < size_bytes(reference)


def test_int8_variant_reports_the_float_parameter_count(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from tasks.benchmark import _parameters

    variant = Variant("q", "quantized", tiny_model_dir, backend="torch-int8")
    float_count = sum(p.numel() for p in load_sentence_transformer(tiny_model_dir).parameters())
    assert _parameters(variant, load_model(variant)) == float_count > 0
