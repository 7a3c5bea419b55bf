"""Three runs started at once on one work dir and one fresh MLflow SQLite store all complete, each with its
own complete MLflow run; a stage output they share is built once (the others wait for it and reuse it)."""

from pathlib import Path

import mlflow
import yaml

from tests.conftest import tiny_config
from tests.flows.cli_process import start_cli

REPO = Path(__file__).resolve().parents[2]


def test_three_runs_at_once_share_one_work_dir_and_store(tmp_path: Path, tiny_model_dir, data_dir) -> None:
    config = tiny_config(tiny_model_dir, data_dir, tmp_path)
    config["students"] = [{"num_layers": 2}]
    config["static"] = {"sources": []}
    config["compress"] = {
        "steps": [
            {"technique": "pca", "targets": ["teacher"], "dims": [8], "fit_sentences": 100},
            {"technique": "emb-int8", "targets": ["teacher"], "calibration_sentences": 100},
        ]
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    runs = [start_cli(config_file, tmp_path / f"prefect-{i}", tmp_path / f"run-{i}.log") for i in range(3)]
    codes = [run.wait(timeout=900) for run in runs]
    logs = [(tmp_path / f"run-{i}.log").read_text() for i in range(3)]
    assert codes == [0, 0, 0], "\n\n".join(log[-3000:] for log in logs)

    assert sum("training student layers-2of4" in log for log in logs) == 1  # built once, reused twice
    assert sum("reusing student layers-2of4" in log for log in logs) == 2

    mlflow.set_tracking_uri(config["tracking"]["tracking_uri"])
    parents = mlflow.search_runs(
        experiment_names=["test"], filter_string="tags.`mlflow.parentRunId` IS NULL", output_format="list"
    )
    assert len(parents) == 3 and {p.info.status for p in parents} == {"FINISHED"}
    for parent in parents:
        children = mlflow.search_runs(
            experiment_names=["test"],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            output_format="list",
        )
        assert sorted(c.data.params["variant"] for c in children) == sorted(
            ["teacher", "layers-2of4", "teacher-pca8", "teacher-emb-int8"]
        )
        assert {c.info.status for c in children} == {"FINISHED"}
