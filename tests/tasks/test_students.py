import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import DataConfig, LightStudentSpec, StudentSpec, TrainingConfig
from tasks.data import PreparedData, prepare_data
from tasks.models import load_sentence_transformer
from tasks.static_student import StaticStudent
from tasks.students import (
    HiddenStateMSELoss,
    LayerSpecError,
    MatryoshkaDistillLoss,
    TrainedStudent,
    append_rotation,
    light_student_name,
    plan_layers,
    principal_rotation,
    project_student,
    reduce_layers,
    train_layer_reduced,
    train_light,
)
from tasks.teacher_cache import get_or_encode


@pytest.mark.parametrize(
    ("teacher_layers", "keep", "expected"),
    [
        (6, 3, (0, 2, 5)),
        (6, 2, (0, 5)),
        (6, 1, (5,)),
        (12, 1, (11,)),
        (6, 6, (0, 1, 2, 3, 4, 5)),
        (12, 4, (0, 4, 7, 11)),
        (12, 6, (0, 2, 4, 7, 9, 11)),
        (12, 8, (0, 2, 3, 5, 6, 8, 9, 11)),
    ],
)
def test_even_spacing_keeps_first_and_last_one_layer_the_last(
    teacher_layers: int, keep: int, expected: tuple
) -> None:
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


def _small_data(data_dir: Path, root: Path) -> PreparedData:
    config = DataConfig(
        data_dir=data_dir,
        corpus_wiki_sentences=96,
        include_stsb_train=False,
        heldout_sentences=20,
        max_eval_pairs=40,
    )
    return prepare_data.fn(config, root)


@pytest.mark.parametrize(
    ("loss", "name"),
    [("mse", "layers-2of4"), ("mse+cosent", "layers-2of4-cosent"), ("mse+hidden", "layers-2of4-hidden")],
)
def test_training_keeps_best_checkpoint(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, loss, name
) -> None:
    data = _small_data(data_dir, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    student = train_layer_reduced(
        tiny_model_dir,
        StudentSpec(num_layers=2, loss=loss),
        data,
        corpus,
        TrainingConfig(batch_size=32, evaluations_per_epoch=3),
        tmp_path / "students",
    )
    variant = student.as_variant()
    assert student.name == name and student.kind == "layer-reduced" and student.loss == loss
    assert variant.params["loss"] == loss and variant.params["layers"] == "0,3"
    assert variant.uses_sts_labels == (loss == "mse+cosent")
    assert variant.kind == "layer-reduced" and variant.parent == "teacher"
    assert student.best_dev_spearman is not None
    assert (student.model_dir / "modules.json").is_file()
    assert not (student.model_dir.parent / "checkpoints").exists()
    reloaded = load_sentence_transformer(student.model_dir)
    assert reloaded[0].auto_model.config.num_hidden_layers == 2
    assert not reloaded[0].auto_model.config.output_hidden_states  # the loss switched it on only per batch


@pytest.mark.parametrize(
    ("loss", "flag"), [("mse", "false"), ("mse+hidden", "false"), ("mse+cosent", "true")]
)
@pytest.mark.parametrize("kind", ["layer-reduced", "light"])
def test_sts_label_flag_follows_the_loss_to_every_derived_variant(loss: str, flag: str, kind) -> None:
    student = TrainedStudent("s", kind, Path("s"), 0.8, 1.0, 10, loss).as_variant()
    static = StaticStudent("s-static16", student, Path("static"), 16, 1.0).as_variant()
    chain = student.derive("s-onnx-int8", "quantized", "onnx int8").derive(
        "s-chain", "embedding-quantized", "i8"
    )
    for variant in (student, static, chain, static.derive("s-static16-bits", "embedding-quantized", "bits")):
        assert variant.uses_sts_labels == (flag == "true")
    assert static.parent == "s" and static.model_dir == Path("static")


def _batch(model, sentences: list[str]) -> dict[str, torch.Tensor]:
    return dict(model.preprocess(sentences))


def test_hidden_state_loss_is_zero_for_the_teacher_itself_and_grows_with_removed_layers(
    tiny_model_dir: Path,
) -> None:
    sentences = ["a man is playing", "the cat is on the mat", "a dog"]
    teacher = load_sentence_transformer(tiny_model_dir)
    labels = torch.tensor(teacher.encode(sentences))
    same = load_sentence_transformer(tiny_model_dir).eval()
    identical = HiddenStateMSELoss(same, teacher, (0, 1, 2, 3), weight=1.0)
    assert identical([_batch(same, sentences)], labels).item() == pytest.approx(0.0, abs=1e-10)

    student = reduce_layers(load_sentence_transformer(tiny_model_dir).eval(), (0, 3))
    mismatched = HiddenStateMSELoss(student, teacher, (0, 3), weight=1.0)
    embedding_only = HiddenStateMSELoss(student, teacher, (0, 3), weight=0.0)
    batch = _batch(student, sentences)
    total = mismatched([batch], labels)
    assert total.item() > embedding_only([batch], labels).item() > 0
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen
    assert student[0].auto_model.encoder.layer[1].output.dense.weight.grad is not None


def test_principal_rotation_keeps_cosines_and_orders_variance(tiny_model_dir: Path, tmp_path: Path) -> None:
    sentences = ["a man is playing", "the cat is on the mat", "a dog runs", "two people talk", "rain"] * 8
    model = load_sentence_transformer(tiny_model_dir)
    targets = model.encode(sentences)
    rotation = principal_rotation(targets)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(len(rotation)), atol=1e-5)
    rotated = targets @ rotation.T
    np.testing.assert_allclose(rotated @ rotated.T, targets @ targets.T, atol=1e-4)  # every cosine kept
    energy = (rotated**2).sum(axis=0)
    assert np.all(np.diff(energy) <= 1e-4)  # most of the vectors in the first dimensions, in order
    append_rotation(model, rotation).save(str(tmp_path / "rotated"))
    np.testing.assert_allclose(
        load_sentence_transformer(tmp_path / "rotated").encode(sentences), rotated, atol=1e-5
    )


