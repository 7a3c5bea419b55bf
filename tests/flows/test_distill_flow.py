"""The whole DAG on a tiny model, run twice through the CLI in fresh processes with a temporary Prefect
server each time and one MLflow SQLite store: runs, metrics and table land, and the second run hits the
teacher cache (it records encoding nothing with the teacher)."""

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.report import METRIC_COLUMNS
from tests.conftest import tiny_config
from tests.flows.cli_process import start_cli

REPO = Path(__file__).resolve().parents[2]
EXPECTED_VARIANTS = [
    "teacher",
    "layers-2of4",
    "ends",
    "light",
    "teacher-static16",
    "ends-static16",
    "teacher-pca16",
    "teacher-pca8",
    "teacher-emb-int8",
    "teacher-emb-binary",
    "teacher-torch-int8",
    "teacher-openvino-int8",
    "teacher-onnx",
    "teacher-onnx-int8",
    "teacher-onnx-int8-emb-int8",
    "ends-emb-int8",
    "ends-emb-binary",
    "ends-torch-int8",
    "ends-openvino-int8",
    "ends-onnx",
    "ends-onnx-int8",
    "ends-onnx-int8-emb-int8",
]


def _run_cli(config_file: Path, prefect_home: Path) -> tuple[int, str]:
    """Exit code and output of one ``distill run``."""
    log = prefect_home.with_suffix(".log")
    return start_cli(config_file, prefect_home, log).wait(timeout=900), log.read_text()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, tiny_light_model_dir, data_dir):
    tmp = tmp_path_factory.mktemp("flow")
    config = tiny_config(tiny_model_dir, data_dir, tmp, tiny_light_model_dir)
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    results = [_run_cli(config_file, tmp / f"prefect-{i}") for i in range(2)]
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


def test_one_parent_run_per_flow_run_with_config_and_tags(two_runs) -> None:
    _, _, parents, _ = two_runs
    assert len(parents) == 2
    for parent in parents:
        assert parent.info.status == "FINISHED"
        assert parent.data.params["teacher.model"].endswith("st")
        assert parent.data.params["data.corpus_wiki_sentences"] == "200"
        assert parent.data.tags["prefect.flow_run_id"]
        assert parent.data.tags["prefect.flow_run_name"] in parent.info.run_name
        metrics = parent.data.metrics  # held-out suites: every pair counted, none scored that was trained on
        assert metrics["heldout_sts12_pairs_total"] == 3108
        assert metrics["heldout_sts12_pairs_contaminated"] >= 1002  # at least the STS-B train pairs
        assert metrics["heldout_sts12_pairs_scored"] == 40


def test_child_run_per_variant_with_stable_metrics(two_runs) -> None:
    _, experiment, parents, _ = two_runs
    children = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
        output_format="list",
    )
    names = {c.info.run_name for c in children}
    assert names == set(EXPECTED_VARIANTS)
    for child in children:
        assert set(METRIC_COLUMNS) <= set(child.data.metrics)
        assert "heldout_sts12_spearman" in child.data.metrics
    teacher = next(c for c in children if c.info.run_name == "teacher")
    assert teacher.data.metrics["speedup_vs_teacher"] == 1.0
    assert teacher.data.metrics["sts_test_retention_pct"] == pytest.approx(100.0)
    student = next(c for c in children if c.info.run_name == "ends")
    assert student.data.params["layers"] == "0,3"
    assert {c.data.params["uses_sts_labels"] for c in children} == {"false"}  # no CoSENT student here
    # "ends" keeps layers 0 and 3 as "layers-2of4" does: one stored student, logged with the first row
    twin = next(c for c in children if c.info.run_name == "layers-2of4")
    assert twin.data.params["artifact_key"] == student.data.params["artifact_key"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(twin.info.run_id, "model")}
    assert "model/modules.json" in artifacts


def test_tradeoff_table_and_report_files_on_parent(two_runs) -> None:
    _, _, parents, _ = two_runs
    client = MlflowClient()
    run_id = parents[0].info.run_id
    local = client.download_artifacts(run_id, "tradeoff_table.json")
    table = json.loads(Path(local).read_text())
    assert [row[0] for row in table["data"]] == EXPECTED_VARIANTS
    report = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {
        "report/tradeoff.csv",
        "report/tradeoff.md",
        "report/tradeoff.png",
        "report/variants.png",
    } <= report


def test_second_run_hits_the_teacher_cache(two_runs) -> None:
    _, _, parents, results = two_runs
    first, second = (p.data.metrics["teacher_sentences_encoded"] for p in parents)
    assert first == 200 + 60  # corpus + held-out sentences, encoded once
    assert second == 0
    assert "teacher cache hit" in results[1][1]


def test_an_unchanged_rerun_trains_exports_and_scores_nothing(two_runs) -> None:
    _, _, parents, results = two_runs
    first, second = (p.data.metrics for p in parents)
    # every row but the teacher and the two rows made from it without files (torch int8, binary vectors)
    assert second["variants_reused"] == len(EXPECTED_VARIANTS) - 3
    assert first["variants_reused"] < 10  # only "ends" and what is made from it (its twin was built first)
    log = results[1][1]
    assert "training student" not in log and "OpenVINO int8 of" not in log and " stored in " not in log
    assert "reusing student ends" in log and "reusing the quality scores" in log
    assert second["flow_seconds"] < first["flow_seconds"]


def test_cli_prints_the_table(two_runs) -> None:
    _, _, _, results = two_runs
    out = results[0][1]
    assert "Trade-off table" in out and "| teacher" in out and "| ends" in out
