"""The stack as users run it, against real servers: a Prefect server, an MLflow tracking server and a process
worker (``deployments/stack.py``), the deployments applied by ``deployments/deploy.py``, once on SQLite and
once on PostgreSQL. Runs are triggered through Prefect's REST API, as the UI's "Run" button does, and checked
through the MLflow server's API. Everything started is stopped afterwards, also when a test fails."""

from __future__ import annotations

import json
import time
import urllib.error
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from deployments.deploy import UNRESPONSIVE_AUTOMATION
from deployments.stack import REPO, Stack, StackState, api
from tests.deployments.postgres import local_postgres, why_unavailable

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
UNRESPONSIVE_AFTER_S = 60  # the shortest window deploy accepts, to keep the zombie test short
SMOKE_EXPERIMENT = "embedding-distillation-smoke"


def _far_from_now_cron() -> str:
    """Daily, 12 hours from now (UTC): the nightly deployment gets scheduled runs that never come due here."""
    return f"0 {(datetime.now(UTC).hour + 12) % 24} * * *"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def running(request, tmp_path_factory, data_dir) -> Stack:
    home = tmp_path_factory.mktemp(f"stack-{request.param}")
    worker_env = {
        "DISTILL_DATA_DIR": str(data_dir),
        "DISTILL_WORK_DIR": str(home / "work"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # Prefect's minimum: half the window below
    }
    deploy_env = {
        "DISTILL_UNRESPONSIVE_AFTER_S": str(UNRESPONSIVE_AFTER_S),
        "DISTILL_NIGHTLY_CRON": _far_from_now_cron(),
        "DISTILL_CACHE_CRON": _far_from_now_cron(),
        "DISTILL_NIGHTLY_TIMEZONE": "UTC",
    }
    if request.param == "postgresql":
        reason = why_unavailable()
        if reason:
            pytest.skip(f"PostgreSQL end-to-end test skipped: {reason}")
        with local_postgres(("prefect", "mlflow")) as pg:
            databases = {"prefect_db": pg.url("prefect", "asyncpg"), "mlflow_db": pg.url("mlflow")}
            yield from _started(home, worker_env, deploy_env, **databases)
    else:
        yield from _started(home, worker_env, deploy_env)


def _started(home: Path, worker_env: dict, deploy_env: dict, **databases: str):
    stack = Stack(
        home,
        prefect_port=None,
        mlflow_port=None,
        worker_env=worker_env,
        deploy_env=deploy_env,
        linked=True,
        **databases,
    )
    started = time.perf_counter()
    with stack:
        print(f"\nstack on {databases or 'sqlite'} ready in {time.perf_counter() - started:.1f} s")
        yield stack


@pytest.fixture()
def stack(running: Stack) -> StackState:
    assert running.state is not None
    return running.state


def _deployment_id(state: StackState, name: str, flow: str = "distill-embeddings") -> str:
    return api(state.prefect_api_url, f"/deployments/name/{flow}/{name}")["id"]


def _trigger(
    state: StackState, parameters: dict, flow: str = "distill-embeddings", name: str = "on-demand"
) -> str:
    """What the UI's Run button does: a flow run of the deployment, scheduled for now."""
    deployment_id = _deployment_id(state, name, flow)
    body = {"parameters": parameters, "state": {"type": "SCHEDULED"}}
    return api(state.prefect_api_url, f"/deployments/{deployment_id}/create_flow_run", body)["id"]


def _wait(state: StackState, flow_run_id: str, timeout: float) -> tuple[dict, dict[str, float]]:
    """The flow run once terminal, and when (seconds after the call) it was first seen in each state."""
    started, seen = time.perf_counter(), {}
    while time.perf_counter() - started < timeout:
        run = api(state.prefect_api_url, f"/flow_runs/{flow_run_id}")
        seen.setdefault(run["state_type"], time.perf_counter() - started)
        if run["state_type"] in TERMINAL:
            return run, seen
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout} s (states seen: {seen})")


