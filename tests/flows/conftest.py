"""The tiny DAG run twice through the CLI (one session-wide fixture: the distillation and benchmark flow
tests both read its runs)."""

import mlflow
import pytest
import yaml

from tests.conftest import tiny_config
from tests.flows.cli_process import run_cli


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, tiny_model_dir, tiny_light_model_dir, data_dir):
    tmp = tmp_path_factory.mktemp("flow")
    config = tiny_config(tiny_model_dir, data_dir, tmp, tiny_light_model_dir)
    config["selection"] = {
        "min_retention_pct": 1.0,
        "min_agreement": None,
    }  # random tiny models: any positive dev score competes
    # 300 sentences timed (not 60): the benchmark flow test compares these runs' speed-ups with its own
    config["data"]["heldout_sentences"] = config["benchmark"]["speed_sentences"] = 300
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    results = [run_cli(config_file, tmp / f"prefect-{i}") for i in range(2)]
    for result in results:
        assert result[0] == 0, result[1][-8000:]
    mlflow.set_tracking_uri(config["tracking"]["tracking_uri"])
    experiment = mlflow.get_experiment_by_name("test")
    parents = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`mlflow.parentRunId` IS NULL",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return config, experiment, parents, results


@pytest.fixture()
def two_runs_store(two_runs) -> None:
    """Point MLflow at the two runs' store again (tests in between may have pointed it elsewhere)."""
    mlflow.set_tracking_uri(two_runs[0]["tracking"]["tracking_uri"])
