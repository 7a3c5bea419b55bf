"""Model references on a real (SQLite) MLflow store: checked before any work, fetched as the variants that
were logged (same runtime, same vectors), named as their source runs named them."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tasks.mlflow_models import log_variant_model
from tasks.model_refs import (
    ModelRef,
    ModelRefError,
    check_model_refs,
    content_key,
    fetch_variant,
    unique_names,
)
from tasks.variants import Variant, encode, load_model
from tests.conftest import build_tiny_model

SENTENCES = ["A man is playing a guitar.", "Two dogs run in the park."]


@pytest.fixture()
def logged(store, tiny_model_dir: Path, tmp_path: Path):
    """Two child runs as the flow logs them (a plain SentenceTransformer and binary vectors of it), the
    second registered as ``m`` version 1 with the alias ``champion``."""
    client, experiment_id, _ = store
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    variants = [
        Variant("teacher", "teacher", tiny_model_dir, key="t"),
        Variant(
            "teacher-emb-binary",
            "embedding-quantized",
            tiny_model_dir,
            parent="teacher",
            precision="ubinary",
            params={"lineage": "teacher > emb-binary"},
            key="b",
        ),
    ]
    runs, uris = {}, {}
    for variant in variants:
        run_id = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
        for key, value in {
            "variant": variant.name,
            "variant_kind": variant.kind,
            "parent": variant.parent or "",
            "lineage": variant.lineage,
            "uses_sts_labels": "false",
            "data_fingerprint": "abc",
        }.items():
            client.log_param(run_id, key, value)
        uris[variant.name] = log_variant_model(variant, run_id, embedding_dim=32)
        client.set_terminated(run_id)
        runs[variant.name] = run_id
    client.create_registered_model("m")
    version = client.create_model_version("m", uris["teacher-emb-binary"], run_id=runs["teacher-emb-binary"])
    client.set_registered_model_alias("m", "champion", version.version)
    return client, variants, runs, parent


def test_every_form_of_reference_is_checked_and_fetched_as_logged(logged, tiny_model_dir, tmp_path) -> None:
    client, variants, runs, parent = logged
    refs = check_model_refs(
        [
            "champion",
            "m@champion",
            "models:/m/1",
            f"runs:/{runs['teacher']}/model",
            f"runs:/{runs['teacher-emb-binary']}/model",
            str(tiny_model_dir),
        ],
        model_name="m",
    )
    assert [r.registered for r in refs[:3]] == ["m v1"] * 3
    assert refs[0] == ModelRef("champion", uri="models:/m@champion", registered="m v1")
    fetched = [fetch_variant(ref, tmp_path / "fetched") for ref in refs]
    by_name = {v.name: v for v in variants}
    for variant in fetched:
        if variant.params["model_ref"] == str(tiny_model_dir):  # a plain folder: no source run
            assert variant.kind == "light" and "source_run_id" not in variant.params
            continue
        original = by_name[variant.name]  # named, typed and placed as the source run recorded it
        assert (variant.kind, variant.parent, variant.precision) == (
            "light" if original.kind == "teacher" else original.kind,
            original.parent,
            original.precision,
        )
        assert variant.params["source_run_id"] == runs[variant.name]
        assert variant.params["source_parent_run_id"] == parent
        assert variant.params["source_data_fingerprint"] == "abc"
        expected = encode(load_model(original), original, SENTENCES, 8)
        got = encode(load_model(variant), variant, SENTENCES, 8)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    # the champion, its alias form and its version are one logged model, downloaded once
    assert len({v.model_dir for v in fetched[:3]}) == 1
    assert len({v.key for v in fetched[:3]}) == 1
    assert len(list((tmp_path / "fetched").iterdir())) == 3  # champion, the teacher's model, the binary one
    assert fetched[5].key == content_key(fetched[5])


def test_key_follows_the_files_not_the_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=3)
    a = Variant("a", "light", tiny_model_dir)
    assert content_key(a) == content_key(replace(a, name="b", kind="teacher"))
    assert content_key(a) != content_key(Variant("a", "light", other))
    assert content_key(a) != content_key(replace(a, backend="torch-int8"))


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("nosuch@champion", "no registered model 'nosuch'"),
        ("m@best", "has no alias 'best' (aliases: champion; versions: 1)"),
        ("models:/m/7", "has no version 7 (versions: 1)"),
        ("models:/m", "is not a model URI"),
        ("models:/m-0000", "no logged model m-0000"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "no MLflow run 0123456789abcdef0123456789abcdef"),
        ("runs:/12345/model", "is not a run URI"),
        ("./no/such/folder", "is no local folder"),
        ("   ", "empty reference"),
    ],
)
def test_bad_references_are_named_with_the_fix(logged, reference: str, message: str) -> None:
    with pytest.raises(ModelRefError, match="models\\[1\\]") as info:
        check_model_refs(["champion", reference], model_name="m")
    assert message in str(info.value)


def test_a_run_without_that_model_is_named(logged) -> None:
    _, _, runs, _ = logged
    with pytest.raises(ModelRefError, match="logged no model named 'vectors' \\(its models: model\\)"):
        check_model_refs([f"runs:/{runs['teacher']}/vectors"], model_name="m")


def test_no_references_or_no_store_yet(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelRefError, match="models: empty"):
        check_model_refs([], model_name="m")
    with pytest.raises(ModelRefError, match="tracking store does not exist yet"):
        check_model_refs([str(tiny_model_dir), "champion"], model_name="m", store_exists=False)
    # a folder needs no store (and none is opened)
    (ref,) = check_model_refs([str(tiny_model_dir)], "m", store_exists=False, client=_NoStore())
    assert ref.path == tiny_model_dir.resolve()


class _NoStore(MlflowClient):
    def __init__(self) -> None:  # never touches a store
        pass

    def __getattribute__(self, name: str):
        if name.startswith("__"):
            return object.__getattribute__(self, name)
        raise AssertionError(f"the store was opened ({name})")


def test_repeated_names_get_a_suffix(tiny_model_dir: Path) -> None:
    variants = [Variant(n, "light", tiny_model_dir) for n in ("teacher", "x", "x")]
    assert [v.name for v in unique_names(variants, {"teacher"})] == ["teacher-2", "x", "x-2"]
