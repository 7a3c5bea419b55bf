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


# --- (b) orchestration overhead: the plain-Python side ----------------------------------------------------


def test_plain_python_runs_every_kind_of_prefect_call_as_its_function(bench) -> None:
    import prefect.task_engine
    from prefect import Flow, Task, flow, task
    from prefect.utilities.annotations import unmapped

    calls: list[int] = []

    @task(retries=2)
    def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    @task
    def add(x: int, y: int) -> int:
        return x + y

    @task
    def boom() -> None:
        raise ValueError("boom")

    @flow
    def pipeline(xs: list[int]) -> list[int]:
        return [double(x) for x in xs]

    originals = (Task.__call__, Task.submit, Task.map, Flow.__call__, prefect.task_engine.run_task)
    with bench.plain_python() as found:
        assert double(2) == 4
        # tasks.compress.run_step_as_task's way: with_options, then a state's result
        assert double.with_options(task_run_name="x", retries=1)(3, return_state=True).result() == 6
        assert double.submit(4).result() == 8
        assert [f.result() for f in add.map([1, 2], unmapped(10))] == [11, 12]
        assert [f.result() for f in add.map(x=[1, 2], y=[3, 4])] == [4, 6]
        with pytest.raises(ValueError, match="boom"):
            boom.with_options(retries=0)(return_state=True).result()
        assert pipeline([5]) == [10] and pipeline.fn([6]) == [12]
        with pytest.raises(RuntimeError, match="Prefect engine ran"):
            prefect.task_engine.run_task(task=double, parameters={"x": 1})
    assert calls == [2, 3, 4, 5, 6]
    assert (Task.__call__, Task.submit, Task.map, Flow.__call__, prefect.task_engine.run_task) == originals
    # found by type in every flows.* / tasks.* module, dict-held step tasks included
    assert "flows.distill.distill" in found["flows"]
    assert "tasks.compress.STEP_TASKS[...]" in found["tasks"]
    assert {"tasks.students.train_student", "tasks.benchmark.evaluate_group_task"} <= set(found["tasks"])
    assert not bench.prefect_server_started()


def test_the_dag_runs_as_plain_python_with_mlflow_and_no_prefect(
    bench, tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    import mlflow

    from tests.conftest import tiny_config

    config = tiny_config(tiny_model_dir, data_dir, tmp_path)
    config["students"] = [{"num_layers": 2}]
    config["static"] = {"sources": []}
    config["compress"] = {
        "steps": [{"technique": "emb-int8", "targets": ["teacher"], "calibration_sentences": 100}]
    }
    config["tracking"]["log_models"] = False
    run = bench.run_plain("quick", overrides=config)  # raises if a Prefect server was started
    assert run["seconds"] > 0 and Path(run["result"]["table_csv"]).is_file()
    mlflow.set_tracking_uri(config["tracking"]["tracking_uri"])
    parent = mlflow.get_run(run["result"]["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and "flow_seconds" in parent.data.metrics
    assert parent.data.tags["prefect.flow_run_id"] == ""  # no flow run: plain Python
    assert "teacher-emb-int8" in Path(run["result"]["table_csv"]).read_text()


# --- (d) memory -----------------------------------------------------------------------------------------


def test_corpus_is_repeated_with_numbered_suffixes(bench, tmp_path: Path) -> None:
    path = bench.write_corpus(["a b.", "c d."], 5, tmp_path / "corpus.txt")
    assert path.read_text().splitlines() == ["a b.", "c d.", "a b. (1)", "c d. (1)", "a b. (2)"]


def test_cache_stage_child_reports_its_peak_rss(bench, tiny_model_dir: Path, tmp_path: Path) -> None:
    corpus = bench.write_corpus([f"sentence {i} is short." for i in range(50)], 120, tmp_path / "c.txt")
    run = bench.run_child(
        "rss-cache",
        {"model": str(tiny_model_dir), "corpus": str(corpus), "cache": str(tmp_path / "cache")},
        tmp_path / "child.log",
    )
    assert run["rows"] == 120 and run["dim"] == 32 and run["shards"] == 1
    assert run["process_cpu_s"] > 0 and run["seconds"] < run["process_s"]
    assert 0 < run["rss_after_imports_mb"] <= run["peak_rss_mb"] < 8192
    stream = bench.run_child(
        "rss-dataset", {"entry": run["entry"], "corpus": str(corpus)}, tmp_path / "d.log"
    )
    assert stream["rows"] == 120 and stream["peak_rss_mb"] > 0


def test_report_rows_for_overhead_and_memory(bench) -> None:
    def stage(sentences: int, peak: float, streamed: float, table: float) -> dict:
        mb = sentences * 384 * 4 / 2**20
        return {
            "sentences": sentences,
            "peak_rss_mb": peak,
            "dim": 384,
            "embeddings_mb": mb,
            "dataset_streamed": {"peak_rss_mb": streamed},
            "dataset_in_memory": {"peak_rss_mb": table},
        }

    table = bench.markdown(
        {
            "cpu": "cpu",
            "threads": 2,
            "teacher": "tiny",
            "date": "2026-11-27",
            "overhead": {
                "profile": "quick",
                "flow_s": 315.0,
                "plain_s": 300.0,
                "server_start_s": 12.0,
                "overhead": 0.05,
                "flow_cpu_s": 620.0,
                "plain_cpu_s": 600.0,
                "cpu_overhead": 620.0 / 600.0 - 1,
                "goal": 0.05,
                "date": "2026-11-27",
            },
            "memory": {
                "cache_stage": [stage(100_000, 800.0, 650.0, 1200.0), stage(1_000_000, 840.0, 660.0, 8000.0)],
                "ratio": 1.05,
                "dataset_ratio": 660.0 / 650.0,
                "date": "2026-11-26",
            },
        }
    )
    assert table.startswith("Measured (b) 2026-11-27; (d) 2026-11-26 on cpu (2 threads)")
    assert "| (b) quick profile as the Prefect flow / as plain Python" in table
    assert "(315 s vs 300 s; starting the temporary server 12 s of it) | +5.0% | <= +5% |" in table
    assert "Prefect server included; 620 vs 600 s) | +3.3% | <= +5% |" in table
    assert (
        "1,000,000 / 100,000 sentences (840 vs 800 MB; their 384-d vectors: 1465 vs 146 MB) | 1.05 | ~1 |"
        in table
    )
    assert "1,000,000 / 100,000 sentences (660 vs 650 MB) | 1.02 | ~1 |" in table
    assert "(660 vs 8000 MB) | 0.08 | < 1 |" in table
    assert "(a)" not in table and "(c)" not in table