def test_matryoshka_loss_is_zero_only_when_every_prefix_keeps_the_teacher_similarities(
    tiny_model_dir: Path,
) -> None:
    sentences = ["a man is playing", "the cat is on the mat", "a dog runs", "two people talk"]
    model = load_sentence_transformer(tiny_model_dir).eval()
    labels = torch.tensor(model.encode(sentences))
    batch = _batch(model, sentences)
    # The teacher itself: zero MSE, zero similarity error at the full dimension, not at prefixes
    assert MatryoshkaDistillLoss(model, (32,))([batch], labels).item() == pytest.approx(0.0, abs=1e-8)
    prefixes = MatryoshkaDistillLoss(model, (16, 8))([batch], labels)
    assert prefixes.item() > 1e-4
    prefixes.backward()
    assert model[0].auto_model.encoder.layer[0].output.dense.weight.grad is not None


def test_matryoshka_student_trains_with_a_rotation_and_scores_each_prefix(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    data = _small_data(data_dir, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    training = TrainingConfig(batch_size=32, evaluations_per_epoch=2, matryoshka_dims=(8, 16))
    spec = StudentSpec(num_layers=4, loss="mse+matryoshka")
    student = train_layer_reduced(tiny_model_dir, spec, data, corpus, training, tmp_path / "students")
    assert student.name == "layers-4of4-matryoshka"
    assert student.params["matryoshka_dims"] == "16,8"
    variant = student.as_variant()
    assert not variant.uses_sts_labels and variant.rotated  # no MSE to the teacher's axes for it
    assert variant.derive("s-onnx", "quantized", "onnx").rotated
    reloaded = load_sentence_transformer(student.model_dir)
    assert type(reloaded[-1]).__name__ == "Dense" and reloaded.encode(["a dog"]).shape == (1, 32)
    history = json.loads(student.history_file.read_text())
    scored = [entry for entry in history if "eval_sequential_score" in entry]
    assert scored and all("eval_sts-dev-8_spearman_cosine" in entry for entry in scored)
    assert student.best_dev_spearman == pytest.approx(max(e["eval_sequential_score"] for e in scored))
    # other dims are another student; the plain MSE student's key does not move with matryoshka_dims
    other = TrainingConfig(batch_size=32, evaluations_per_epoch=2, matryoshka_dims=(8,))
    assert (
        train_layer_reduced(tiny_model_dir, spec, data, corpus, other, tmp_path / "students").key
        != student.key
    )
    mse = StudentSpec(num_layers=4)
    first = train_layer_reduced(tiny_model_dir, mse, data, corpus, training, tmp_path / "students")
    assert train_layer_reduced(tiny_model_dir, mse, data, corpus, other, tmp_path / "students").reused
    assert first.key != student.key


def test_pca_projection_reduces_and_normalizes_the_targets(tiny_light_model_dir: Path) -> None:
    model = load_sentence_transformer(tiny_light_model_dir)
    targets = np.random.default_rng(0).normal(size=(200, 32)).astype(np.float32)
    reduced, params, pca = project_student(model, targets, "pca")
    assert reduced.shape == (200, 16) and reduced.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, rtol=1e-5)
    assert params["projection"] == "pca" and pca is not None
    assert model.get_embedding_dimension() == 16  # the student itself is unchanged


def test_dense_projection_maps_the_student_into_the_teacher_space(tiny_light_model_dir: Path) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    model = load_sentence_transformer(tiny_light_model_dir)
    targets = np.ones((10, 32), dtype=np.float32)
    same, params, pca = project_student(model, targets, "dense")
    assert same is targets and pca is None and params["projection"] == "dense"
    assert isinstance(model[-2], Dense) and isinstance(model[-1], Normalize)
    vectors = model.encode(["a dog"])
    assert vectors.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(("projection", "dim"), [("pca", 16), ("dense", 32)])
def test_light_student_trains_saves_and_encodes(
    tiny_model_dir: Path,
    tiny_light_model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    projection: str,
    dim: int,
) -> None:
    data = _small_data(data_dir, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    spec = LightStudentSpec(model=str(tiny_light_model_dir), projection=projection)
    student = train_light(spec, data, corpus, TrainingConfig(batch_size=32), tmp_path / "students")
    assert student.name == light_student_name(spec) == f"light-st-{projection}"
    assert student.kind == "light" and student.as_variant().kind == "light"
    assert student.best_dev_spearman is not None
    vectors = load_sentence_transformer(student.model_dir).encode(["a man is playing"])
    assert vectors.shape == (1, dim) and vectors.dtype == np.float32
    saved_pca = student.model_dir / "teacher_pca.npz"
    assert saved_pca.is_file() == (projection == "pca")
    if projection == "pca":
        with np.load(saved_pca, allow_pickle=False) as arrays:
            assert arrays["components"].shape == (16, 32) and arrays["mean"].shape == (32,)


def test_an_unchanged_student_is_reused_and_a_stopped_one_resumes(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The student is stored by its content key; a build stopped after its checkpoints resumes from them."""
    from sentence_transformers import SentenceTransformer

    data = _small_data(data_dir, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    args = (tiny_model_dir, StudentSpec(num_layers=2), data, corpus, TrainingConfig(batch_size=32))
    real_save = SentenceTransformer.save

    def crash_on_save(self, path, *a, **k):  # stopped after training, before the student is stored
        if ".tmp-" in str(path):
            raise KeyboardInterrupt
        return real_save(self, path, *a, **k)  # checkpoints are saved as usual

    monkeypatch.setattr(SentenceTransformer, "save", crash_on_save)
    with pytest.raises(KeyboardInterrupt):
        train_layer_reduced(*args, tmp_path / "artifacts")
    work = next((tmp_path / "artifacts" / "students").glob(".*.work"))
    assert list((work / "checkpoints").glob("checkpoint-*")), "checkpoints kept for the next attempt"
    assert not [p for p in (tmp_path / "artifacts" / "students").iterdir() if not p.name.startswith(".")]

    monkeypatch.setattr(SentenceTransformer, "save", real_save)
    with caplog.at_level(logging.INFO):
        resumed = train_layer_reduced(*args, tmp_path / "artifacts")
    assert "resuming from" in caplog.text and not resumed.reused and not work.exists()
    assert resumed.model_dir == tmp_path / "artifacts" / "students" / resumed.key / "model"

    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = train_layer_reduced(*args, tmp_path / "artifacts")
    assert again.reused and again.model_dir == resumed.model_dir and "training student" not in caplog.text
    assert again.best_dev_spearman == resumed.best_dev_spearman

    other = train_layer_reduced(
        tiny_model_dir,
        StudentSpec(num_layers=2),
        data,
        corpus,
        TrainingConfig(batch_size=16),
        tmp_path / "artifacts",
    )
    assert other.key != again.key and not other.reused  # a different setting is a different student


def test_resume_skips_a_checkpoint_a_kill_left_half_written(tmp_path: Path) -> None:
    from tasks.students import last_complete_checkpoint

    for step, state in ((10, "{}"), (20, "{}"), (30, None), (40, '{"trunc')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_training_rows_stream_from_the_shards_into_a_memory_mapped_table(
    monkeypatch, tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    import pyarrow as pa
    from datasets import Dataset

    from tasks import teacher_cache
    from tasks.data import read_lines
    from tasks.students import _distillation_dataset, corpus_blocks

    monkeypatch.setattr(teacher_cache, "SHARD_ROWS", 25)  # 96 sentences: 4 shards
    data = _small_data(data_dir, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    blocks = list(corpus_blocks(data.corpus_file, corpus))
    assert [len(texts) for texts, _ in blocks] == [25, 25, 25, 21]
    assert all(isinstance(targets, np.memmap) and len(targets) == len(texts) for texts, targets in blocks)

    dataset = _distillation_dataset(iter(blocks), corpus.dim, tmp_path / "work" / "train.arrow")
    assert dataset.cache_files and dataset.cache_files[0]["filename"] == str(
        tmp_path / "work" / "train.arrow"
    )
    # what one in-memory table of the whole corpus gave: same rows, order, features and values
    targets = np.concatenate([np.asarray(t) for _, t in blocks])
    labels = pa.FixedSizeListArray.from_arrays(pa.array(targets.ravel()), targets.shape[1])
    whole = Dataset(pa.table({"sentence": read_lines(data.corpus_file), "label": labels}))
    assert dataset.features == whole.features and len(dataset) == 96
    assert dataset[:] == whole[:]

    shorter = tmp_path / "shorter.txt"
    shorter.write_text("\n".join(read_lines(data.corpus_file)[:-1]) + "\n")
    with pytest.raises(ValueError, match="corpus has 95 sentences but 96 cached embeddings"):
        next(corpus_blocks(shorter, corpus))
