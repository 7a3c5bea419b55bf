"""``runner.kind=dask``: the DAG's independent work submitted to a Dask cluster (prefect-dask).

The distillation flow opens one :func:`dask_pool` for the flow run: a ``LocalCluster`` bound to 127.0.0.1
(no dashboard), or a connection to the scheduler at ``runner.address``. Inside it the stages submit their
tasks through prefect-dask's ``DaskTaskRunner`` (:func:`dask_tasks`, :func:`run_tasks`): students, static
students, compress steps and quality-scoring groups run in parallel as Prefect task runs of their
subflow. Arguments and results are small (paths, settings, scores): models and arrays stay in files.

Workers get what they need to report to the right place: the Prefect API of this flow run (the temporary
server's address when there is no ``PREFECT_API_URL``; passed in the task's settings context and the
workers' environment), the MLflow tracking URI, and ``threads_per_worker`` torch threads (a worker plugin),
so that two 1-thread workers do not oversubscribe two cores. MLflow child runs name their parent run
explicitly (:class:`tasks.tracking.ChildRuns`), so no thread-local active run is involved.

Speed is never timed on the cluster: :func:`release_workers` closes the ``LocalCluster`` once quality is
scored, and the throughput task then runs in the flow's own process with nothing else running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.config import RunnerConfig

if TYPE_CHECKING:
    from distributed import Client, LocalCluster
    from prefect import Task
    from prefect.futures import PrefectFuture
    from prefect_dask import DaskTaskRunner

log = logging.getLogger(__name__)


@dataclass
class DaskPool:
    """The flow run's Dask cluster: its scheduler address, and the ``LocalCluster`` when this process
    started it (closed by :meth:`close`)."""

    address: str
    client: Client
    cluster: LocalCluster | None = None
    closed: bool = field(default=False, init=False)

    def close(self) -> None:
        """Disconnect, and shut the ``LocalCluster`` down (workers and scheduler); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.cluster is not None:  # workers send their last Prefect logs / events before they stop
            with contextlib.suppress(Exception):
                self.client.run(_drain_prefect_services)
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            # a worker whose interpreter takes over 4 s to exit is killed: after a normal end its work, logs
            # and events are all in by then, so that warning is no news
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                self.cluster.close()
            finally:
                nanny.setLevel(level)
            log.info("Dask LocalCluster %s closed", self.address)


def _drain_prefect_services() -> None:
    """On a worker: send the Prefect logs and events it holds (a worker still busy after 4 s is killed)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            service.drain_all(timeout=5)


_POOL: ContextVar[DaskPool | None] = ContextVar("dask_pool", default=None)


def prefect_api_url() -> str | None:
    """The Prefect API this process reports to: ``PREFECT_API_URL``, else its temporary server's address."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return str(PREFECT_API_URL.value())
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    return server.api_url if server is not None and server.running else None


