"""check_inputs: every input, data files included, is checked before any work; sizes come from the data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tasks.config import resolve_config
from tasks.data import DataError, prepare_data
from tasks.pca import PcaConfigError
from tasks.preflight import check_inputs


@pytest.fixture(autouse=True)
def _avx2_cpu(monkeypatch) -> None:
    monkeypatch.setattr("tasks.onnx_export.cpu_flags", lambda: {"avx2"})


def _config(base: dict, **data: object):
    raw = copy.deepcopy(base)
    raw["data"].update(data)
    return resolve_config(None, raw)


def test_plan_knows_the_corpus_the_data_step_will_make(tiny_config_dict: dict, tmp_path: Path) -> None:
    config = _config(tiny_config_dict)
    plan = check_inputs(config)
    assert plan.data is not None and plan.teacher_layers == 4
    prepared = prepare_data.fn(config.data, tmp_path / "prepared")
    assert plan.data.corpus_size == prepared.corpus_size == 200
    assert plan.data.heldout_size == prepared.heldout_size == 60
    assert plan.data.sts_pairs == prepared.sts_pairs
    assert not Path(tiny_config_dict["work_dir"]).exists()  # checking writes nothing


def test_pca_dims_are_checked_against_the_corpus_not_only_the_fit_size(tiny_config_dict: dict) -> None:
    # fit_sentences=100 allows 16 dimensions, but a 12-sentence corpus gives only 12 rows to fit on
    with pytest.raises(PcaConfigError, match=r"compress.steps\[0\].dims: 16 .* corpus will hold only 12 .*"):
        check_inputs(_config(tiny_config_dict, corpus_wiki_sentences=12))
    plan = check_inputs(_config(tiny_config_dict, corpus_wiki_sentences=16))  # 16 rows: enough
    assert plan.data is not None and plan.data.corpus_size == 16


def test_stsb_train_sentences_count_towards_the_corpus(tiny_config_dict: dict) -> None:
    plan = check_inputs(_config(tiny_config_dict, corpus_wiki_sentences=0, include_stsb_train=True))
    assert plan.data is not None and plan.data.corpus_size > 5000  # the STS-B train sentences alone


def test_light_student_pca_needs_a_corpus_row_per_dimension(
    tiny_config_dict: dict, tiny_light_model_dir: Path
) -> None:
    raw = copy.deepcopy(tiny_config_dict)
    raw["light_students"] = [{"model": str(tiny_light_model_dir), "name": "light", "projection": "pca"}]
    raw["compress"]["steps"][0]["dims"] = [8]
    raw["data"]["corpus_wiki_sentences"] = 15
    with pytest.raises(ValueError, match=r"light_students\[light\].projection=pca: .* 16 dimensions"):
        check_inputs(resolve_config(None, raw))
    raw["light_students"][0]["projection"] = "dense"  # no PCA: fine with a small corpus
    assert check_inputs(resolve_config(None, raw)).light_students["light"] == tiny_light_model_dir.resolve()


def test_data_errors_are_found_in_preflight(tiny_config_dict: dict, data_dir: Path, tmp_path: Path) -> None:
    import gzip
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data_dir / "stsb.tsv.gz", folder)
    shutil.copy(data_dir / "sts12-16.tsv.gz", folder)
    with gzip.open(folder / "wiki_en_sentences.tsv.gz", "wt", encoding="utf-8") as handle:
        handle.write("curid\tsentence\n" + "".join(f"{i}\tSentence {i} is here.\n" for i in range(100)))
    with pytest.raises(DataError, match=r"wiki_en_sentences.tsv.gz: the Wikipedia corpus ran out"):
        check_inputs(_config(tiny_config_dict, data_dir=str(folder)))


def test_hub_source_is_not_read(tiny_config_dict: dict) -> None:
    plan = check_inputs(_config(tiny_config_dict, source="hub", data_dir=None))
    assert plan.data is not None and plan.data.corpus_size == 200 and plan.data.sts_pairs == {}


def test_auto_layers_are_planned_by_budget_and_checked_against_the_teacher(tiny_config_dict: dict) -> None:
    raw = copy.deepcopy(tiny_config_dict)
    raw["students"] = [{"num_layers": 2, "layers": "auto"}, {"num_layers": 2}]
    raw["compress"], raw["static"] = {"steps": []}, {"sources": []}
    plan = check_inputs(resolve_config(None, raw))
    assert plan.student_layers == {"layers-2of4-auto": "auto (2)", "layers-2of4": (0, 3)}
    raw["students"] = [{"num_layers": 5, "layers": "auto"}]
    with pytest.raises(ValueError, match="num_layers=5 exceeds the teacher's 4 layers"):
        check_inputs(resolve_config(None, raw))


@pytest.mark.parametrize(
    ("static", "target", "error"),
    [
        ({"sources": ["teacher"], "pca_dims": 16}, "teacher-static16-trained", None),
        ({"sources": ["teacher"], "pca_dims": 16}, "teacher-static16", None),
        (
            {"sources": ["teacher"], "pca_dims": 16, "train": False},
            "teacher-static16-trained",
            "name no variant",
        ),
        ({"sources": ["teacher"], "pca_dims": 8}, "teacher-static16", "name no variant"),
    ],
)
def test_static_rows_can_be_compressed(tiny_config_dict: dict, static: dict, target: str, error: str | None):
    raw = copy.deepcopy(tiny_config_dict)
    raw["static"] = static
    raw["compress"] = {
        "steps": [{"technique": "emb-int8", "targets": [target], "calibration_sentences": 100}]
    }
    if error is None:
        check_inputs(resolve_config(None, raw))
    else:
        with pytest.raises(ValueError, match=error):
            check_inputs(resolve_config(None, raw))


def test_trained_static_student_needs_corpus_sentences(tiny_config_dict: dict) -> None:
    raw = copy.deepcopy(tiny_config_dict)
    raw["data"]["corpus_wiki_sentences"] = 9
    raw["compress"] = {"steps": []}
    with pytest.raises(ValueError, match="static.train needs at least 10 corpus sentences, the corpus has 9"):
        check_inputs(resolve_config(None, raw))
    raw["static"]["train"] = False
    check_inputs(resolve_config(None, raw))


def test_matryoshka_dims_must_fit_the_teacher(tiny_config_dict: dict) -> None:
    raw = copy.deepcopy(tiny_config_dict)
    raw["students"] = [{"num_layers": 4, "loss": "mse+matryoshka"}]
    raw["compress"], raw["static"] = {"steps": []}, {"sources": []}
    raw["training"] = {"matryoshka_dims": [16, 64]}  # the tiny teacher has 32 dims
    with pytest.raises(PcaConfigError, match=r"training.matryoshka_dims: 64 is not in 1..32"):
        check_inputs(resolve_config(None, raw))
    raw["training"] = {"matryoshka_dims": [16, 8]}
    assert check_inputs(resolve_config(None, raw)).student_layers == {"layers-4of4-matryoshka": (0, 1, 2, 3)}
    raw["students"] = [{"num_layers": 2}]  # dims are only checked when a student uses them
    raw["training"] = {"matryoshka_dims": [64]}
    check_inputs(resolve_config(None, raw))
