"""Honest run states: MLflow runs of a flow run that failed, crashed, was cancelled or was killed never stay
RUNNING.

* A failed, crashed or cancelled flow run ends its MLflow runs as FAILED / KILLED with the reason as the
  tag ``distill.failure_reason`` (:data:`FLOW_HOOKS`: Prefect flow hooks).
* The parent run carries this host and process (:func:`run_identity_tags`); the next run on the host closes
  runs whose process is gone (:func:`close_abandoned_runs`) and marks their Prefect flow run Crashed.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import mlflow
import psutil
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tasks.config import DistillConfig
from tasks.tracking_store import (
    PARENT_RUN_TAG,
    bound_mlflow_http_retries,
    short_error,
    sqlite_path,
    tracking_uri,
)

log = logging.getLogger(__name__)

FLOW_RUN_TAG = "prefect.flow_run_id"


FAILURE_REASON_TAG = "distill.failure_reason"


HOST_TAG = "distill.host"


PID_TAG = "distill.pid"


PID_STARTED_TAG = "distill.pid_started"


MAX_TAG_CHARS = 5000  # MLflow's limit on a tag value is 8000


_PID_START_TOLERANCE_S = 1.0  # Linux derives create_time from the boot time, which can wobble by 1 s


_FINISHED_STATUSES = ("FAILED", "KILLED")


_FLOW_FORM_FIELDS = (
    "teacher",
    "students",
    "corpus_wiki_sentences",
    "epochs",
    "compressions",
    "experiment",
    "tracking_uri",
)


def run_identity_tags() -> dict[str, str]:
    """This host and process, so that a later run can tell whether the run's process is gone."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_STARTED_TAG: repr(psutil.Process().create_time()),
    }


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _all_experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def _quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"{value!r}: a quote cannot be searched for")
    return f"'{value}'"


def _reason_tag(reason: str) -> str:
    reason = reason or "no reason given"
    return reason if len(reason) <= MAX_TAG_CHARS else reason[: MAX_TAG_CHARS - 3] + "..."


def end_open_runs(
    status: str,
    reason: str,
    parent_run_id: str | None,
    *,
    flow_run_id: str | None = None,
    experiment_ids: Iterable[str] | None = None,
    tracking_uri: str | None = None,
) -> list[str]:
    """End a flow run's MLflow parent run(s) and their RUNNING children as ``status`` (FAILED or KILLED).

    The parent is ``parent_run_id`` and/or every run tagged ``prefect.flow_run_id = flow_run_id`` (in
    ``experiment_ids``, else in every experiment of the store). RUNNING runs are ended; a parent already
    ended FAILED or KILLED (the ``with parent_run(...)`` block ends it FAILED when the flow raises) gets
    ``status`` without a new end time; a FINISHED one is left alone. Each changed run gets the tag
    ``distill.failure_reason = reason``. Returns the ids of the runs changed.
    """
    if status not in _FINISHED_STATUSES:
        raise ValueError(f"status={status!r}: end runs as one of {list(_FINISHED_STATUSES)}")
    client = MlflowClient(tracking_uri)
    parents: dict[str, Run] = {}
    if parent_run_id:
        run = client.get_run(parent_run_id)
        parents[run.info.run_id] = run
    if flow_run_id:
        ids = list(experiment_ids) if experiment_ids is not None else _all_experiment_ids(client)
        if ids:
            for run in _search_all(client, ids, f'tags."{FLOW_RUN_TAG}" = {_quoted(str(flow_run_id))}'):
                parents.setdefault(run.info.run_id, run)
    reason = _reason_tag(reason)
    changed: list[str] = []
    for run in parents.values():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
        elif run.info.status in _FINISHED_STATUSES:
            if run.info.status != status:
                client.update_run(run.info.run_id, status=status)
        else:  # FINISHED (or SCHEDULED): the MLflow side completed
            continue
        client.set_tag(run.info.run_id, FAILURE_REASON_TAG, reason)
        changed.append(run.info.run_id)
        children = _search_all(
            client,
            [run.info.experiment_id],
            f"tags.\"{PARENT_RUN_TAG}\" = {_quoted(run.info.run_id)} and attributes.status = 'RUNNING'",
        )
        for child in children:
            client.set_terminated(child.info.run_id, status)
            client.set_tag(child.info.run_id, FAILURE_REASON_TAG, reason)
            changed.append(child.info.run_id)
    if changed:
        log.info("ended MLflow runs %s as %s: %s", changed, status, reason)
    return changed


def config_from_flow_parameters(parameters: dict[str, Any]) -> DistillConfig:
    """The config a ``distill`` flow run resolved from its parameters (as ``flows.distill`` does)."""
    from tasks.config import form_overrides, resolve_form

    form = form_overrides(**{name: parameters.get(name) for name in _FLOW_FORM_FIELDS})
    return resolve_form(parameters.get("profile"), form, parameters.get("overrides"))


