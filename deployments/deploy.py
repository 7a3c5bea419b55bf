"""Apply the deployments to the Prefect server that ``PREFECT_API_URL`` names.

    python -m deployments.deploy            # or: make deploy

- ``distill-embeddings/nightly``: the ``standard`` profile (the exhaustive sweep) on a cron schedule
  (02:00 UTC unless ``DISTILL_NIGHTLY_CRON`` / ``DISTILL_NIGHTLY_TIMEZONE`` say otherwise);
- ``distill-embeddings/on-demand``: no schedule, for runs triggered from the Prefect UI, the CLI or the API;
- ``warm-teacher-cache/before-nightly``: encodes the nightly profile's corpus with the teacher an hour
  before the nightly run (``DISTILL_CACHE_CRON``, same time zone), so the nightly run encodes nothing; Run
  it from the UI for any profile;
- ``benchmark-models/on-demand``: "benchmark the champion on this machine": the champion (or any model
  references) beside the teacher, timed on the worker that picks it up.

The distillation and cache deployments run on the ``process`` work pool ``distill-cpu``
(``DISTILL_WORK_POOL``; ``DISTILL_CACHE_WORK_POOL`` moves the cache warm-up to e.g. a GPU box's pool); the
benchmark on ``serving-cpu`` (``DISTILL_BENCHMARK_WORK_POOL``): one pool per kind of hardware, and a worker
on each machine that serves (``prefect worker start --pool serving-cpu``), so a run of it is timed there.
Pools are created if missing, running one flow run at a time (``DISTILL_POOL_CONCURRENCY_LIMIT``); workers
start each flow run in the project folder. A flow run inherits its worker's environment:
``MLFLOW_TRACKING_URI``, ``DISTILL_DATA_DIR`` and ``DISTILL_WORK_DIR`` belong there (``make stack`` and
docker-compose set them). Re-running this updates the deployments in place.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.config import ProfileName

REPO = Path(__file__).resolve().parents[1]
FLOW_NAME = "distill-embeddings"
ENTRYPOINT = "flows/distill.py:distill"
CACHE_ENTRYPOINT = "flows/teacher_cache.py:warm_teacher_cache"
BENCHMARK_ENTRYPOINT = "flows/benchmark.py:benchmark_models"
UNRESPONSIVE_AUTOMATION = "distill: crash unresponsive flow runs"
HEARTBEAT_SECONDS = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the workers make stack and docker-compose start
log = logging.getLogger(__name__)


class DeploymentSettings(BaseSettings):
    """Where and when the deployments run; each field is read from ``DISTILL_<FIELD>`` when set."""

    model_config = SettingsConfigDict(env_prefix="DISTILL_", frozen=True, extra="ignore")

    work_pool: str = Field(default="distill-cpu", description="Process work pool the runs go to.")
    cache_work_pool: str | None = Field(
        default=None, description="Work pool of the cache warm-up; empty: work_pool."
    )
    benchmark_work_pool: str = Field(
        default="serving-cpu", description="Work pool of the benchmark: the machines models serve on."
    )
    nightly_cron: str = Field(default="0 2 * * *", description="When the nightly run starts (cron).")
    cache_cron: str = Field(default="0 1 * * *", description="When the cache warm-up starts (cron).")
    nightly_timezone: str = Field(default="UTC", description="IANA time zone of nightly_cron.")
    nightly_profile: ProfileName = Field(default="standard", description="Profile of the nightly run.")
    pool_concurrency_limit: int = Field(
        default=1,
        ge=1,
        description="Flow runs a work pool created here runs at once; later runs wait in the queue. Each run "
        "uses every core (two trainings at once on 2 cores ran ~10x slower each) and a benchmark's timings "
        "need the machine to themselves. Raise it for pools whose workers have cores to spare.",
    )
    unresponsive_after_s: int = Field(
        default=300,
        ge=60,
        description="A flow run whose heartbeats stop for this long (its machine or container died and no "
        "worker saw it end) is marked Crashed, so it stops holding its pool's slot. Workers send a heartbeat "
        f"every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds ({HEARTBEAT_SECONDS} in `make stack` and "
        "docker-compose): keep this a few times that.",
    )
    project_dir: Path = Field(default=REPO, description="Project folder the worker runs flows in.")

    @field_validator("nightly_timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{zone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return zone

    @field_validator("nightly_cron", "cache_cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValidationError:
            raise ValueError(f"{cron!r} is not a cron expression (e.g. '0 2 * * *' = 02:00 daily)") from None
        return cron


def ensure_work_pool(name: str, concurrency_limit: int) -> None:
    """Create the ``process`` work pool unless it exists, running at most ``concurrency_limit`` flow runs at
    once. An existing pool is left as it is; one without a limit gets a warning naming the fix."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=template,
                    concurrency_limit=concurrency_limit,
                )
            )
            log.info("created process work pool %s (at most %d flow runs at once)", name, concurrency_limit)
            return
        if pool.type != "process":
            raise ValueError(
                f"work pool {name!r} exists with type {pool.type!r}; these deployments need a process pool: "
                f"set DISTILL_WORK_POOL to another name"
            )
        if pool.concurrency_limit is None:
            log.warning(
                "work pool %s has no concurrency limit: its flow runs run at once and share the cores "
                "(`prefect work-pool set-concurrency-limit %s %d` queues them instead)",
                name,
                name,
                concurrency_limit,
            )


