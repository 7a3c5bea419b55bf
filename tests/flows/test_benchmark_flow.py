"""``distill benchmark`` on the outputs of the tiny DAG (``two_runs``): in a fresh work folder, the champion
(a registered alias) and runs' models of every storage kind are downloaded, scored and timed beside the
teacher; quality columns equal the distillation run's exactly, speed-ups agree within noise."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.flows.cli_process import run_cli

BENCHMARKED = ["ends", "teacher-onnx-int8", "teacher-pca16", "teacher-emb-binary", "ends-openvino-int8"]
QUALITY = [
    "sts_dev_spearman",
    "sts_test_spearman",
    "sts_test_pearson",
    "sts_test_retention_pct",
    "heldout_agreement_spearman",
    "mse_to_teacher",
    "embedding_dim",
    "bytes_per_vector",
]


@pytest.fixture(scope="module")
def benchmarked(two_runs, tmp_path_factory):
    config, experiment, parents, _ = two_runs
    mlflow.set_tracking_uri(config["tracking"]["tracking_uri"])
    tmp = tmp_path_factory.mktemp("benchmark")
    client = MlflowClient()
    source = parents[0]
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{source.info.run_id}'"
    )
    child_of = {c.data.params["variant"]: c.info.run_id for c in children}
    refs = ["champion", *(f"runs:/{child_of[name]}/model" for name in BENCHMARKED)]
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = (
        "--set", f"work_dir={tmp / 'work'}",  # nothing reused from the distillation runs' folder
        "--set", "tracking.experiment=test-benchmarks",  # keeps the distillation tests' experiment as it was
        "--set", "selection.model_name=test-student",  # where the distillation runs registered the champion
        "--models", *refs,
    )  # fmt: skip
    code, out = run_cli(config_file, tmp / "prefect", "benchmark", args)
    assert code == 0, out[-8000:]
    source_table = pd.read_csv(
        Path(config["work_dir"]) / "runs" / source.info.run_id / "report" / "tradeoff.csv"
    )
    bench_experiment = client.get_experiment_by_name("test-benchmarks")
    (parent,) = client.search_runs([bench_experiment.experiment_id], "tags.`mlflow.parentRunId` IS NULL")
    table = pd.read_csv(Path(tmp / "work") / "runs" / parent.info.run_id / "report" / "tradeoff.csv")
    return parents, source_table, parent, table, out


pytestmark = pytest.mark.usefixtures("two_runs_store")


def test_quality_columns_equal_the_distillation_runs(benchmarked) -> None:
    _, source_table, _, table, _ = benchmarked
    champion = MlflowClient().get_model_version_by_alias("test-student", "champion")
    champion_name = champion.tags["variant"]
    assert list(table["variant"]) == ["teacher", champion_name, *BENCHMARKED]
    assert list(table["model_ref"].fillna("")[:2]) == ["", "champion"]
    assert (table["same_data_as_source"][1:] == "yes").all()
    assert (table["same_teacher_as_source"][1:] == "yes").all()
    suites = [c for c in source_table.columns if c.startswith("heldout_") and c.endswith("_spearman")]
    by_name = source_table.set_index("variant")
    for _, row in table.iterrows():
        expected = by_name.loc[row["variant"]]
        # the distillation run scored a PCA row as the teacher's encoding times its Dense (one encoding for
        # both); a model downloaded from MLflow is encoded whole: equal up to float rounding, which can
        # reorder tied pairs (identical sentences, cosine 1) in the small held-out samples
        reduced = row["kind"] in ("pca", "truncated")
        for column in QUALITY + suites:
            if pd.isna(expected[column]):
                assert pd.isna(row[column]), (row["variant"], column)
            elif reduced:
                tolerance = 0.03 if column in suites else 1e-4 if column.endswith("_pct") else 1e-6
                assert row[column] == pytest.approx(expected[column], abs=tolerance), (row["variant"], column)
            else:
                assert row[column] == expected[column], (row["variant"], column)
        assert row["kind"] == expected["kind"] and row["lineage"] == expected["lineage"]
        # a downloaded OpenVINO graph has no float model beside it: its own weights (+ int8 scales) count
        assert row["parameters"] == pytest.approx(expected["parameters"], rel=0.02), row["variant"]


def test_speed_ups_agree_with_the_distillation_run_within_noise(benchmarked) -> None:
    _, source_table, _, table, _ = benchmarked
    by_name = source_table.set_index("variant")
    for _, row in table.iterrows():
        before = by_name.loc[row["variant"], "speedup_vs_teacher"]
        if before > 20:  # static students: 300 sentences take a few milliseconds, timer noise
            assert row["speedup_vs_teacher"] > 1, row["variant"]
            continue
        ratio = row["speedup_vs_teacher"] / before
        assert 1 / 3 < ratio < 3, (row["variant"], ratio)  # tiny models on shared cores: noisy, never 10x off


def test_run_is_tagged_with_the_machine_and_the_sources(benchmarked) -> None:
    sources, _, parent, table, out = benchmarked
    tags = parent.data.tags
    assert tags["distill.job"] == "benchmark"
    assert tags["machine.cpu"] and tags["machine.gpu"] == "none" and int(tags["machine.threads"]) >= 1
    # the runs' models came from the first distillation run; the champion from either
    assert sources[0].info.run_id in tags["distill.source_runs"].split(",")
    assert set(tags["distill.source_runs"].split(",")) <= {p.info.run_id for p in sources}
    children = MlflowClient().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == len(table)
    champion = next(c for c in children if c.data.params.get("model_ref") == "champion")
    version = MlflowClient().get_model_version_by_alias("test-student", "champion").version
    assert champion.data.params["registered_model"] == f"test-student v{version}"
    assert champion.data.params["source_model_uri"] == "models:/test-student@champion"
    assert champion.data.params["job"] == "benchmark"
    assert "Benchmark (MLflow run" in out and "downloaded to" in out


def test_bad_reference_fails_before_any_work(two_runs, tmp_path: Path) -> None:
    config = two_runs[0]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = ("--set", f"work_dir={tmp_path / 'work'}", "--models", "champion", "test-student@nope")
    code, out = run_cli(config_file, tmp_path / "prefect", "benchmark", args)
    assert code == 2
    assert "models[1]='test-student@nope': registered model 'test-student' has no alias 'nope'" in out
    assert not (tmp_path / "work").exists() and "Flow run" not in out  # no server, no folder, no run
