"""``distill <command>`` in a process of its own, with a temporary Prefect server (its own PREFECT_HOME)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def start_cli(
    config_file: Path,
    prefect_home: Path,
    log_file: Path,
    command: str = "run",
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    **popen: object,
) -> subprocess.Popen:
    """Start ``distill <command> --config config_file <args>``; stdout and stderr go to ``log_file``;
    ``env``: variables added to this process's environment."""
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("PREFECT_API_URL", None)  # a temporary local server, as on a fresh machine
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", command, "--config", str(config_file), *args],
        cwd=REPO,
        env=env,
        stdout=Path(log_file).open("w"),
        stderr=subprocess.STDOUT,
        **popen,
    )


def run_cli(
    config_file: Path,
    prefect_home: Path,
    command: str = "run",
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Exit code and output of one ``distill <command>``."""
    log = prefect_home.with_suffix(".log")
    return start_cli(config_file, prefect_home, log, command, args, env).wait(timeout=900), log.read_text()