def as_form(schema: dict[str, Any]) -> dict[str, Any]:
    """The parameter schema as the Prefect UI should render it: an optional field (``X | None = None``,
    "empty: the profile's value") becomes a plain input that starts empty, instead of a type toggle that
    opens on "None". The UI leaves empty fields out of the run's parameters, so the flow gets ``None``,
    and the server still accepts no value for a field that is neither required nor defaulted."""
    for prop in schema.get("properties", {}).values():
        choices = prop.get("anyOf", [])
        optional = "default" in prop and prop["default"] is None
        if optional and len(choices) == 2 and {"type": "null"} in choices:
            (value_schema,) = [c for c in choices if c != {"type": "null"}]
            del prop["anyOf"], prop["default"]
            prop.update(value_schema)
    return schema


def ensure_unresponsive_run_automation(after_s: int) -> str:
    """Create or update (by name) Prefect's zombie-flow automation: a flow run that sent a heartbeat and then
    neither another one nor a final state within ``after_s`` is marked Crashed. Returns its id."""
    from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.events import ResourceSpecification

    final = ("Completed", "Failed", "Cancelled", "Crashed")
    automation = AutomationCore(
        name=UNRESPONSIVE_AUTOMATION,
        description=f"Flow runs whose heartbeats stop for {after_s} s are marked Crashed, freeing their work "
        "pool's slot (DISTILL_UNRESPONSIVE_AFTER_S; heartbeats: PREFECT_FLOWS_HEARTBEAT_FREQUENCY).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in final)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s} s: the process running it is gone",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(UNRESPONSIVE_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, automation)
            return str(existing[0].id)
        return str(client.create_automation(automation))


def apply(settings: DeploymentSettings) -> list[str]:
    """Create or update every deployment; returns their ids."""
    from prefect import deploy
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow
    from prefect.runner.storage import LocalStorage

    def source(entrypoint: str) -> Flow:
        return Flow.from_source(LocalStorage(str(settings.project_dir)), entrypoint)

    flow = source(ENTRYPOINT)
    nightly = flow.to_deployment(
        name="nightly",
        schedules=[CronSchedule(cron=settings.nightly_cron, timezone=settings.nightly_timezone)],
        parameters={"profile": settings.nightly_profile},
        description=f"The {settings.nightly_profile} profile, {settings.nightly_cron} "
        f"({settings.nightly_timezone}); results in the MLflow experiment of that profile.",
        tags=["distillation", "scheduled"],
    )
    on_demand = flow.to_deployment(
        name="on-demand",
        description="Pick a profile (smoke checks a stack in ~2 min) and override any field, then Run.",
        tags=["distillation", "manual"],
    )
    warm_cache = source(CACHE_ENTRYPOINT).to_deployment(
        name="before-nightly",
        schedules=[CronSchedule(cron=settings.cache_cron, timezone=settings.nightly_timezone)],
        parameters={"profile": settings.nightly_profile},
        description=f"Encode the {settings.nightly_profile} profile's corpus with its teacher at "
        f"{settings.cache_cron} ({settings.nightly_timezone}), before the nightly run, which then encodes "
        "nothing. Run it for any profile from here.",
        tags=["distillation", "scheduled", "teacher-cache"],
    )
    benchmark = source(BENCHMARK_ENTRYPOINT).to_deployment(
        name="on-demand",
        parameters={"models": ["champion"]},
        description="Benchmark the champion (or any model references) beside the teacher on the machine "
        f"whose worker serves the {settings.benchmark_work_pool} pool; results in MLflow "
        "(tags.distill.job = 'benchmark').",
        tags=["benchmark", "manual"],
    )
    cache_pool = settings.cache_work_pool or settings.work_pool
    by_pool: dict[str, list[Any]] = {}
    for pool, deployment in (
        (settings.work_pool, nightly),
        (settings.work_pool, on_demand),
        (cache_pool, warm_cache),
        (settings.benchmark_work_pool, benchmark),
    ):
        form = as_form(deployment._parameter_openapi_schema.model_dump())  # no public setter in Prefect 3.8
        deployment._parameter_openapi_schema = type(deployment._parameter_openapi_schema)(**form)
        by_pool.setdefault(pool, []).append(deployment)
    ids = []
    for pool, batch in by_pool.items():
        ensure_work_pool(pool, settings.pool_concurrency_limit)
        ids += deploy(
            *batch,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        )
    ensure_unresponsive_run_automation(settings.unresponsive_after_s)
    return [str(i) for i in ids]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "deploy: PREFECT_API_URL is not set: point it at your Prefect server "
            "(e.g. http://127.0.0.1:4200/api, which `make stack` prints)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = DeploymentSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"DISTILL_{str(e['loc'][0]).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        print(f"deploy: {problems}", file=sys.stderr)
        return 2
    try:
        ids = apply(settings)
    except ValueError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 2
    print(
        f"applied {FLOW_NAME}/nightly ({settings.nightly_cron}, {settings.nightly_timezone}) and "
        f"{FLOW_NAME}/on-demand on work pool {settings.work_pool}, warm-teacher-cache/before-nightly "
        f"({settings.cache_cron}) on {settings.cache_work_pool or settings.work_pool}, and "
        f"benchmark-models/on-demand on {settings.benchmark_work_pool}, at {os.environ['PREFECT_API_URL']} "
        f"(ids {', '.join(ids)}); flow runs silent for {settings.unresponsive_after_s} s are marked Crashed "
        f"(automation {UNRESPONSIVE_AUTOMATION!r})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
