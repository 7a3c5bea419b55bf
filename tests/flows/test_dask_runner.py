"""``runner.kind=dask`` end to end: the tiny DAG through the CLI on a 2-worker LocalCluster, against the same
config on the local runner. Quality columns equal; every child run under its parent run; the workers'
task runs in the flow run's own Prefect server; the cluster closed before speed is timed."""

import sqlite3
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.report import METRIC_COLUMNS
from tests.conftest import tiny_config
from tests.flows.cli_process import run_cli

pytestmark = pytest.mark.slow

# Both runs train with one torch thread (a Dask worker's threads_per_worker): float sums in training depend
# on the thread count, so with torch's default here (2) the local students would differ in the last bits.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# every figure but speed, size on disk (a model card's bytes vary) and what depends on them
NOT_QUALITY = {"sentences_per_second", "speedup_vs_teacher", "on_frontier", "on_storage_frontier", "size_mb"}
QUALITY = ["variant", "kind", "parent", "lineage", "status"] + [
    c for c in METRIC_COLUMNS if c not in NOT_QUALITY | {"size_reduction_vs_teacher", "build_seconds"}
]
VARIANTS = [
    "teacher",
    "layers-2of4",
    "ends",
    "light",
    "teacher-static16",
    "ends-static16",
    "teacher-static16-trained",
    "ends-static16-trained",
    "teacher-pca16",
    "teacher-pca8",
    "teacher-dim16",
    "teacher-dim8",
    "teacher-emb-int8",
    "ends-emb-int8",
    "ends-torch-int8",
    "ends-onnx-int8",
    "ends-onnx-int8-emb-int8",
]


def _config(model_dir: Path, light_dir: Path, data_dir: Path, root: Path, runner: dict) -> Path:
    config = tiny_config(model_dir, data_dir, root, light_dir)
    config["compress"] = {  # every kind of step (a chain too) on two targets; fewer than the flow test's
        "steps": [
            {"technique": "pca", "targets": ["teacher"], "dims": [16, 8], "fit_sentences": 100},
            {"technique": "emb-int8", "targets": ["teacher", "ends"], "calibration_sentences": 100},
            {"technique": "torch-int8", "targets": ["ends"]},
            {
                "technique": "onnx-int8",
                "targets": ["ends"],
                "then": [{"technique": "emb-int8", "calibration_sentences": 100}],
            },
        ]
    }
    config["tracking"]["log_models"] = False
    config["selection"] = {"registry": False, "min_retention_pct": 1.0, "min_agreement": None}
    config["runner"] = runner
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def local_and_dask(tmp_path_factory, tiny_model_dir, tiny_light_model_dir, data_dir) -> dict:
    """One run per runner; same-length folder names (saved model files carry their paths, so sizes match)."""
    base = tmp_path_factory.mktemp("runners")
    runs = {}
    for name, runner in (("run-l", {"kind": "local"}), ("run-d", {"kind": "dask", "workers": 2})):
        root = base / name
        root.mkdir()
        config_file = _config(tiny_model_dir, tiny_light_model_dir, data_dir, root, runner)
        code, log = run_cli(config_file, root / "prefect", env=ONE_THREAD)
        assert code == 0, log[-8000:]
        (table,) = (root / "work" / "runs").glob("*/report/tradeoff.csv")
        runs[runner["kind"]] = {"root": root, "log": log, "table": pd.read_csv(table)}
    return runs


def test_dask_table_has_the_local_quality_columns(local_and_dask) -> None:
    local, dask = (local_and_dask[k]["table"] for k in ("local", "dask"))
    assert list(dask["variant"]) == VARIANTS
    pd.testing.assert_frame_equal(dask[QUALITY], local[QUALITY], check_exact=True)
    heldout = [c for c in local.columns if c.startswith("heldout_") and c.endswith("_spearman")]
    assert len(heldout) >= 3
    pd.testing.assert_frame_equal(dask[heldout], local[heldout], check_exact=True)
    # a trained student's folder holds sentence-transformers' model card, with its training time and randomly
    # drawn example sentences: its size varies by some bytes from one training to the next, on any runner
    assert ((dask["size_mb"] - local["size_mb"]).abs() < 1e-3).all()
    assert (dask["sentences_per_second"] > 0).all() and dask["speedup_vs_teacher"].iloc[0] == 1.0


def test_dask_child_runs_land_under_their_parent_run(local_and_dask) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{local_and_dask['dask']['root'] / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("test")
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not parent]
    assert parent.data.params["runner.kind"] == "dask"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["variant"] for c in children) == sorted(VARIANTS)
    assert {c.info.status for c in children} == {"FINISHED"}
    client = MlflowClient()
    for child in children:  # students opened their run and logged their curves on a Dask worker
        if child.data.params["variant_kind"] in ("layer-reduced", "light"):
            assert len(client.get_metric_history(child.info.run_id, "training/loss")) >= 2


def test_dask_workers_report_to_the_flow_runs_prefect_server(local_and_dask) -> None:
    """Task runs of the workers are in the flow run's temporary server (its SQLite file), under their
    subflow run; no worker started a server of its own."""
    dask = local_and_dask["dask"]
    assert dask["log"].count("Starting temporary server") == 1
    with sqlite3.connect(dask["root"] / "prefect" / "prefect.db") as db:
        rows = db.execute(
            "SELECT f.name, tr.name, tr.state_type FROM task_run tr "
            "JOIN flow_run fr ON tr.flow_run_id = fr.id JOIN flow f ON fr.flow_id = f.id"
        ).fetchall()
    by_flow: dict[str, list[str]] = {}
    for flow_name, task_name, state in rows:
        assert state == "COMPLETED", (flow_name, task_name)
        by_flow.setdefault(flow_name, []).append(task_name)
    assert sum(n.startswith("train-") for n in by_flow["train-students"]) == 3
    assert sum(n.startswith("distill-static") for n in by_flow["compress-variants"]) == 2
    assert sum(n.startswith("train-static") for n in by_flow["compress-variants"]) == 2
    assert sum(n.startswith("compress-") for n in by_flow["compress-variants"]) == 6  # 5 steps + 1 chained
    assert sum(n.startswith("evaluate-quality") for n in by_flow["measure-variants"]) >= 8  # one per network


def test_cluster_is_local_and_closed_before_speed_is_timed(local_and_dask) -> None:
    log = local_and_dask["dask"]["log"]
    assert "Dask LocalCluster at tcp://127.0.0.1:" in log
    assert log.index("Dask LocalCluster tcp://127.0.0.1:") < log.index("throughput:")  # "... closed"
    assert "LocalCluster" not in local_and_dask["local"]["log"]