def _hook_store(flow_run: Any) -> tuple[str | None, str]:
    """(tracking URI, experiment name) for a hook.

    Hooks run in the flow's process (failure) or in a runner process (crash, cancellation) where the flow
    never set MLflow's URI: the flow run's parameters say where the store is. When they do not resolve to
    a config (e.g. the run failed because they were invalid), the URI and experiment given in them, else
    MLflow's URI in this process and the default experiment.
    """
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    from tasks.config import TrackingConfig

    parameters = dict(getattr(flow_run, "parameters", None) or {})
    try:
        config = config_from_flow_parameters(parameters)
    except Exception as exc:
        log.info("flow run parameters give no config (%s)", short_error(exc))
        given = (parameters.get("overrides") or {}).get("tracking") or {}
        uri = parameters.get("tracking_uri") or given.get("tracking_uri")
        experiment = parameters.get("experiment") or given.get("experiment") or TrackingConfig().experiment
        if not uri and is_tracking_uri_set():
            uri = mlflow.get_tracking_uri()
        return uri or None, experiment
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri, config.tracking.experiment
    if is_tracking_uri_set():  # what the flow set in this process (or MLFLOW_TRACKING_URI)
        return mlflow.get_tracking_uri(), config.tracking.experiment
    return tracking_uri(config), config.tracking.experiment


def _end_flow_run_runs(flow_run: Any, state: Any, status: str) -> list[str]:
    reason = getattr(state, "message", None) or f"the flow run ended {getattr(state, 'name', status)}"
    try:
        bound_mlflow_http_retries()
        uri, name = _hook_store(flow_run)
        if uri is None:
            log.warning(
                "no MLflow tracking URI for flow run %s: its MLflow runs are left as they are", flow_run.id
            )
            return []
        sqlite = sqlite_path(uri)
        if sqlite is not None and not sqlite.is_file():  # the flow failed before it opened the store
            return []
        experiment = MlflowClient(uri).get_experiment_by_name(name)
        if experiment is None:
            return []
        experiment_ids = [experiment.experiment_id]
        return end_open_runs(
            status,
            reason,
            None,
            flow_run_id=str(flow_run.id),
            experiment_ids=experiment_ids,
            tracking_uri=uri,
        )
    except Exception as exc:  # a hook must not hide the flow's own failure
        log.warning(
            "could not mark the MLflow runs of flow run %s %s (%s)", flow_run.id, status, short_error(exc)
        )
        return []


def mark_mlflow_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` hook: the flow run's MLflow runs end FAILED with the failure as reason."""
    _end_flow_run_runs(flow_run, state, "FAILED")


def mark_mlflow_crashed(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_crashed`` hook: the flow run's MLflow runs end FAILED with the crash as reason."""
    _end_flow_run_runs(flow_run, state, "FAILED")


def mark_mlflow_cancelled(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_cancellation`` hook: the flow run's MLflow runs end KILLED."""
    _end_flow_run_runs(flow_run, state, "KILLED")


FLOW_HOOKS: dict[str, list[Callable[..., None]]] = {
    "on_failure": [mark_mlflow_failed],
    "on_crashed": [mark_mlflow_crashed],
    "on_cancellation": [mark_mlflow_cancelled],
}


def process_is_alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < _PID_START_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # there, but not ours to inspect
        return True


def close_abandoned_runs(experiment_id: str, *, tracking_uri: str | None = None) -> list[str]:
    """End RUNNING runs of this host whose process is gone (killed) as KILLED; return their ids.

    Looks at runs tagged with :func:`run_identity_tags` and ``distill.host`` = this host. Their RUNNING
    children end too, all with ``distill.failure_reason``. A run tagged ``prefect.flow_run_id`` whose flow
    run is still RUNNING in Prefect (in the same attempt) has that flow run set Crashed.
    """
    client = MlflowClient(tracking_uri)
    host = socket.gethostname()
    runs = _search_all(
        client, [experiment_id], f"tags.\"{HOST_TAG}\" = {_quoted(host)} and attributes.status = 'RUNNING'"
    )
    closed: list[str] = []
    for run in runs:
        tags = run.data.tags
        try:
            pid, started = int(tags[PID_TAG]), float(tags[PID_STARTED_TAG])
        except (KeyError, ValueError):
            continue
        if process_is_alive(pid, started):
            continue
        reason = f"process {pid} on {host} ended without closing the run (killed?)"
        log.warning("MLflow run %s (%s): %s; ending it KILLED", run.info.run_id, run.info.run_name, reason)
        end_open_runs("KILLED", reason, run.info.run_id, tracking_uri=tracking_uri)
        closed.append(run.info.run_id)
        flow_run_id = tags.get(FLOW_RUN_TAG)
        if flow_run_id:
            crash_prefect_flow_run(flow_run_id, reason, not_after_ms=run.info.start_time)
    return closed


def crash_prefect_flow_run(flow_run_id: str, message: str, not_after_ms: int | None = None) -> bool:
    """Set a Prefect flow run Crashed if it is still RUNNING; True when it was. Never raises.

    ``not_after_ms``: only if the flow run entered Running no later than this (epoch ms; e.g. the MLflow
    run's start), so that a flow run retried since, and running elsewhere, is left alone.
    """
    try:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(UUID(str(flow_run_id)))
            state = flow_run.state
            if state is None or not state.is_running():
                return False
            if not_after_ms is not None and state.timestamp.timestamp() * 1000 > not_after_ms + 1000:
                log.info("Prefect flow run %s runs again since: left as it is", flow_run_id)
                return False
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    except Exception as exc:
        log.warning("could not mark Prefect flow run %s Crashed (%s)", flow_run_id, short_error(exc))
        return False
    log.warning("Prefect flow run %s set Crashed: %s", flow_run_id, message)
    return True
