"""``distill warm-cache`` ahead of ``distill run``: the warm-up encodes the corpus and held-out sentences
into the same content-addressed entries the run reads, so the run encodes nothing; both land in MLflow."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_config
from tests.flows.cli_process import run_cli


@pytest.fixture(scope="module")
def warmed_then_run(tmp_path_factory, tiny_model_dir, data_dir):
    tmp = tmp_path_factory.mktemp("warm")
    config = tiny_config(tiny_model_dir, data_dir, tmp)
    # the teacher alone: this test is about its embeddings
    config.update(students=[], light_students=[], static={"sources": []}, compress={"steps": []})
    config["selection"] = {"registry": False}
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    warm = run_cli(config_file, tmp / "prefect-warm", "warm-cache")
    assert warm[0] == 0, warm[1][-8000:]
    entries = sorted(p.name for p in (tmp / "work" / "teacher-cache").iterdir())
    run = run_cli(config_file, tmp / "prefect-run", "run")
    assert run[0] == 0, run[1][-8000:]
    client = MlflowClient(config["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name("test")
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`mlflow.parentRunId` IS NULL",
        order_by=["attributes.start_time ASC"],
    )
    return tmp, entries, parents, warm[1], run[1]


def test_the_run_after_a_warm_up_encodes_nothing(warmed_then_run) -> None:
    tmp, entries, parents, _, run_log = warmed_then_run
    warm, run = parents
    assert warm.data.tags["distill.job"] == "warm-cache" and run.data.tags["distill.job"] == "distill"
    assert warm.data.metrics["teacher_sentences_encoded"] == 200 + 60  # corpus + held-out sentences
    assert warm.data.metrics["teacher_sentences_per_second"] > 0
    assert run.data.metrics["teacher_sentences_encoded"] == 0
    assert "teacher cache hit" in run_log
    assert sorted(p.name for p in (tmp / "work" / "teacher-cache").iterdir()) == entries  # nothing added
    assert len(entries) == 2


def test_the_warm_up_says_where_and_what(warmed_then_run) -> None:
    tmp, entries, parents, warm_log, _ = warmed_then_run
    tags = parents[0].data.tags
    assert tags["machine.cpu"] and tags["machine.threads"]
    cache = Path(tmp / "work" / "teacher-cache")
    assert {Path(tags["teacher_cache.corpus"]).name, Path(tags["teacher_cache.heldout"]).name} == set(entries)
    assert all(Path(tags[f"teacher_cache.{n}"]).parent == cache for n in ("corpus", "heldout"))
    assert "# Teacher cache for the quick profile" in warm_log and "| corpus | 200 x 32 | 200 |" in warm_log
