import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import DataConfig, StudentSpec, TrainingConfig
from tasks.data import prepare_data
from tasks.layer_search import (
    LayerChoice,
    choose_layers,
    greedy_elimination,
    log_layer_search,
    probe_rows,
    search_layers,
)
from tasks.models import load_sentence_transformer
from tasks.students import plan_layers, reduce_layers, student_name, train_layer_reduced
from tasks.teacher_cache import get_or_encode


def _importance_score(importance: list[float]):
    """An error that grows with the importance of each dropped layer (so the best choice is known)."""
    return lambda layers: sum(w for i, w in enumerate(importance) if i not in layers)


@pytest.mark.parametrize(
    ("importance", "budget", "expected"),
    [
        ([5, 1, 1, 1, 1, 5], 2, (0, 5)),
        ([5, 1, 4, 1, 3, 5], 3, (0, 2, 5)),
        ([1, 9, 1, 1, 1, 1], 1, (1,)),
        ([3, 2, 1, 4], 4, (0, 1, 2, 3)),
    ],
)
def test_greedy_elimination_keeps_what_matters(importance: list, budget: int, expected: tuple) -> None:
    kept, candidates = greedy_elimination(budget, len(importance), _importance_score(importance))
    assert kept == expected
    total = len(importance)
    assert len(candidates) == sum(range(budget + 1, total + 1))  # L + (L-1) + ... + (k+1) candidates
    steps = {c.step for c in candidates}
    assert steps == set(range(1, total - budget + 1))
    for step in steps:  # one chosen per step, the lowest of that step, one layer fewer each step
        of_step = [c for c in candidates if c.step == step]
        chosen = [c for c in of_step if c.chosen]
        assert len(chosen) == 1 and chosen[0].mse == min(c.mse for c in of_step)
        assert {len(c.layers) for c in of_step} == {total - step}


def test_greedy_ties_remove_the_deepest_layer() -> None:
    kept, _ = greedy_elimination(2, 4, lambda layers: 0.0)
    assert kept == (0, 1)


@pytest.mark.parametrize("budget", [0, 7])
def test_greedy_budget_out_of_range(budget: int) -> None:
    with pytest.raises(ValueError, match="outside 1..6"):
        greedy_elimination(budget, 6, lambda layers: 0.0)


@pytest.mark.parametrize(("total", "count"), [(10, 4), (10, 10), (3, 8), (7, 1)])
def test_probe_rows_are_evenly_strided_across_blocks(total: int, count: int) -> None:
    texts = [f"s{i}" for i in range(total)]
    emb = np.arange(total * 2, dtype=np.float32).reshape(total, 2)
    blocks = [(texts[i : i + 3], emb[i : i + 3]) for i in range(0, total, 3)]
    sentences, targets = probe_rows(blocks, total, count)
    expected = sorted(set(np.linspace(0, total - 1, min(count, total)).round().astype(int)))
    assert sentences == [f"s{i}" for i in expected]
    np.testing.assert_array_equal(targets, emb[expected])


def test_search_scores_real_candidates_and_restores_the_model(tiny_model_dir: Path) -> None:
    model = load_sentence_transformer(tiny_model_dir)
    sentences = [f"sentence number {i} about a topic" for i in range(24)]
    targets = model.encode(sentences, convert_to_numpy=True)
    layers, mse, candidates = search_layers(model, 2, sentences, targets, batch_size=8)
    assert len(layers) == 2 and len(candidates) == 4 + 3
    assert len(model[0].auto_model.encoder.layer) == 4  # restored
    assert model[0].auto_model.config.num_hidden_layers == 4
    np.testing.assert_allclose(model.encode(sentences, convert_to_numpy=True), targets, atol=1e-6)
    # the reported error is the chosen candidate's, re-measured on a model reduced the ordinary way
    reduced = reduce_layers(load_sentence_transformer(tiny_model_dir), layers)
    remeasured = float(np.mean((reduced.encode(sentences, convert_to_numpy=True) - targets) ** 2))
    assert mse == pytest.approx(remeasured, rel=1e-4)
    assert mse == min(c.mse for c in candidates if len(c.layers) == 2)


def test_auto_layers_need_a_budget() -> None:
    with pytest.raises(ValueError, match="layers: auto needs num_layers"):
        StudentSpec(layers="auto")
    spec = StudentSpec(num_layers=3, layers="auto", loss="mse+hidden")
    assert plan_layers(6, spec) is None
    assert student_name(spec, 6) == "layers-3of6-auto-hidden"


def test_choice_is_stored_and_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_sentence_transformer(tiny_model_dir)
    sentences = [f"probe {i}" for i in range(16)]
    probe = (sentences, model.encode(sentences, convert_to_numpy=True))
    first = choose_layers(tiny_model_dir, 3, lambda: probe, "probe-a", tmp_path)
    # a stored search reads no probe
    again = choose_layers(tiny_model_dir, 3, _never_read, "probe-a", tmp_path)
    assert not first.reused and again.reused
    assert again.layers == first.layers and again.candidates == first.candidates
    assert again.mse == first.mse and len(first.rows()) == 4


def test_student_with_auto_layers(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(
        data_dir=data_dir,
        corpus_wiki_sentences=64,
        include_stsb_train=False,
        heldout_sentences=20,
        max_eval_pairs=40,
    )
    data = prepare_data.fn(config, tmp_path)
    corpus = get_or_encode(tiny_model_dir, data.corpus_file, tmp_path / "cache")
    training = TrainingConfig(batch_size=32, evaluations_per_epoch=1, layer_search_sentences=32)
    student = train_layer_reduced(
        tiny_model_dir,
        StudentSpec(num_layers=2, layers="auto"),
        data,
        corpus,
        training,
        tmp_path / "students",
    )
    assert student.name == "layers-2of4-auto"
    chosen = tuple(int(i) for i in student.params["layers"].split(","))
    assert len(chosen) == 2 and student.params["layer_choice"] == "auto"
    assert float(student.params["layer_search_mse"]) >= 0
    search = choose_layers(  # the stored search, looked up with the same probe
        tiny_model_dir,
        2,
        _never_read,
        f"{corpus.key}:32",
        tmp_path / "students",
    )
    assert search.reused and search.layers == chosen and student.params["layer_search_key"] == search.key


def test_every_candidate_is_logged_to_the_students_run(store) -> None:
    client, experiment_id, _ = store
    run_id = client.create_run(experiment_id).info.run_id
    candidates = greedy_elimination(2, 4, lambda layers: float(sum(layers)))[1]
    choice = LayerChoice((0, 1), 1.0, candidates, 16, 0.5)
    log_layer_search(run_id, choice)
    saved = json.loads(Path(client.download_artifacts(run_id, "layer_search.json")).read_text())
    logged = pd.DataFrame(saved["data"], columns=saved["columns"])
    assert len(logged) == 4 + 3 and logged["chosen"].sum() == 2
    assert list(logged[logged["chosen"]]["layers"]) == ["0,1,2", "0,1"]


def _never_read():
    raise AssertionError("the probe was read, but the stored search should have been reused")


def test_an_empty_probe_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = ([], np.zeros((0, 32), np.float32))
    with pytest.raises(ValueError, match="distillation corpus is empty"):
        choose_layers(tiny_model_dir, 2, lambda: empty, "empty", tmp_path)
