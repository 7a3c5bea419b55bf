"""A private PostgreSQL cluster for tests: its own data folder, 127.0.0.1 on a free port, stopped by pid.

Uses Debian's ``postgresql`` package (``.ci/run`` installs it when missing). PostgreSQL refuses to run as
root, so as root the cluster runs as the ``postgres`` system user that the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deployments.stack import free_port


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (Debian keeps them off PATH), or None."""
    candidates = [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)  # type: ignore[arg-type]
    needed = ("initdb", "postgres", "pg_isready", "createdb")
    return next((d for d in candidates if all((d / name).is_file() for name in needed)), None)


def why_unavailable() -> str | None:
    """Why a cluster cannot start here (printed as the skip reason), or None when it can."""
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it when it can)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run the cluster as"
    return None


@contextmanager
def local_postgres(databases: tuple[str, ...]) -> Iterator[Postgres]:
    """Start a throwaway cluster with ``databases`` created (trust auth, 127.0.0.1 only); always removed."""
    bin_dir = find_bin_dir()
    assert bin_dir is not None, why_unavailable()
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="distill-pg-"))  # not under pytest's 0700 tmp: the user must reach it
    data = root / "data"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    run_as = {"user": user} if user else {}
    server: subprocess.Popen | None = None
    try:
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True, capture_output=True, **run_as,
        )  # fmt: skip
        port = free_port()
        with open(root / "server.log", "ab") as log:
            server = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                 "-c", "fsync=off"],  # a test cluster: durability does not matter, speed does
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as,
            )  # fmt: skip
        _wait_ready(bin_dir, port, server, root / "server.log")
        for database in databases:
            subprocess.run(
                [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                check=True, capture_output=True,
            )  # fmt: skip
        yield Postgres(port)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bin_dir: Path, port: int, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with code {server.returncode}: {log.read_text()[-2000:]}")
        ready = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        )
        if ready.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"PostgreSQL did not accept connections within {timeout:.0f} s: see {log}")
