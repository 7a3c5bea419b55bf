from pathlib import Path

import numpy as np

from tasks.compress import compress_variants
from tasks.config import CompressionConfig, DataConfig
from tasks.data import prepare_data
from tasks.teacher_cache import get_or_encode
from tasks.variants import Variant, encode, load_model


def test_compress_makes_every_variant_with_lineage(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    data = prepare_data.fn(
        DataConfig(
            data_dir=data_dir,
            corpus_wiki_sentences=120,
            include_stsb_train=False,
            heldout_sentences=20,
            max_eval_pairs=20,
            heldout_suite_max_pairs=20,
        ),
        tmp_path,
    )
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    teacher = Variant("teacher", "teacher", tiny_model_dir)
    config = CompressionConfig(
        targets=("teacher",), pca_dims=(16, 4), pca_fit_sentences=100, openvino_calibration_sentences=20
    )
    made = compress_variants.fn([teacher], config, data, corpus, tmp_path / "compressed")
    by_name = {v.name: v for v in made}
    assert set(by_name) == {
        "teacher-pca16",
        "teacher-pca4",
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
