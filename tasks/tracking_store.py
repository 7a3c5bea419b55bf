"""The MLflow tracking store: where it is, whether it can be used, and the experiment a flow run logs to.

* :func:`check_tracking_store` stops within seconds, naming the URI and the fix, when the store is not
  reachable or not writable; :func:`bound_mlflow_http_retries` keeps MLflow's own HTTP retries to seconds
  instead of minutes, and :func:`with_retries` retries single logging calls on transient errors.
* :func:`setup_experiment` holds a file lock beside a SQLite store while MLflow creates its schema and the
  experiment, so that runs started together on a fresh store do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.config import DistillConfig

log = logging.getLogger(__name__)

T = TypeVar("T")


_sleep = time.sleep  # tests replace it


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
PARENT_RUN_TAG = "mlflow.parentRunId"


# What bound_mlflow_http_retries sets unless the environment already says otherwise: MLflow's defaults
# (7 retries, backoff factor 2, 120 s timeout) keep a run waiting for minutes on a server that is down.
MLFLOW_HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # MLflow parses it as an int
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


_TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})


_STORE_LOCK_TIMEOUT_S = 300.0


class TrackingStoreError(ValueError):
    """The MLflow tracking store cannot be used; the message names the URI and the fix."""


def tracking_uri(config: DistillConfig) -> str:
    """Config first, then ``MLFLOW_TRACKING_URI``, else a SQLite store in the work directory."""
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(config.work_dir).resolve() / 'mlflow.db').as_posix()}"


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def bound_mlflow_http_retries() -> None:
    """Keep MLflow's HTTP retries for this process short (3 retries, backoff factor 1, 30 s timeout).

    Sets the environment variables MLflow reads on every request, unless they are set already.
    """
    for name, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def check_tracking_store(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingStoreError` within about ``timeout`` seconds when the store cannot be used.

    http(s): the server answers ``/health`` and its REST API (no retries); ``sqlite:///path``, ``file:``
    and plain paths: the folder exists or can be created, and is writable; postgresql / mysql: a connection
    opens (``connect_timeout``). Other schemes (databricks, plugins) are not checked.
    """
    shown = redact_uri(uri)
    if uri.split(":")[0].lower() in ("databricks", "databricks-uc", "uc"):
        log.debug("tracking store %s is not checked before the run", shown)
        return
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http_store(uri, shown, timeout)
    elif scheme == "sqlite" or scheme.startswith("sqlite+"):
        _check_sqlite_store(uri, shown)
    elif scheme == "file":
        parts = urllib.parse.urlsplit(uri)
        _check_writable_folder(Path(urllib.request.url2pathname(parts.path)), shown, "file store")
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a plain path (or C:\...)
        _check_writable_folder(Path(uri), shown, "file store")
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql"):
        _check_sql_store(uri, shown, timeout)
    else:
        log.debug("tracking store %s: scheme %r is not checked before the run", shown, scheme)


_SERVER_FIX = (
    "start the server (e.g. `docker compose up -d mlflow`, or `mlflow server --port 5000`), or point "
    "tracking.tracking_uri / MLFLOW_TRACKING_URI at a running one (both empty: a local SQLite store)"
)


def _check_http_store(uri: str, shown: str, timeout: float) -> None:
    import requests

    base = uri.rstrip("/")
    kwargs: dict[str, Any] = {"timeout": (timeout, timeout), "allow_redirects": True}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        kwargs["auth"] = (user, password)
    elif token:
        kwargs["headers"] = {"Authorization": f"Bearer {token}"}
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        kwargs["verify"] = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        kwargs["verify"] = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    started = time.monotonic()
    try:
        requests.get(f"{base}/health", **kwargs)
        api = f"{base}/api/2.0/mlflow/experiments/search"
        response = requests.get(api, params={"max_results": 1}, **kwargs)
    except requests.RequestException as exc:
        raise TrackingStoreError(
            f"MLflow tracking server {shown} is not reachable ({short_error(exc)}, after "
            f"{time.monotonic() - started:.1f} s): {_SERVER_FIX}"
        ) from None
    status = response.status_code
    if status == 200:
        try:
            response.json()
        except ValueError:
            status = -1
        else:
            return
    if status in (401, 403):
        raise TrackingStoreError(
            f"MLflow tracking server {shown} refused the request (HTTP {status}): set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it"
        )
    if status in _TRANSIENT_HTTP_STATUS:
        raise TrackingStoreError(
            f"MLflow tracking server {shown} answers HTTP {status} to its REST API: the server or its "
            "database is down or overloaded; check the server's log, or point tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI at another store"
        )
    got = "a non-JSON answer" if status == -1 else f"HTTP {status}"
    raise TrackingStoreError(
        f"{shown} does not serve the MLflow REST API ({got} from /api/2.0/mlflow/experiments/search): "
        "give the tracking server's root URL (e.g. http://mlflow:5000) in tracking.tracking_uri / "
        "MLFLOW_TRACKING_URI"
    )