def _mlflow_runs(state: StackState, flow_run_id: str) -> list:
    client = MlflowClient(state.mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def test_on_demand_smoke_run_lands_in_mlflow(stack: StackState, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.perf_counter()
    # a lenient rule, so that the smoke run always registers a champion for the benchmark test below
    parameters = {"profile": "smoke", "corpus_wiki_sentences": 250}
    flow_run_id = _trigger(
        stack, {**parameters, "overrides": {"selection": {"min_retention_pct": 50, "min_agreement": None}}}
    )
    run, seen = _wait(stack, flow_run_id, timeout=900)
    print(
        f"\nsmoke run: trigger -> Running {seen.get('RUNNING', float('nan')):.1f} s, "
        f"trigger -> {run['state_type']} {time.perf_counter() - started:.1f} s"
    )
    assert run["state_type"] == "COMPLETED", run["state"]

    parents = _mlflow_runs(stack, flow_run_id)
    assert len(parents) == 1, "one MLflow parent run tagged with the Prefect flow-run id"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["profile"] == "smoke"
    assert parent.data.params["data.corpus_wiki_sentences"] == "250"  # the overridden field took effect
    assert parent.data.metrics["corpus_sentences"] == 250
    assert parent.data.tags["prefect.deployment"] == "on-demand"

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == SMOKE_EXPERIMENT
    # model training (MLflow 3.17's UI also needs ?workflowType=machine_learning once per browser)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "tradeoff_table.json")).read_text())
    variants = [row[table["columns"].index("variant")] for row in table["data"]]
    assert variants[0] == "teacher" and len(variants) >= 5
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["variant"] for c in children) == sorted(variants)
    kinds = {c.data.params["variant_kind"] for c in children}
    assert {"teacher", "layer-reduced", "pca", "quantized", "embedding-quantized"} <= kinds
    # every variant's model is served by the MLflow server and loads back (a pyfunc one here)
    int8 = next(c for c in children if c.data.params["variant_kind"] == "embedding-quantized")
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)  # restored by monkeypatch
    mlflow.set_tracking_uri(stack.mlflow_url)
    try:
        vectors = mlflow.pyfunc.load_model(f"runs:/{int8.info.run_id}/model").predict(["a sentence", "b"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert vectors.shape[0] == 2 and str(vectors.dtype) in {"int8", "uint8"}
    # the champion rule always ends in a stated outcome (a smoke student may well keep < 98% on dev)
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["distill.champion"] and "Champion rule:" in tags["distill.selection"]
    assert tags["distill.champion_version"] == "1"
    # the stages are nested flow runs of their own, each with its state
    stages = api(
        stack.prefect_api_url,
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
    )
    flows = {f["id"]: f["name"] for f in api(stack.prefect_api_url, "/flows/filter", {})}
    assert sorted(flows[r["flow_id"]] for r in stages) == [
        "compress-variants",
        "measure-variants",
        "teacher-embeddings",
        "train-students",
    ]
    assert {r["state_type"] for r in stages} == {"COMPLETED"}


def test_benchmark_the_champion_from_the_ui(stack: StackState) -> None:
    """The "benchmark champion on this machine" button: the deployment's default models, on the serving
    pool's worker; quality columns equal the smoke run's row of that variant."""
    deployment = api(stack.prefect_api_url, "/deployments/name/benchmark-models/on-demand")
    assert deployment["work_pool_name"] == "serving-cpu" and deployment["parameters"] == {
        "models": ["champion"]
    }
    # the smoke run's data settings (its corpus decides which held-out sentences are clean)
    parameters = {"profile": "smoke", "overrides": {"data": {"corpus_wiki_sentences": 250}}}
    flow_run_id = _trigger(stack, parameters, flow="benchmark-models")
    run, _ = _wait(stack, flow_run_id, timeout=600)
    assert run["state_type"] == "COMPLETED", run["state"]
    (parent,) = _mlflow_runs(stack, flow_run_id)
    tags = parent.data.tags
    assert tags["distill.job"] == "benchmark" and tags["prefect.deployment"] == "on-demand"
    assert tags["machine.cpu"] and tags["machine.cpu_flags"] and tags["machine.threads"]
    client = MlflowClient(stack.mlflow_url)

    def table(run_id: str) -> dict[str, dict]:
        raw = json.loads(Path(client.download_artifacts(run_id, "tradeoff_table.json")).read_text())
        return {row[0]: dict(zip(raw["columns"], row, strict=True)) for row in raw["data"]}

    benchmarked, source = table(parent.info.run_id), table(tags["distill.source_runs"])
    champion = client.get_model_version_by_alias(f"{SMOKE_EXPERIMENT}-student", "champion").tags["variant"]
    assert list(benchmarked) == ["teacher", champion]
    for column in ("sts_dev_spearman", "sts_test_spearman", "heldout_agreement_spearman", "bytes_per_vector"):
        assert benchmarked[champion][column] == source[champion][column], column
    assert benchmarked[champion]["model_ref"] == "champion"
    assert benchmarked[champion]["same_data_as_source"] == "yes"


def test_warm_the_cache_from_the_ui(stack: StackState) -> None:
    """The smoke run above encoded this corpus: the warm-up finds the very entries it wrote."""
    deployment = api(stack.prefect_api_url, "/deployments/name/warm-teacher-cache/before-nightly")
    assert deployment["work_pool_name"] == "distill-cpu" and deployment["schedules"]
    parameters = {"profile": "smoke", "corpus_wiki_sentences": 250}
    flow_run_id = _trigger(stack, parameters, flow="warm-teacher-cache", name="before-nightly")
    run, _ = _wait(stack, flow_run_id, timeout=300)
    assert run["state_type"] == "COMPLETED", run["state"]
    (parent,) = _mlflow_runs(stack, flow_run_id)
    assert parent.data.tags["distill.job"] == "warm-cache"
    assert parent.data.metrics["teacher_sentences_encoded"] == 0
    assert parent.data.metrics["corpus_sentences"] == 250


def test_a_pool_runs_one_flow_run_at_a_time(stack: StackState) -> None:
    """Runs share the machine's cores (and a benchmark's timings need them alone): two runs triggered at once
    run one after the other, the second waiting in the queue."""
    for pool in ("distill-cpu", "serving-cpu"):
        assert api(stack.prefect_api_url, f"/work_pools/{pool}")["concurrency_limit"] == 1, pool
    parameters = {"profile": "smoke", "corpus_wiki_sentences": 250}
    flow_run_ids = [
        _trigger(stack, parameters, flow="warm-teacher-cache", name="before-nightly") for _ in range(2)
    ]
    runs = [_wait(stack, flow_run_id, timeout=300)[0] for flow_run_id in flow_run_ids]
    assert [run["state_type"] for run in runs] == ["COMPLETED", "COMPLETED"], [run["state"] for run in runs]
    first, second = sorted(
        (datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in runs
    )
    assert second[0] >= first[1], f"the runs overlapped: {first} and {second}"


def test_a_run_whose_heartbeats_stop_is_crashed_and_frees_its_pool(stack: StackState) -> None:
    """A run left Running by a process that died unseen (machine or container gone: here a run created
    Running with nothing behind it, after one heartbeat) holds the pool's only slot until deploy's
    automation marks it Crashed; the run queued behind it then starts."""
    (automation,) = api(stack.prefect_api_url, "/automations/filter", {})
    assert automation["name"] == UNRESPONSIVE_AUTOMATION and automation["enabled"]
    deployment_id = _deployment_id(stack, "before-nightly", "warm-teacher-cache")
    body = {"parameters": {"profile": "smoke"}, "state": {"type": "RUNNING"}}
    zombie = api(stack.prefect_api_url, f"/deployments/{deployment_id}/create_flow_run", body)["id"]
    heartbeat = {
        "id": str(uuid.uuid4()),
        "occurred": datetime.now(UTC).isoformat(),
        "event": "prefect.flow-run.heartbeat",
        "resource": {"prefect.resource.id": f"prefect.flow-run.{zombie}"},
    }
    api(stack.prefect_api_url, "/events", [heartbeat])
    parameters = {"profile": "smoke", "corpus_wiki_sentences": 250}
    queued = _trigger(stack, parameters, flow="warm-teacher-cache", name="before-nightly")
    crashed, seen = _wait(stack, zombie, timeout=UNRESPONSIVE_AFTER_S + 120)
    assert crashed["state_type"] == "CRASHED" and "no heartbeat" in crashed["state"]["message"]
    assert seen["CRASHED"] >= UNRESPONSIVE_AFTER_S - 10, seen  # not before the window
    run, _ = _wait(stack, queued, timeout=300)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert datetime.fromisoformat(run["start_time"]) >= datetime.fromisoformat(crashed["end_time"])


def test_nightly_has_runs_created_by_the_scheduler(running: Stack, stack: StackState) -> None:
    deployment_id = _deployment_id(stack, "nightly")
    deployment = api(stack.prefect_api_url, f"/deployments/{deployment_id}")
    assert deployment["parameters"] == {"profile": "standard"}
    # the cron the fixture deployed (recomputing it here would differ across an hour boundary)
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [
        running.deploy_env["DISTILL_NIGHTLY_CRON"]
    ]
    deadline = time.monotonic() + 120
    while True:
        body = {
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        }
        runs = api(stack.prefect_api_url, "/flow_runs/filter", body)
        if runs or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert runs, "the scheduler created no run for the nightly deployment"
    assert all(r["auto_scheduled"] for r in runs)
    assert all(datetime.fromisoformat(r["expected_start_time"]).minute == 0 for r in runs)


def test_the_run_form_opens_on_the_profile_with_every_other_field_empty(stack: StackState) -> None:
    deployment = api(stack.prefect_api_url, "/deployments/name/distill-embeddings/on-demand")
    fields = deployment["parameter_openapi_schema"]["properties"]
    assert fields["profile"]["default"] == "quick" and fields["profile"]["enum"] == [
        "smoke",
        "quick",
        "standard",
        "full",
    ]
    empty = {name: field for name, field in fields.items() if name != "profile"}
    assert all("default" not in f and "anyOf" not in f and f.get("description") for f in empty.values())


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"profile": "huge"}, "'huge' is not one of ['smoke', 'quick', 'standard', 'full']"),
        ({"profile": "smoke", "corpus_wiki_sentences": -1}, "-1 is less than the minimum of 0"),
    ],
)
def test_parameters_outside_the_form_are_refused_by_the_server(
    stack: StackState, parameters: dict, message: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        _trigger(stack, parameters)
    assert info.value.code == 409
    assert message in info.value.read().decode()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"profile": "smoke", "students": [{"num_layers": 9}]}, "exceeds the teacher's 6 layers"),
        (
            {"profile": "smoke", "students": [{"num_layers": 2, "layers": [0, 1]}]},
            "students.0: a student sets exactly one of num_layers or layers",
        ),
    ],
)
def test_bad_parameters_fail_before_any_work_and_leave_no_mlflow_run(
    stack: StackState, parameters: dict, message: str
) -> None:
    flow_run_id = _trigger(stack, parameters)
    run, seen = _wait(stack, flow_run_id, timeout=300)
    assert run["state_type"] == "FAILED"
    assert message in run["state"]["message"]
    print(f"\nbad parameters: Running -> Failed in {seen['FAILED'] - seen.get('RUNNING', 0):.1f} s")
    assert _mlflow_runs(stack, flow_run_id) == []
    task_runs = api(
        stack.prefect_api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    )
    assert {t["name"].rsplit("-", 1)[0] for t in task_runs} <= {"check-inputs"}  # nothing after the checks


