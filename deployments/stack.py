"""The local stack without Docker: a Prefect server, an MLflow tracking server and two process workers.

    python -m deployments.stack start     # or: make stack
    python -m deployments.stack status
    python -m deployments.stack stop      # or: make stack-stop

``start`` runs each server on 127.0.0.1 (Prefect on 4200 and MLflow on 5000 when free, else a free port),
applies the deployments (``deployments/deploy.py``), starts a worker on the distillation pool and one on the
benchmark pool (here both on this machine; in production the second runs where models serve) and prints
the two UI URLs. Everything lives in one folder (``.distill/stack`` by default: Prefect's database, MLflow's
SQLite store and artifacts, logs, and ``stack.json`` with the pid of every process started). ``stop`` stops
exactly those processes by pid (the workers first, with SIGINT, as Prefect workers ignore SIGTERM) with the
processes they started. Flow runs the worker executes log to this MLflow server. Pass ``--prefect-db`` /
``--mlflow-db`` to use PostgreSQL instead of SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from deployments.deploy import HEARTBEAT_SECONDS
from flows.lifecycle import linked_child_options

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".distill" / "stack"
BIN = Path(sys.executable).parent
STATE_FILE = "stack.json"
RETRIES = 5  # of an API call answered 502/503/504
# Children of the servers and flow runs of the worker (Prefect starts each in a session of its own).
STOP_ORDER = ("serving-worker", "worker", "mlflow", "prefect")


class StackError(RuntimeError):
    """The stack could not start or stop; the message says which part and where its log is."""


@dataclass
class Service:
    name: str
    pid: int
    started: float  # psutil create_time: guards against a reused pid
    log: str


@dataclass
class StackState:
    home: str
    prefect_url: str
    mlflow_url: str
    work_pool: str
    services: list[Service] = field(default_factory=list)
    benchmark_pool: str = "serving-cpu"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def save(self) -> None:
        path = Path(self.home) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, home: Path) -> StackState | None:
        path = Path(home) / STATE_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(**{**raw, "services": [Service(**s) for s in raw["services"]]})


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens on it, else a free port chosen by the OS."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise StackError("no free port on 127.0.0.1")


def _alive(service: Service) -> psutil.Process | None:
    try:
        process = psutil.Process(service.pid)
        if abs(process.create_time() - service.started) > 1 or process.status() == psutil.STATUS_ZOMBIE:
            return None  # the pid now belongs to another process
        return process
    except psutil.NoSuchProcess:
        return None


def api(base_url: str, path: str, body: object | None = None, method: str | None = None) -> object:
    """One call of a JSON HTTP API (Prefect's or MLflow's REST API); raises ``urllib.error.HTTPError``.

    A 502/503/504 is retried with backoff, as Prefect's own client does: a Prefect server on SQLite answers
    503 while the database is locked by a busy flow run.
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(RETRIES + 1):
        request = urllib.request.Request(
            base_url + path, data=data, method=method or ("GET" if body is None else "POST"),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code not in (502, 503, 504) or attempt == RETRIES:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _wait_http(url: str, what: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{what} exited with code {process.returncode}; see {log}")
        with suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise StackError(f"{what} did not answer {url} within {timeout:.0f} s; see {log}")


class Stack:
    """Start and stop the three processes; a context manager that stops them also on failure."""

    def __init__(
        self,
        home: Path = DEFAULT_HOME,
        *,
        prefect_port: int | None = 4200,
        mlflow_port: int | None = 5000,
        prefect_db: str | None = None,
        mlflow_db: str | None = None,
        work_pool: str = "distill-cpu",
        benchmark_pool: str = "serving-cpu",
        worker_env: dict[str, str] | None = None,
        deploy_env: dict[str, str] | None = None,
        linked: bool = False,
    ) -> None:
        self.home = Path(home).resolve()
        self.prefect_port, self.mlflow_port = prefect_port, mlflow_port
        self.prefect_db, self.mlflow_db = prefect_db, mlflow_db
        self.work_pool, self.benchmark_pool = work_pool, benchmark_pool
        self.worker_env = worker_env or {}
        self.deploy_env = deploy_env or {}
        # linked: the processes also die with this one (on Linux), for a stack scoped to a test or a block
        # that could be killed before it stops them; `make stack` leaves them running on purpose
        self.linked = linked
        self.state: StackState | None = None

    # --- starting --------------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> StackState:
        previous = StackState.load(self.home)
        if previous and any(_alive(s) for s in previous.services):
            raise StackError(
                f"a stack from {self.home} is running (Prefect {previous.prefect_url}): "
                f"stop it first with `make stack-stop`"
            )
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        prefect_port = free_port(self.prefect_port)
        mlflow_port = free_port(self.mlflow_port)
        self.state = StackState(
            str(self.home),
            f"http://127.0.0.1:{prefect_port}",
            f"http://127.0.0.1:{mlflow_port}",
            self.work_pool,
            benchmark_pool=self.benchmark_pool,
        )
        try:
            server = ["server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
            prefect = self._spawn("prefect", [str(BIN / "prefect"), *server], self._prefect_server_env())
            mlflow = self._spawn("mlflow", self._mlflow_command(mlflow_port), self._mlflow_env())
            health = f"{self.state.prefect_api_url}/health"
            _wait_http(health, "the Prefect server", prefect, self._log("prefect"), timeout)
            _wait_http(
                f"{self.state.mlflow_url}/health", "the MLflow server", mlflow, self._log("mlflow"), timeout
            )
            self._deploy()
            workers = {}
            for name, pool in (("worker", self.work_pool), ("serving-worker", self.benchmark_pool)):
                command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
                workers[name] = (self._spawn(name, command, self._worker_env()), pool)
            for name, (worker, pool) in workers.items():
                self._wait_worker_online(name, worker, pool, timeout)
        except BaseException:
            self.stop()
            raise
        return self.state

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        assert self.state is not None
        log = self._log(name)
        with open(log, "ab") as out:
            options = linked_child_options() if self.linked else {"start_new_session": True}
            process = subprocess.Popen(
                command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, **options
            )
        started = psutil.Process(process.pid).create_time()
        self.state.services.append(Service(name, process.pid, started, str(log)))
        self.state.save()  # saved after each start: a crash half-way still leaves every pid to stop
        return process

    def _log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        return env

    def _prefect_server_env(self) -> dict[str, str]:
        assert self.state is not None
        env = self._base_env()
        env["PREFECT_HOME"] = str(self.home / "prefect")
        env["PREFECT_UI_API_URL"] = self.state.prefect_api_url  # else the UI calls 127.0.0.1:4200
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
            self.prefect_db or f"sqlite+aiosqlite:///{self.home / 'prefect' / 'prefect.db'}"
        )
        return env

    def _mlflow_command(self, port: int) -> list[str]:
        backend = self.mlflow_db or f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"
        (self.home / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        return [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", backend,
            "--artifacts-destination", str(self.home / "mlflow" / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip

    def _mlflow_env(self) -> dict[str, str]:
        return {**self._base_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def _client_env(self) -> dict[str, str]:
        assert self.state is not None
        return {
            **self._base_env(),
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_API_URL": self.state.prefect_api_url,
            "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
        }

    def _worker_env(self) -> dict[str, str]:
        assert self.state is not None
        return {
            **self._client_env(),
            "MLFLOW_TRACKING_URI": self.state.mlflow_url,
            "PREFECT_WORKER_QUERY_SECONDS": "5",
            # flow runs send heartbeats: one that stops (its process is gone) is marked Crashed by deploy's
            # automation instead of holding its pool's slot forever
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
            "TOKENIZERS_PARALLELISM": "false",
            **self.worker_env,
        }

    def _deploy(self) -> None:
        env = {
            **self._client_env(),
            "DISTILL_WORK_POOL": self.work_pool,
            "DISTILL_BENCHMARK_WORK_POOL": self.benchmark_pool,
            **self.deploy_env,
        }
        result = subprocess.run(
            [sys.executable, "-m", "deployments.deploy"], env=env, cwd=REPO, capture_output=True, text=True
        )
        self._log("deploy").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise StackError(f"applying the deployments failed: {result.stderr.strip()[-2000:]}")

    def _wait_worker_online(self, name: str, worker: subprocess.Popen, pool: str, timeout: float) -> None:
        assert self.state is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise StackError(f"the {name} exited with code {worker.returncode}; see {self._log(name)}")
            workers = api(self.state.prefect_api_url, f"/work_pools/{pool}/workers/filter", {})
            if any(w["status"] == "ONLINE" for w in workers):
                return
            time.sleep(1)
        raise StackError(f"the {name} did not come online within {timeout:.0f} s; see {self._log(name)}")

    # --- stopping --------------------------------------------------------------------------------------

    def stop(self, timeout: float = 30) -> list[str]:
        """Stop every process this stack started (and their children); returns the names stopped."""
        state = self.state or StackState.load(self.home)
        if state is None:
            return []
        stopped = []
        by_name = {s.name: s for s in state.services}
        for name in STOP_ORDER:
            service = by_name.get(name)
            process = _alive(service) if service else None
            if process is None:
                continue
            _terminate_tree(process, signal.SIGINT if name == "worker" else signal.SIGTERM, timeout)
            stopped.append(name)
        (Path(state.home) / STATE_FILE).unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> StackState:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate_tree(process: psutil.Process, first_signal: signal.Signals, timeout: float) -> None:
    """``first_signal`` to the process, then SIGTERM and SIGKILL to it and its descendants as needed."""
    with suppress(psutil.NoSuchProcess):
        family = [process, *process.children(recursive=True)]
        process.send_signal(first_signal)
        psutil.wait_procs([process], timeout=timeout)
        family = [p for p in family if p.is_running()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in family:
                with suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, family = psutil.wait_procs(family, timeout=10)
            if not family:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="folder for databases, logs, pids")
    parser.add_argument("--prefect-port", type=int, default=4200, help="used when free (default 4200)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="used when free (default 5000)")
    parser.add_argument(
        "--prefect-db", help="Prefect database URL (postgresql+asyncpg://...); default SQLite"
    )
    parser.add_argument("--mlflow-db", help="MLflow backend store URI (postgresql://...); default SQLite")
    args = parser.parse_args(argv)
    stack = Stack(
        args.home,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        prefect_db=args.prefect_db,
        mlflow_db=args.mlflow_db,
    )
    if args.command == "stop":
        stopped = stack.stop()
        print(f"stopped {', '.join(stopped)}" if stopped else f"no stack running from {stack.home}")
        return 0
    if args.command == "status":
        state = StackState.load(stack.home)
        if state is None:
            print(f"no stack running from {stack.home}")
            return 1
        for service in state.services:
            status = "up" if _alive(service) else "DOWN"
            print(f"{service.name:8} pid {service.pid:7} {status:5} log {service.log}")
        print(f"Prefect UI {state.prefect_url}   MLflow UI {state.mlflow_url}")
        return 0
    started = time.perf_counter()
    try:
        state = stack.start()
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    print(
        f"stack ready in {time.perf_counter() - started:.0f} s (state, logs: {state.home})\n"
        f"  Prefect UI  {state.prefect_url}   (deployments: distill-embeddings/nightly, /on-demand, "
        f"warm-teacher-cache/before-nightly, benchmark-models/on-demand)\n"
        f"  MLflow UI   {state.mlflow_url}\n"
        f"Trigger a run:  PREFECT_API_URL={state.prefect_api_url} .venv/bin/prefect deployment run "
        f"'distill-embeddings/on-demand' -p profile=smoke\n"
        f"Benchmark the champion here:  PREFECT_API_URL={state.prefect_api_url} .venv/bin/prefect "
        f"deployment run 'benchmark-models/on-demand'\n"
        f"Stop it:        make stack-stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