def _check_sqlite_store(uri: str, shown: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception as exc:
        raise TrackingStoreError(f"tracking URI {shown} is not a valid SQLite URL ({exc})") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    _check_writable_folder(path.parent, shown, "SQLite store")
    if path.is_dir():
        raise TrackingStoreError(
            f"MLflow SQLite store {shown}: {path} is a folder; give a database file path, e.g. "
            f"sqlite:///{(path / 'mlflow.db').as_posix()}"
        )
    if path.is_file():
        try:
            with open(path, "r+b") as f:
                header = f.read(16)
        except OSError as exc:
            raise TrackingStoreError(
                f"MLflow SQLite store {shown}: {path} cannot be opened for writing ({short_error(exc)}); "
                "fix its permissions or choose another tracking.tracking_uri"
            ) from None
        if header and header != b"SQLite format 3\x00":
            raise TrackingStoreError(
                f"MLflow SQLite store {shown}: {path} is not a SQLite database; move it away or choose "
                "another tracking.tracking_uri"
            )


def _check_writable_folder(folder: Path, shown: str, what: str) -> None:
    """``folder`` exists and is writable, or its nearest existing ancestor is a writable folder."""
    folder = folder.expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "fix its permissions, or choose another tracking.tracking_uri / MLFLOW_TRACKING_URI"
    if not existing.is_dir():
        raise TrackingStoreError(
            f"MLflow {what} {shown}: {existing} is a file, so {folder} cannot be a folder; {fix}"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".distill-write-check-"):
            pass
    except OSError as exc:
        where = "" if existing == folder else f" (to create {folder})"
        raise TrackingStoreError(
            f"MLflow {what} {shown}: cannot write in {existing}{where} ({short_error(exc)}); {fix}"
        ) from None


def _check_sql_store(uri: str, shown: str, timeout: float) -> None:
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(
            uri, poolclass=NullPool, connect_args={"connect_timeout": max(1, int(timeout))}
        )
    except Exception as exc:  # unknown dialect, driver not installed
        raise TrackingStoreError(
            f"MLflow database store {shown} cannot be opened ({short_error(exc)}): install its driver (for "
            "PostgreSQL: pip install psycopg2-binary, or the [postgres] extra) or fix the URI"
        ) from None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        raise TrackingStoreError(
            f"MLflow database store {shown} is not reachable ({short_error(exc)}): start the database, check "
            "the host, port, user and password, or point tracking.tracking_uri / MLFLOW_TRACKING_URI "
            "elsewhere"
        ) from None
    finally:
        engine.dispose()


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def is_transient(exc: BaseException) -> bool:
    """A network / server hiccup worth retrying (not a programming or input error)."""
    import requests

    if isinstance(exc, MlflowException):  # connection failures arrive wrapped, as INTERNAL_ERROR (500)
        return exc.get_http_status_code() in _TRANSIENT_HTTP_STATUS
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code in _TRANSIENT_HTTP_STATUS
    if isinstance(
        exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
    ):
        return True
    if isinstance(exc, requests.RequestException):
        return False
    if isinstance(
        exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
    ):
        return False
    if isinstance(exc, OSError | TimeoutError):
        return True
    with contextlib.suppress(ImportError):
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):  # e.g. "database is locked"
            return True
    return False


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 3,
    base_delay: float = 2.0,
    what: str = "",
    sleep: Callable[[float], None] | None = None,
) -> T:
    """``fn()``, retried with exponential backoff (``base_delay``, 2x, ...) on transient errors only."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1)
            log.warning(
                "%s failed (%s); retry %d of %d in %.0f s",
                what or getattr(fn, "__name__", "MLflow call"),
                short_error(exc),
                attempt,
                attempts - 1,
                delay,
            )
            (sleep or _sleep)(delay)
    raise AssertionError("unreachable")


def sqlite_path(uri: str) -> Path | None:
    if not (uri.startswith("sqlite:") or uri.startswith("sqlite+")):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An inter-process lock beside a SQLite store (``<db>.lock``); nothing for other stores."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", timeout=_STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise TrackingStoreError(
            f"another process has held {lock.lock_file} for {_STORE_LOCK_TIMEOUT_S:.0f} s while setting up "
            f"the MLflow store {redact_uri(uri)}; if no distill run is starting, delete that file"
        ) from None
    try:
        yield
    finally:
        lock.release()


def setup_experiment(config: DistillConfig, name: str | None = None) -> str:
    """Point MLflow at the store and return the id of experiment ``name`` (default
    ``tracking.experiment``), created on first use.

    Checks the store first (:func:`check_tracking_store`) and bounds MLflow's HTTP retries. With a SQLite
    store, a file lock beside the database serialises schema creation and experiment creation between
    processes; with any store, losing the race to create the experiment just reads it back.
    """
    uri = tracking_uri(config)
    bound_mlflow_http_retries()
    check_tracking_store(uri)
    name = name or config.tracking.experiment
    with store_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        experiment = client.get_experiment_by_name(name)  # a fresh SQLite store gets its schema here
        if experiment is None:
            artifact_location = None
            if sqlite_path(uri) is not None:  # keep a local store's artifacts beside it, not in the cwd
                artifact_location = (Path(config.work_dir).resolve() / "mlartifacts").as_uri()
            try:
                client.create_experiment(name, artifact_location)
            except MlflowException:  # another process created it first
                if client.get_experiment_by_name(name) is None:
                    raise
            experiment = client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingStoreError(
                f"MLflow experiment {name!r} ({experiment.experiment_id}) in {redact_uri(uri)} is deleted: "
                f"restore it (mlflow experiments restore --experiment-id {experiment.experiment_id}) or "
                "choose another tracking.experiment"
            )
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
            # Marks a model-training experiment (runs table, charts). MLflow 3.17's UI also keeps a
            # per-browser GenAI / model-training switch: links add ?workflowType=machine_learning.
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development"
            )
    return experiment.experiment_id
