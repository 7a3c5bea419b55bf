"""The benchmark script's arithmetic and report (its figures come from `make bench`, never from a test)."""

import importlib.util
from pathlib import Path

import pytest

from tasks.models import load_sentence_transformer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("kept", "tokens"), [(2, 12.0), (1, 30.0), (3, 8.0)])
def test_flop_limit_is_just_under_the_layer_ratio(
    bench, tiny_model_dir: Path, kept: int, tokens: float
) -> None:
    model = load_sentence_transformer(tiny_model_dir)  # 4 layers
    limit = bench.flops_per_sentence(model, 4, tokens) / bench.flops_per_sentence(model, kept, tokens)
    assert 0.9 * 4 / kept < limit < 4 / kept  # embeddings and pooling cost something in both


def test_students_are_timed_against_the_teacher(bench, tiny_model_dir: Path) -> None:
    config = bench.BenchmarkConfig(speed_sentences=10, repeats=1, warmup_batches=0, batch_size=8)
    result = bench.students_vs_flop_limit(tiny_model_dir, ["a short sentence"] * 20, config)
    assert [row["layers"] for row in result["students"]] == [4, 3, 2, 1]
    assert all(row["speedup"] > 0 and row["flop_limit"] >= 1 for row in result["students"])
    table = bench.markdown(
        {
            "date": "2026-11-26",
            "cpu": "cpu",
            "threads": 2,
            "teacher": "tiny",
            "students": result,
            "teacher_cache": {
                "sentences": 20,
                "sentences_per_second": {"teacher_cache": 95.0, "bare_encode": 100.0},
                "ratio": 0.95,
            },
        }
    )
    assert "| (a) teacher cache / bare encode, 20 sentences (95 vs 100 sents/s) | 0.950 | >= 0.95 |" in table
    assert table.count("| (c) layers-") == 3
