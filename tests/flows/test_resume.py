"""kill -9 during training, then the same command again: finished students are reused, the killed one
resumes from its last checkpoint, and the run the kill left RUNNING in MLflow is closed by the next run."""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import psutil
import yaml

from tests.conftest import tiny_config
from tests.flows.cli_process import start_cli

REPO = Path(__file__).resolve().parents[2]


def _kill_tree(process: subprocess.Popen) -> None:
    family = [process.pid] + [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_kill_during_training_then_rerun_resumes(tmp_path: Path, tiny_model_dir, data_dir) -> None:
    config = tiny_config(tiny_model_dir, data_dir, tmp_path)
    # Two distinct students, slow enough on the tiny model to be caught mid-training (many small steps).
    config["students"] = [{"num_layers": 1}, {"num_layers": 2}]
    config["data"]["corpus_wiki_sentences"] = 2000
    config["training"] = {"batch_size": 8, "evaluations_per_epoch": 5, "epochs": 1}
    config["static"] = {"sources": []}
    config["compress"] = {"steps": []}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    students = Path(config["work_dir"]) / "artifacts" / "students"

    first = start_cli(config_file, tmp_path / "prefect-1", tmp_path / "first.log", start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            done = {p.name for p in students.glob("[!.]*") if (p / "manifest.json").is_file()}
            # a checkpoint the Trainer finished writing (trainer_state.json comes last) of a student that
            # is still training
            training = [
                state
                for state in students.glob(".*.work/checkpoints/checkpoint-*/trainer_state.json")
                if state.parents[2].name.removeprefix(".").removesuffix(".work") not in done
            ]
            if done and training:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError("never saw one student finished and the next one checkpointed")
    finally:
        _kill_tree(first)
    finished = done

    start = time.monotonic()
    second = start_cli(config_file, tmp_path / "prefect-2", tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-5000:]
    rerun_seconds = time.monotonic() - start
    log = (tmp_path / "second.log").read_text()
    assert "reusing student layers-1of4" in log  # finished before the kill: not trained again
    assert "resuming from" in log and "checkpoint-" in log  # the killed one continues
    assert finished <= {p.name for p in students.glob("[!.]*")}
    assert not list(students.glob(".*.work"))  # nothing left to resume

    mlflow.set_tracking_uri(config["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(
        experiment_names=["test"],
        filter_string="tags.`mlflow.parentRunId` IS NULL",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert "ended without closing the run" in runs[0].data.tags["distill.failure_reason"]
    print(f"re-run after kill -9: {rerun_seconds:.1f} s")
