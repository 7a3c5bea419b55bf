"""``flows.runner``: the local runner changes nothing; a Dask pool is a LocalCluster on 127.0.0.1 whose
workers get the flow run's Prefect API, MLflow store and torch threads, closed when the block ends."""

import os

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.runner import dask_pool, dask_tasks, release_workers, run_tasks, worker_env
from tasks.config import RunnerConfig


def test_the_local_runner_calls_each_task_in_order() -> None:
    calls: list[int] = []

    def task(i: int, *, twice: bool = False) -> int:
        calls.append(i)
        return 2 * i if twice else i

    with dask_pool(RunnerConfig()) as pool:
        assert pool is None
        with dask_tasks() as task_runner:
            assert task_runner is None
        assert run_tasks([(task, (1,), {}), (task, (2,), {"twice": True})]) == [1, 4]
        release_workers()  # nothing to release
    assert calls == [1, 2]


def test_workers_get_the_flow_runs_api_store_and_threads() -> None:
    runner = RunnerConfig(kind="dask", threads_per_worker=3)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4321/api"}):
        env = worker_env(runner, "sqlite:////tmp/mlflow.db")
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/mlflow.db"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"


@pytest.mark.slow
def test_a_local_cluster_on_loopback_set_up_and_closed(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environ = dict(os.environ)
    with dask_pool(RunnerConfig(kind="dask", workers=1, threads_per_worker=1), uri) as pool:
        assert pool is not None and pool.address.startswith("tcp://127.0.0.1:")
        (info,) = pool.client.run(_worker_setup).values()
        assert info == {"threads": 1, "mlflow": uri, "env": uri}
        cluster = pool.cluster
        scheduler = cluster.scheduler_info
        assert scheduler["address"].startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in scheduler["workers"])
        assert _listening_addresses() == {"127.0.0.1"}  # scheduler, nannies, workers: loopback only
        assert dict(os.environ) == environ  # the workers' variables are theirs only
    assert pool.closed and cluster.status.name == "closed"


def _worker_setup() -> dict:
    import os

    import mlflow
    import torch

    return {
        "threads": torch.get_num_threads(),
        "mlflow": mlflow.get_tracking_uri(),
        "env": os.environ["MLFLOW_TRACKING_URI"],
    }


def _listening_addresses() -> set[str]:
    import psutil

    me = psutil.Process()
    return {
        c.laddr.ip
        for p in (me, *me.children(recursive=True))
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