def test_stop_leaves_no_process_behind(running: Stack) -> None:
    assert running.state is not None
    processes = [psutil.Process(s.pid) for s in running.state.services]
    family = processes + [c for p in processes for c in p.children(recursive=True)]
    assert running.stop() == ["serving-worker", "worker", "mlflow", "prefect"]
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == [], f"still running after stop: {[p.pid for p in alive]}"
    assert not (running.home / "stack.json").exists()


# --- without servers ------------------------------------------------------------------------------------


def test_stop_escalates_and_takes_the_children(tmp_path: Path) -> None:
    """A worker that ignores SIGINT and has a child in a session of its own (as Prefect's flow runs are):
    stop still ends both, by pid, and forgets the state."""
    import subprocess
    import sys

    from deployments.stack import Service

    script = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "time.sleep(600)"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not psutil.Process(worker.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = psutil.Process(worker.pid).children()
    state = StackState(str(tmp_path), "http://127.0.0.1:1", "http://127.0.0.1:2", "pool")
    state.services.append(Service("worker", worker.pid, psutil.Process(worker.pid).create_time(), "log"))
    state.save()
    assert Stack(tmp_path).stop(timeout=1) == ["worker"]
    worker.wait(timeout=10)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert StackState.load(tmp_path) is None


def test_a_reused_pid_is_not_stopped(tmp_path: Path) -> None:
    import os

    from deployments.stack import Service

    state = StackState(str(tmp_path), "http://127.0.0.1:1", "http://127.0.0.1:2", "pool")
    state.services.append(Service("worker", os.getpid(), 0.0, "log"))  # our pid, another start time
    state.save()
    assert Stack(tmp_path).stop() == []  # this test process is still here


def test_a_taken_port_is_replaced_by_a_free_one() -> None:
    import socket

    from deployments.stack import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port(port) != port
    assert free_port(port) == port


def test_api_retries_a_busy_server_but_not_a_refusal(monkeypatch) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setattr(time, "sleep", lambda _: None)
    answers = {"/busy": [503, 503, 200], "/refused": [409, 200]}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            code = answers[self.path].pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"ok": true}' if code == 200 else b'{"detail": "no"}')

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert api(base, "/busy") == {"ok": True} and answers["/busy"] == []
        with pytest.raises(urllib.error.HTTPError) as info:
            api(base, "/refused")
        assert info.value.code == 409 and answers["/refused"] == [200]  # asked once, not retried
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("linked", [True, False], ids=["linked", "left-running"])
def test_a_linked_stack_dies_with_the_process_that_started_it(tmp_path: Path, linked: bool) -> None:
    """A stack scoped to a test (``linked=True``) is not left behind when its process is killed before it can
    stop it (SIGKILL: no teardown runs); ``make stack``'s processes outlive the command that started them."""
    import subprocess
    import sys

    script = (
        "import os, sys, time; from pathlib import Path; from deployments.stack import Stack, StackState; "
        f"stack = Stack(Path(sys.argv[1]), linked={linked}); "
        "stack.state = StackState(sys.argv[1], 'http://127.0.0.1:1', 'http://127.0.0.1:2', 'pool'); "
        "(Path(sys.argv[1]) / 'logs').mkdir(); "
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']; "
        "server = stack._spawn('prefect', sleeper, dict(os.environ)); "
        "print(server.pid, flush=True); time.sleep(600)"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        server = psutil.Process(int(starter.stdout.readline()))
    finally:
        starter.kill()
        starter.wait(timeout=10)
    try:
        gone, _ = psutil.wait_procs([server], timeout=10)
        assert bool(gone) == linked
    finally:
        with suppress(psutil.NoSuchProcess):
            server.kill()
