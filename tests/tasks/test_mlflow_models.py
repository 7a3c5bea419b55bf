"""Every kind of variant logged to a real (SQLite) MLflow store loads back with the benchmark's vectors."""

from pathlib import Path

import mlflow
import numpy as np
import pytest

from tasks.compress import compress_variants
from tasks.config import CompressionConfig
from tasks.mlflow_models import (
    is_sentence_transformer,
    log_variant_model,
    signature,
    stage_pyfunc_artifacts,
)
from tasks.static_student import distill_static
from tasks.variants import Variant, encode, load_model
from tests.conftest import tiny_compress_steps, tiny_prepared

SENTENCES = ["A man is playing a guitar.", "Two dogs run in the park.", "The stock market fell today."]


@pytest.fixture(scope="module")
def every_kind(
    tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[Variant]:
    """The tiny teacher, its static student, and one variant of each compress technique."""
    root = tmp_path_factory.mktemp("kinds")
    data, corpus = tiny_prepared(tiny_model_dir, data_dir, root)
    teacher = Variant("teacher", "teacher", tiny_model_dir, key="tiny")
    config = CompressionConfig(steps=tiny_compress_steps(["teacher"]))
    made, failures = compress_variants([teacher], config, data, corpus, root / "artifacts")
    assert failures == []
    static = distill_static(teacher, root / "static", 16).as_variant()
    return [teacher, static, *made]


def test_each_kind_loads_back_with_the_same_vectors(every_kind: list[Variant], store) -> None:
    client, experiment_id, _ = store
    kinds = {(v.kind, v.backend, v.precision) for v in every_kind}
    assert {("teacher", "torch", "float32"), ("static", "torch", "float32")} <= kinds
    assert ("pca", "torch", "float32") in kinds
    assert {("quantized", "onnx", "float32"), ("quantized", "openvino", "float32")} <= kinds
    assert {("quantized", "torch-int8", "float32"), ("embedding-quantized", "torch", "int8")} <= kinds
    assert ("embedding-quantized", "torch", "ubinary") in kinds
    for variant in every_kind:
        expected = encode(load_model(variant), variant, SENTENCES, batch_size=4)
        run_id = client.create_run(experiment_id, run_name=variant.name).info.run_id
        uri = log_variant_model(variant, run_id, embedding_dim=_float_dim(variant))
        client.set_terminated(run_id)
        assert uri.startswith("models:/")

        by_run = f"runs:/{run_id}/model"
        got = np.asarray(mlflow.pyfunc.load_model(by_run).predict(SENTENCES))
        if variant.precision != "float32":  # model2vec's static model hands out float16 from the flavor
            assert got.dtype == expected.dtype, variant.name
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=variant.name)
        if is_sentence_transformer(variant):
            model = mlflow.sentence_transformers.load_model(by_run)
            np.testing.assert_allclose(model.encode(SENTENCES), expected, atol=1e-5, err_msg=variant.name)
        info = mlflow.models.get_model_info(by_run)
        assert info.signature.outputs.inputs[0].type == expected.dtype


def test_int8_models_carry_the_grid_they_were_scored_with(every_kind: list[Variant], tmp_path: Path) -> None:
    """The default calibration (symmetric) is what the logged int8 models quantize with: their ranges file
    travels with the model (the load-back test above checks the vectors)."""
    int8 = [v for v in every_kind if v.precision == "int8"]
    assert len(int8) == 2  # teacher-emb-int8 and the onnx-int8 chain
    for variant in int8:
        assert (variant.params["calibration"], variant.params["clip_percentile"]) == ("symmetric", "0.01")
        artifacts = stage_pyfunc_artifacts(variant, tmp_path / variant.name)
        np.testing.assert_array_equal(np.load(artifacts["calibration"]), np.load(variant.calibration_file))


def _float_dim(variant: Variant) -> int:
    return int(load_model(variant).get_embedding_dimension())


@pytest.mark.parametrize(
    ("dim", "precision", "dtype", "width"),
    [(384, "float32", np.float32, 384), (384, "int8", np.int8, 384), (384, "ubinary", np.uint8, 48)],
)
def test_signature_matches_the_stored_vectors(dim: int, precision, dtype, width: int) -> None:
    out = signature(dim, precision).outputs.inputs[0]
    assert out.type == np.dtype(dtype) and out.shape == (-1, width)


def test_a_rescoring_row_gives_bits_for_documents_and_floats_for_queries(tiny_model_dir: Path, store) -> None:
    client, experiment_id, _ = store
    rescored = Variant(
        "teacher-emb-binary-rescore",
        "embedding-quantized",
        tiny_model_dir,
        "teacher",
        precision="ubinary",
        rescore=True,
    )
    run_id = client.create_run(experiment_id, run_name=rescored.name).info.run_id
    log_variant_model(rescored, run_id, embedding_dim=32)
    client.set_terminated(run_id)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    teacher = Variant("teacher", "teacher", tiny_model_dir)
    floats = encode(load_model(teacher), teacher, SENTENCES, batch_size=4)

    documents = np.asarray(model.predict(SENTENCES))
    np.testing.assert_array_equal(
        documents, np.asarray(model.predict(SENTENCES, params={"side": "document"}))
    )
    assert documents.dtype == np.uint8 and documents.shape == (3, 4)
    np.testing.assert_array_equal(documents, np.packbits(floats > 0, axis=1))
    queries = np.asarray(model.predict(SENTENCES, params={"side": "query"}))
    np.testing.assert_allclose(queries, floats, atol=1e-5)
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").signature.params.to_dict() == [
        {"name": "side", "type": "string", "default": "document", "shape": None}
    ]
    with pytest.raises(Exception, match="params.side: 'both' is not one of document, query"):
        model.predict(SENTENCES, params={"side": "both"})
