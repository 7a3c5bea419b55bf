from pathlib import Path

import pytest

from tasks.config import DataConfig, StudentSpec, TrainingConfig
from tasks.data import prepare_data
from tasks.models import load_sentence_transformer
from tasks.students import LayerSpecError, plan_layers, reduce_layers, train_layer_reduced
from tasks.teacher_cache import get_or_encode


@pytest.mark.parametrize(
    ("teacher_layers", "keep", "expected"),
    [
        (6, 3, (0, 2, 5)),
        (6, 2, (0, 5)),
        (6, 1, (0,)),
        (6, 6, (0, 1, 2, 3, 4, 5)),
        (12, 4, (0, 4, 7, 11)),
        (12, 6, (0, 2, 4, 7, 9, 11)),
        (12, 8, (0, 2, 3, 5, 6, 8, 9, 11)),
    ],
)
def test_even_spacing_keeps_first_and_last(teacher_layers: int, keep: int, expected: tuple) -> None:
    layers = plan_layers(teacher_layers, StudentSpec(num_layers=keep))
    assert layers == expected
    assert len(set(layers)) == keep


def test_explicit_layers_are_sorted() -> None:
    assert plan_layers(6, StudentSpec(layers=(5, 0, 3))) == (0, 3, 5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StudentSpec(layers=(0, 6)), r"indices \[6\] are out of range .* use 0..5"),
        (StudentSpec(num_layers=7), "exceeds the teacher's 6 layers"),
    ],
)
def test_bad_layer_lists(spec: StudentSpec, message: str) -> None:
    with pytest.raises(LayerSpecError, match=message):
        plan_layers(6, spec)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"layers": (1, 1)}, "duplicates"), ({"layers": (-1,)}, "negative")]
)
def test_layer_lists_checked_by_the_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudentSpec(**kwargs)


def test_reduced_model_saves_and_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_sentence_transformer(tiny_model_dir)
    reduce_layers(model, (0, 3))
    model.save(str(tmp_path / "student"))
    reloaded = load_sentence_transformer(tmp_path / "student")
    assert len(reloaded[0].auto_model.encoder.layer) == 2
    assert reloaded[0].auto_model.config.num_hidden_layers == 2
    assert reloaded.encode(["a short sentence"]).shape == (1, 32)


@pytest.mark.parametrize(("loss", "name"), [("mse", "layers-2of4"), ("mse+cosent", "layers-2of4-cosent")])
def test_training_keeps_best_checkpoint(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, loss, name
) -> None:
    data = prepare_data.fn(
        DataConfig(
            data_dir=data_dir,
            corpus_wiki_sentences=96,
            include_stsb_train=False,
            heldout_sentences=20,
            max_eval_pairs=40,
        ),
        tmp_path,
    )
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    student = train_layer_reduced(
        tiny_model_dir,
        StudentSpec(num_layers=2, loss=loss),
        data,
        corpus,
        TrainingConfig(batch_size=32, evaluations_per_epoch=3),
        tmp_path / "students",
    )
    assert student.name == name and student.layers == (0, 3) and student.loss == loss
    assert student.as_variant().params["loss"] == loss
    assert student.best_dev_spearman is not None
    assert (student.model_dir / "modules.json").is_file()
    assert not (student.model_dir.parent / "checkpoints").exists()
    reloaded = load_sentence_transformer(student.model_dir)
    assert reloaded[0].auto_model.config.num_hidden_layers == 2
