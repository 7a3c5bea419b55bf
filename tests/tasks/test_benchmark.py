import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks.benchmark import (
    CpuWatch,
    agreement_spearman,
    evaluate_all,
    evaluate_group,
    measure_throughput,
    quality_key,
    teacher_on_cpu,
)
from tasks.config import BenchmarkConfig, DataConfig
from tasks.data import prepare_data, read_sts
from tasks.teacher_cache import get_or_encode
from tasks.variants import Variant, quantize
from tests.conftest import build_tiny_model


@pytest.fixture()
def prepared(data_dir: Path, tmp_path: Path):
    return prepare_data.fn(
        DataConfig(
            data_dir=data_dir,
            corpus_wiki_sentences=10,
            include_stsb_train=False,
            heldout_sentences=50,
            max_eval_pairs=60,
            heldout_suite_max_pairs=30,
        ),
        tmp_path,
    )


def test_teacher_against_itself(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    (result,) = evaluate_group([Variant("teacher", "teacher", tiny_model_dir)], prepared, heldout)
    assert result.mse_to_teacher == pytest.approx(0.0, abs=1e-9)
    assert -1 <= result.sts_test_spearman <= 1 and -1 <= result.sts_dev_pearson <= 1
    assert result.dim == 32 and result.bytes_per_vector == 128
    assert result.parameters > 0 and result.size_mb > 0
    assert set(result.heldout_spearman) == {"sts12", "sts13", "sts14", "sts15", "sts16"}
    assert result.heldout_agreement_spearman == pytest.approx(1.0)


def test_float_scores_match_sentence_transformers_evaluator(tiny_model_dir: Path, prepared, tmp_path) -> None:
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from tasks.models import load_sentence_transformer

    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    (ours,) = evaluate_group([Variant("teacher", "teacher", tiny_model_dir)], prepared, heldout)
    pairs = read_sts(prepared.sts_file("test"))
    theirs = EmbeddingSimilarityEvaluator(pairs.sentences1, pairs.sentences2, pairs.scores, name="t")(
        load_sentence_transformer(tiny_model_dir)
    )
    assert ours.sts_test_spearman == pytest.approx(theirs["t_spearman_cosine"], abs=1e-6)
    assert ours.sts_test_pearson == pytest.approx(theirs["t_pearson_cosine"], abs=1e-6)


def test_quantized_embeddings_share_one_encoding(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    ranges = tmp_path / "ranges.npy"
    np.save(ranges, np.vstack((-np.ones(32), np.ones(32))).astype(np.float32))
    variants = [
        Variant("teacher", "teacher", tiny_model_dir),
        Variant("bits", "embedding-quantized", tiny_model_dir, precision="ubinary"),
        Variant("int8", "embedding-quantized", tiny_model_dir, precision="int8", calibration_file=ranges),
        Variant("rescored", "embedding-quantized", tiny_model_dir, precision="ubinary", rescore=True),
    ]
    teacher, bits, int8, rescored = evaluate_all(variants, prepared, heldout)
    assert (bits.bytes_per_vector, int8.bytes_per_vector, rescored.bytes_per_vector) == (4, 32, 4)
    # float queries against the same stored bits: a similarity of its own (ordering: the synthetic test below)
    assert -1 < rescored.heldout_agreement_spearman < 1 and np.isnan(rescored.mse_to_teacher)
    assert rescored.heldout_agreement_spearman != bits.heldout_agreement_spearman
    assert rescored.sts_test_spearman not in (bits.sts_test_spearman, teacher.sts_test_spearman)
    assert np.isnan(bits.mse_to_teacher) and np.isnan(int8.mse_to_teacher)
    assert bits.sts_test_spearman != teacher.sts_test_spearman
    assert 0 < bits.heldout_agreement_spearman < teacher.heldout_agreement_spearman == pytest.approx(1.0)


def test_a_rotated_model_has_no_mse_to_the_teacher(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    rotated = Variant("matryoshka", "layer-reduced", tiny_model_dir, rotated=True, key="r")
    (result,) = evaluate_group([rotated], prepared, heldout)
    assert np.isnan(result.mse_to_teacher) and result.heldout_agreement_spearman == pytest.approx(1.0)
    plain = replace(rotated, rotated=False)
    assert quality_key(rotated, prepared, heldout, 64) != quality_key(plain, prepared, heldout, 64)


def test_reduced_rows_are_scored_on_their_networks_encoding(
    tiny_model_dir: Path, prepared, tmp_path: Path
) -> None:
    from tasks.models import load_sentence_transformer
    from tasks.pca import append_truncation, reduce_with_pca

    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    fit = load_sentence_transformer(tiny_model_dir).encode(read_sts(prepared.sts_file("dev")).sentences1)
    pca_dir = reduce_with_pca(tiny_model_dir, fit, 8, tmp_path / "pca").model_dir
    cut_dir = append_truncation(tiny_model_dir, 16, tmp_path / "cut")
    ranges = tmp_path / "ranges.npy"
    np.save(ranges, np.vstack((-np.ones(8), np.ones(8))).astype(np.float32))
    teacher = Variant("teacher", "teacher", tiny_model_dir)
    pca = Variant("pca8", "pca", pca_dir, head_on=tiny_model_dir)
    cut = Variant("dim16", "truncated", cut_dir, head_on=tiny_model_dir)
    pca_int8 = pca.derive(
        "pca8-emb-int8", "embedding-quantized", "emb-int8", precision="int8", calibration_file=ranges
    )
    encodings = []
    real = evaluate_group

    def counting(group, *args):
        encodings.append([v.name for v in group])
        return real(group, *args)

    with_heads = evaluate_all([teacher, pca, cut, pca_int8], prepared, heldout, evaluate=counting)
    assert encodings == [["teacher", "pca8", "dim16", "pca8-emb-int8"]]  # one network, one encoding
    # the same figures as encoding each reduced model on its own
    alone = [evaluate_group([replace(v, head_on=None)], prepared, heldout)[0] for v in (pca, cut, pca_int8)]
    for ours, theirs in zip(with_heads[1:], alone, strict=True):
        for name in ("sts_dev_spearman", "sts_test_spearman", "heldout_agreement_spearman"):
            assert getattr(ours, name) == pytest.approx(getattr(theirs, name), abs=1e-6), name
        # sts12's sample holds two pairs of identical sentences: cosine 1 up to rounding, so their order
        # (a tie) follows the summation order; every other suite agrees to rounding
        tolerance = {"sts12": 0.03}
        for suite, value in theirs.heldout_spearman.items():
            assert ours.heldout_spearman[suite] == pytest.approx(value, abs=tolerance.get(suite, 1e-6)), suite
        assert (ours.dim, ours.parameters, ours.size_mb) == (theirs.dim, theirs.parameters, theirs.size_mb)
    assert [r.dim for r in with_heads] == [32, 8, 16, 8]


def test_other_model_has_positive_mse(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", num_layers=2, seed=1)
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    (result,) = evaluate_group([Variant("other", "layer-reduced", other)], prepared, heldout)
    assert result.mse_to_teacher > 0
    assert result.heldout_agreement_spearman < 1.0


def test_agreement_with_the_teacher_is_label_free_and_works_for_any_storage(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(201, 32)).astype(np.float32)  # odd: the last row stays unpaired
    assert agreement_spearman(teacher, teacher, "float32") == pytest.approx(1.0)
    noisy = teacher + rng.normal(scale=0.5, size=teacher.shape).astype(np.float32)
    assert 0.5 < agreement_spearman(teacher, noisy, "float32") < 1.0
    assert 0.5 < agreement_spearman(teacher, teacher[:, :16], "float32") < 1.0  # fewer dimensions (e.g. PCA)
    bits = quantize(teacher, Variant("bits", "embedding-quantized", tmp_path, precision="ubinary"))
    assert bits.shape == (201, 4) and 0.5 < agreement_spearman(teacher, bits, "ubinary") < 1.0
    rescored = agreement_spearman(teacher, bits, "ubinary", queries=teacher)
    assert agreement_spearman(teacher, bits, "ubinary") < rescored < 1.0
    with pytest.raises(ValueError, match="rows"):
        agreement_spearman(teacher, teacher[:100], "float32")


def test_throughput_times_every_variant_side_by_side(tiny_model_dir: Path, prepared, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", num_layers=1, seed=2)
    variants = [
        Variant("teacher", "teacher", tiny_model_dir),
        Variant("one-layer", "layer-reduced", other),
        Variant("bits", "embedding-quantized", tiny_model_dir, precision="ubinary"),
    ]
    speed = measure_throughput(
        variants, prepared, BenchmarkConfig(speed_sentences=40, repeats=3, batch_size=16)
    )
    assert set(speed.sentences_per_second) == {"teacher", "one-layer", "bits"}
    assert all(len(t) == 3 for t in speed.all_timings_s.values())
    assert speed.sentences == 40 and speed.threads >= 1 and speed.cpu
    assert speed.background_cpu_pct is not None and 0 <= speed.background_cpu_pct <= 100


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_cpu_watch_counts_other_processes_work_not_its_own() -> None:
    import psutil

    one_core = 100 / (psutil.cpu_count() or 1)
    with CpuWatch() as own:
        _spin(1.0)  # this process's own work is what is being timed: not background
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start
        with CpuWatch() as busy:
            time.sleep(1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.background_pct is not None and own.background_pct is not None
    assert busy.background_pct >= 0.6 * one_core  # one other process spinning: about one core's share
    assert own.background_pct < busy.background_pct - 0.3 * one_core


@pytest.mark.parametrize(
    ("device", "backends", "expected"),
    [
        ("cpu", ["torch", "onnx"], None),  # everything on the CPU already
        ("cuda", ["torch", "torch"], None),  # everything on the GPU
        ("cuda", ["torch", "onnx"], "teacher@cpu"),  # an ONNX row needs a CPU reference
        ("cuda", ["torch-int8"], "teacher@cpu"),
    ],
)
def test_the_teacher_is_timed_on_the_cpu_too_when_a_row_must_run_there(
    device: str, backends: list[str], expected: str | None
) -> None:
    variants = [Variant("teacher", "teacher", Path("t"))] + [
        Variant(f"v{i}", "quantized", Path("t"), backend=backend) for i, backend in enumerate(backends)
    ]
    reference = teacher_on_cpu(variants, device)
    assert (reference.name if reference else None) == expected
    if reference:
        assert reference.model_dir == variants[0].model_dir and reference.kind == "teacher"


def test_throughput_on_the_cpu_records_the_device(tiny_model_dir: Path, prepared) -> None:
    variants = [Variant("teacher", "teacher", tiny_model_dir)]
    speed = measure_throughput(
        variants, prepared, BenchmarkConfig(speed_sentences=20, repeats=1, batch_size=16)
    )
    assert speed.devices == {"teacher": "cpu"} and speed.reference == {"cpu": "teacher"}
    assert speed.label("teacher").startswith("cpu (")


def test_submitted_groups_score_and_store_as_sequential_calls(
    tiny_model_dir: Path, prepared, tmp_path
) -> None:
    """``submit`` (runner.kind=dask) submits every network to score first, then collects them in order: the
    same scores as one call after the other, stored the same way."""
    other = build_tiny_model(tmp_path / "other", num_layers=2, seed=1)
    heldout = get_or_encode(tiny_model_dir, prepared.heldout_file, tmp_path / "cache")
    variants = [
        Variant("teacher", "teacher", tiny_model_dir, key="t"),
        Variant("bits", "embedding-quantized", tiny_model_dir, precision="ubinary", key="t-bits"),
        Variant("other", "layer-reduced", other, key="o"),
    ]
    submitted: list[list[str]] = []
    scored: list[list[str]] = []

    class Later:  # a future that scores when its result is asked for
        def __init__(self, *args) -> None:
            submitted.append([v.name for v in args[0]])
            self.args = args

        def result(self):
            scored.append([v.name for v in self.args[0]])
            return evaluate_group(*self.args)

    one_by_one = evaluate_all(variants, prepared, heldout, 32, artifacts=tmp_path / "a1")
    at_once = evaluate_all(variants, prepared, heldout, 32, artifacts=tmp_path / "a2", submit=Later)
    assert _json(at_once) == _json(one_by_one)
    assert submitted == [["teacher", "bits"], ["other"]] and scored == submitted
    again = evaluate_all(variants, prepared, heldout, 32, artifacts=tmp_path / "a2", submit=Later)
    assert _json(again) == _json(one_by_one) and len(submitted) == 2  # stored: nothing submitted again


def _json(results: list) -> str:
    """Results as comparable text (NaN, e.g. a binary variant's MSE, equals NaN here)."""
    return json.dumps([r.as_dict() for r in results], sort_keys=True)
