"""The GPU path (``device: cuda``): the tiny DAG on CUDA beside the same DAG on the CPU, through the CLI.

Skipped where torch sees no GPU. On a GPU: teacher encoding, training (bf16 / fp16 autocast), quality and
speed run on CUDA; ONNX and torch-int8 rows run and are timed on the CPU against the teacher timed on the
CPU; every row that involves no training scores as on the CPU.
"""

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import tiny_config
from tests.flows.cli_process import run_cli

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA GPU visible to torch {torch.__version__}: the GPU path is tested where one is present",
)
QUALITY = ["sts_dev_spearman", "sts_test_spearman", "heldout_mean_spearman", "heldout_agreement_spearman"]


def _run(
    device: str, root: Path, model_dir: Path, light_dir: Path, data_dir: Path
) -> tuple[pd.DataFrame, str]:
    config = tiny_config(model_dir, data_dir, root, light_dir)
    config["device"] = device
    config["selection"] = {"min_retention_pct": 1.0, "min_agreement": None}
    # every CPU-only runtime kind but OpenVINO (its CPU path is the ONNX one's here), and a chain
    config["compress"]["steps"] = [
        {**step, "rescore": True} if step["technique"] == "emb-binary" else step
        for step in config["compress"]["steps"]
        if step["technique"] != "openvino-int8"
    ]
    # a Matryoshka student (its rotation fitted on the device, its loss under autocast) and its prefixes
    config["students"].append({"num_layers": 4, "loss": "mse+matryoshka"})
    config["training"]["matryoshka_dims"] = [16, 8]
    config["compress"]["steps"].append(
        {"technique": "truncate", "targets": ["layers-4of4-matryoshka"], "dims": [16, 8]}
    )
    root.mkdir(parents=True)
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    code, output = run_cli(config_file, root / "prefect")
    assert code == 0, output[-8000:]
    (table_file,) = (root / "work" / "runs").glob("*/report/tradeoff.csv")
    return pd.read_csv(table_file).set_index("variant"), table_file.parts[-3]


def test_the_dag_runs_on_cuda(tmp_path: Path, tiny_model_dir, tiny_light_model_dir, data_dir) -> None:
    gpu, gpu_run = _run("cuda", tmp_path / "gpu", tiny_model_dir, tiny_light_model_dir, data_dir)
    cpu, _ = _run("cpu", tmp_path / "cpu", tiny_model_dir, tiny_light_model_dir, data_dir)
    name = torch.cuda.get_device_name(0)

    assert list(gpu.index) == list(cpu.index) and (gpu["status"] == "ok").all()
    on_cpu = gpu["lineage"].str.contains("onnx|torch-int8")
    assert (gpu.loc[~on_cpu, "speed_device"] == f"cuda ({name})").all()
    assert gpu.loc[on_cpu, "speed_device"].str.startswith("cpu (").all() and on_cpu.any()
    assert (cpu["speed_device"].str.startswith("cpu (")).all()
    assert gpu.loc["teacher", "speedup_vs_teacher"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in gpu["speedup_vs_teacher"])

    # rows without training: the same scores as on the CPU (float32 on both; summation order differs)
    # the trained students and static students, and rows made from them
    trained = gpu["lineage"].str.contains(r"^teacher > (?:layers-|ends|light)|static\d*-trained")
    for column in QUALITY:
        pd.testing.assert_series_equal(gpu.loc[~trained, column], cpu.loc[~trained, column], atol=2e-3)
    assert gpu.loc[~trained, "embedding_dim"].equals(cpu.loc[~trained, "embedding_dim"])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'gpu' / 'mlflow.db'}")
    parent = mlflow.get_run(gpu_run)
    assert parent.data.params["device"] == "cuda"
    assert parent.data.params["benchmark.device_used"] == f"cuda ({name})"
    assert parent.data.tags["machine.gpu"] == name
    students = mlflow.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{gpu_run}' and params.kind = 'student'",
        output_format="list",
    )
    trained_students = [s for s in students if s.data.params["variant_kind"] in ("layer-reduced", "light")]
    assert trained_students
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    for student in trained_students:
        assert student.data.params["train_device"] == f"cuda ({name})"
        assert student.data.params["mixed_precision"] == precision
    trained_static = [s for s in students if s.data.params.get("static_training") == "tokenlearn"]
    assert len(trained_static) == 2  # from the teacher and from the "ends" student, trained on the GPU
    assert {s.data.params["train_device"] for s in trained_static} == {f"cuda ({name})"}
    assert gpu.loc[gpu["lineage"].str.endswith("static16-trained"), "sts_test_spearman"].notna().all()

    matryoshka = gpu.loc[gpu.index.str.startswith("layers-4of4-matryoshka")]
    assert len(matryoshka) == 3  # the student and its 16- and 8-dim prefixes
    assert matryoshka["sts_test_spearman"].notna().all() and matryoshka["mse_to_teacher"].isna().all()
    (trained_matryoshka,) = [s for s in trained_students if s.data.params.get("loss") == "mse+matryoshka"]
    curves = MlflowClient().get_metric_history(
        trained_matryoshka.info.run_id, "training/sts_dev_spearman_dim8"
    )
    assert curves and all(math.isfinite(point.value) for point in curves)
    rescored = gpu.index[gpu.index.str.endswith("-emb-binary-rescore")]
    assert len(rescored) == 2 and gpu.loc[rescored, "sts_test_spearman"].notna().all()