def worker_env(runner: RunnerConfig, tracking_uri: str | None) -> dict[str, str]:
    """Environment the workers need: where to report (Prefect, MLflow) and how many threads to use."""
    threads = str(runner.threads_per_worker)
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    api_url = prefect_api_url()
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        log.warning("no Prefect API address to give the Dask workers: each will start a temporary server")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    for name in ("HF_HUB_OFFLINE", "DISTILL_DATA_DIR", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def check_scheduler(runner: RunnerConfig, timeout: float = 5.0) -> None:
    """Under ``runner.kind=dask`` with ``runner.address``: a scheduler answers there (a TCP connection within
    ``timeout`` seconds), else a ``ValueError`` naming the address and the fix."""
    if runner.kind != "dask" or runner.address is None:
        return
    host, port = runner.address.split("://", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(
            f"runner.address {runner.address}: no Dask scheduler answers there ({exc}); start one "
            "(`dask scheduler`) or leave runner.address empty to start a LocalCluster"
        ) from None


@contextmanager
def dask_pool(runner: RunnerConfig, tracking_uri: str | None = None) -> Iterator[DaskPool | None]:
    """The flow run's Dask cluster while the block runs (None under ``runner.kind=local``).

    Starts a ``LocalCluster`` on 127.0.0.1 (``runner.workers`` x ``runner.threads_per_worker``, no dashboard)
    or connects to ``runner.address``; registers :class:`flows.dask_worker.WorkerSetup`; and, for the block,
    sets this process's ``PREFECT_API_URL`` to the API it uses, so that the settings Prefect sends with each
    task point the workers at it. The cluster is closed when the block ends, also on an error or a signal.
    """
    if runner.kind != "dask":
        yield None
        return
    from distributed import Client, LocalCluster
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = worker_env(runner, tracking_uri)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the scheduler's, in this process
    # prefect-dask announces a "dashboard" link for the scheduler's health server: there is no dashboard
    logging.getLogger("prefect.task_runner.dask").setLevel(logging.WARNING)
    cluster = None
    if runner.address is None:
        saved = dict(os.environ)  # each Nanny sets its pre-spawn variables (OMP_NUM_THREADS=1, ...) here too
        cluster = LocalCluster(
            n_workers=runner.workers,
            threads_per_worker=runner.threads_per_worker,
            processes=True,
            host="127.0.0.1",
            # no dashboard; the scheduler's health / metrics server on a free loopback port (not :8787)
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": False},
            env=env,
            death_timeout=60,  # workers left behind by a killed flow process stop on their own
        )
        _restore_environ(saved)  # this process keeps its threads; the workers have theirs
        address = cluster.scheduler_address
        log.info(
            "Dask LocalCluster at %s: %d workers x %d threads",
            address,
            runner.workers,
            runner.threads_per_worker,
        )
    else:
        check_scheduler(runner)
        address = runner.address
        log.info("Dask cluster at %s", address)
    pool = None
    try:
        pool = DaskPool(address, Client(address, set_as_default=False, timeout=30), cluster)
        from flows.dask_worker import PLUGIN_NAME, WorkerSetup

        pool.client.register_plugin(WorkerSetup(env, runner.threads_per_worker), name=PLUGIN_NAME)
        updates = {PREFECT_API_URL: env["PREFECT_API_URL"]} if "PREFECT_API_URL" in env else {}
        token = _POOL.set(pool)
        try:
            with temporary_settings(updates=updates):
                yield pool
        finally:
            _POOL.reset(token)
    finally:
        if pool is not None:
            pool.close()
        elif cluster is not None:
            cluster.close()


def _restore_environ(saved: dict[str, str]) -> None:
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


def release_workers() -> None:
    """Close the flow run's ``LocalCluster`` now (before speed is timed); the rest of the flow runs locally.
    No-op under ``runner.kind=local``; an existing cluster is only disconnected from."""
    pool = _POOL.get()
    if pool is not None:
        pool.close()


@contextmanager
def dask_tasks() -> Iterator[DaskTaskRunner | None]:
    """A started ``DaskTaskRunner`` on the flow run's cluster for the block; None when there is none
    (``runner.kind=local``, or after :func:`release_workers`): then run tasks as plain calls."""
    pool = _POOL.get()
    if pool is None or pool.closed:
        yield None
        return
    from prefect_dask import DaskTaskRunner

    with DaskTaskRunner(address=pool.address) as task_runner:
        yield task_runner


def submit(
    task_runner: DaskTaskRunner, task: Task[..., Any], *args: Any, **kwargs: Any
) -> PrefectFuture[Any]:
    """``task.submit(*args, **kwargs)`` on ``task_runner`` (what ``Task.submit`` does with the flow's own)."""
    from prefect.utilities.callables import get_call_parameters

    return task_runner.submit(task, get_call_parameters(task.fn, args, kwargs))


Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def run_tasks(calls: Sequence[Call]) -> list[Any]:
    """Results of ``task(*args, **kwargs)`` for each call, in order: one after the other in this process, or
    all submitted at once to the flow run's Dask cluster. The first failure raises, as a plain call would."""
    with dask_tasks() as task_runner:
        if task_runner is None:
            return [task(*args, **kwargs) for task, args, kwargs in calls]
        futures = [submit(task_runner, task, *args, **kwargs) for task, args, kwargs in calls]
        return [future.result() for future in futures]
