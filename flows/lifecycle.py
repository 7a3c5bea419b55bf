"""Clean exits for ``distill run``: a signal ends the run in seconds and no process outlives the CLI.

``run_with_clean_exit(distill, ...)`` runs the flow in-process and returns the exit code: 0 done, 1 the flow
failed, 128 + signal number when stopped by a signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).

What Prefect 3 does on its own, and what this module adds:

* A flow run catches ``KeyboardInterrupt`` (SIGINT) and ``TerminationSignal`` (Prefect's own SIGTERM handler,
  installed only while a flow runs, see ``prefect.utilities.engine.capture_sigterm``), marks the flow run and
  the running task run **Crashed** (not Cancelled: that needs a runner's cancel intent) and re-raises. For
  SIGTERM it then restores the handler that was there before and sends SIGTERM to itself again; with the
  default handler that kills the process on the spot, skipping ``atexit``, so the temporary server was
  orphaned. Here our handler is the one restored: it sees the re-sent SIGTERM while the
  ``TerminationSignal`` is unwinding, notes it and lets the exception go on. SIGHUP (a closed terminal) is
  raised as a ``TerminationSignal`` too, so Prefect handles it the same way.
* Without ``PREFECT_API_URL`` Prefect starts a temporary server (``SubprocessASGIServer``: a uvicorn child
  started with ``subprocess.Popen``) on first API use and stops it from ``atexit``. The child shared the CLI's
  process group, so a terminal Ctrl-C killed it together with the CLI and the crash report then retried
  against a dead server for minutes ("All connection attempts failed"). A SIGKILL of the CLI left it running
  forever. Here the same class starts the server before the flow, in the default slot that Prefect's clients
  look up (``SubprocessASGIServer()``, as ``prefect.testing`` does), with two ``Popen`` options added: its
  own session (terminal and process-group signals no longer reach it; the CLI stops it after the crash
  report) and, on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` so the kernel stops it when the CLI dies, even
  by SIGKILL. Prefect still builds the uvicorn command; only ``Popen`` gets the options. A watchdog process
  would also work, but is one more process that can outlive the CLI; PDEATHSIG is one system call and the
  kernel keeps the promise.
* After the flow returns or raises: Prefect's log and event workers are drained while the server is still up
  (Prefect's own order at exit), then the server is stopped (SIGTERM, SIGKILL after 5 s, then its whole
  process group).
* A second signal, or a wind-down longer than ``grace_s`` after the first signal, kills the server and ends
  the process at once with the signal's exit code. Both stay armed after ``run_with_clean_exit`` returns, to
  cover the interpreter's exit (``atexit`` handlers such as MLflow's, non-daemon threads); without a signal
  the previous handlers are restored.

Limits: PDEATHSIG is Linux only (elsewhere a SIGKILL of the CLI still orphans the server) and fires when the
thread that started the server ends, which is the main thread here. A SIGKILL leaves the Prefect flow run
RUNNING: nothing runs in the killed process to report it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prefect.exceptions import TerminationSignal

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

EXIT_OK = 0
EXIT_FAILED = 1
GRACE_SECONDS = 30.0  # from the first signal to a forced exit
DRAIN_SECONDS = 5.0  # for Prefect's log / event workers to send what they hold before the server stops
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def run_with_clean_exit(
    fn: Callable[..., object], /, *args: Any, grace_s: float = GRACE_SECONDS, **kwargs: Any
) -> int:
    """Call ``fn(*args, **kwargs)`` (a Prefect flow) with clean signal handling; return the exit code.

    Starts the temporary Prefect server first when no ``PREFECT_API_URL`` is set, and always stops it before
    returning. Must run in the main thread to handle signals (elsewhere it only manages the server).
    """
    guard = _ExitGuard(grace_s)
    with guard.handling_signals():
        try:
            code = _run(guard, fn, args, kwargs)
        except (KeyboardInterrupt, TerminationSignal) as exc:  # a signal that landed between two statements
            code = guard.signal_exit_code(exc)
        finally:
            guard.winding_down = True  # from here on a signal no longer raises
            if guard.received is not None:
                guard.arm_deadline()
            stop_linked_server(guard.server)
        code = guard.signal_exit_code(None) or code  # a signal during the wind-down wins
    if code > 128:
        print(f"distill: stopped by {signal.Signals(code - 128).name} (exit {code})", file=sys.stderr)
    return code


def _run(guard: _ExitGuard, fn: Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    what = "the temporary Prefect server did not start"
    try:
        guard.server = start_linked_server()
        what = "the flow failed"
        fn(*args, **kwargs)
    except (KeyboardInterrupt, TerminationSignal) as exc:
        return guard.signal_exit_code(exc)
    except Exception as exc:  # Prefect has logged the flow's traceback
        if guard.received is not None:  # e.g. a library turned the KeyboardInterrupt into another error
            return guard.signal_exit_code(None)
        print(f"distill: {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


class _ExitGuard:
    """Signal handlers for the run: the first signal raises, a second one (or the deadline) forces an exit."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received: int | None = None
        self.winding_down = False
        self._echoed = False
        self.server: SubprocessASGIServer | None = None
        self._deadline: threading.Timer | None = None

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _HANDLED_SIGNALS:
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            yield
        finally:
            if self.received is None:  # after a signal, on the way out: a second one still forces the exit
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        unwinding = sys.exc_info()[1]
        if isinstance(unwinding, TerminationSignal) and unwinding.signal == signum and not self._echoed:
            # After marking the run Crashed on a TerminationSignal, Prefect's flow engine restores the handler
            # it found (this one) and sends the signal again: note it, let the exception go on.
            self._echoed = True
        elif self.received is not None:  # a second signal: the user insists
            self.force_exit(f"second signal ({signal.Signals(signum).name})")
        self.received = self.received or signum
        self.arm_deadline()
        if self.winding_down or isinstance(unwinding, (KeyboardInterrupt, TerminationSignal)):
            return  # already on the way out; raising again would cut the clean-up short
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TerminationSignal(signal=signum)

    def signal_exit_code(self, exc: BaseException | None) -> int:
        """128 + the signal received (or carried by ``exc``); 0 when there was none."""
        if self.received is not None:
            return 128 + self.received
        if isinstance(exc, TerminationSignal):
            return 128 + exc.signal
        if isinstance(exc, KeyboardInterrupt):
            return 128 + signal.SIGINT
        return 0

    def arm_deadline(self) -> None:
        if self._deadline is None:
            why = f"still running {self.grace_s:g} s after the signal"
            self._deadline = threading.Timer(self.grace_s, self.force_exit, args=(why,))
            self._deadline.daemon = True  # also runs while the interpreter waits for other threads at exit
            self._deadline.start()

    def force_exit(self, why: str) -> None:
        code = self.signal_exit_code(None) or EXIT_FAILED
        kill_server_now(self.server)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(f"distill: {why}: exiting now (exit {code})", file=sys.stderr, flush=True)
        os._exit(code)


def start_linked_server(timeout: int | None = None) -> SubprocessASGIServer | None:
    """Start Prefect's temporary server, tied to this process; None when Prefect will not use one.

    The server takes the default slot that ``get_client()`` and the log / event clients look up, so the
    flow uses it as it would use the one Prefect starts by itself.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    current = SubprocessASGIServer._instances.get(None)
    if current is not None and current.running:  # started by someone else: leave it to Prefect's atexit
        return None
    server = _linked_server_class()(port=_free_port())
    SubprocessASGIServer._instances[None] = server
    try:
        server.start(timeout=timeout)
    except BaseException:
        stop_linked_server(server)
        raise
    return server


def stop_linked_server(server: SubprocessASGIServer | None) -> None:
    """Let Prefect's log / event workers finish sending, then stop the server and anything it started."""
    if server is None:
        return
    from prefect.server.api.server import SubprocessASGIServer

    if server.server_process is not None and server.server_process.poll() is None:
        _drain_prefect_workers(DRAIN_SECONDS)
    pid = server.server_process.pid if server.server_process is not None else None
    server.stop()  # SIGTERM, SIGKILL after 5 s, reaped; deregisters its own port
    if pid is not None:
        with contextlib.suppress(OSError):  # its own session: pgid == pid; anything left in the group goes
            os.killpg(pid, signal.SIGKILL)
    if SubprocessASGIServer._instances.get(None) is server:
        del SubprocessASGIServer._instances[None]


def kill_server_now(server: SubprocessASGIServer | None) -> None:
    """SIGKILL the server's process group without waiting (forced exit)."""
    process = server.server_process if server is not None else None
    if process is not None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)


def _drain_prefect_workers(timeout: float) -> None:
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:  # pragma: no cover - a Prefect without these workers
        return
    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def linked_child_options() -> dict[str, Any]:
    """``Popen`` options for a child that is alone in its session and, on Linux, dies with this process."""
    options: dict[str, Any] = {"start_new_session": True}
    if not sys.platform.startswith("linux"):
        return options
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing to load after the fork
    except (OSError, AttributeError):
        return options
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would stop this child
            os._exit(1)

    options["preexec_fn"] = die_with_parent
    return options


@functools.cache
def _linked_server_class() -> type[SubprocessASGIServer]:
    from prefect.server.api import server as server_module

    class LinkedServer(server_module.SubprocessASGIServer):
        """Prefect's temporary server, in its own session and (Linux) stopped when this process dies."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's method builds the command and calls ``subprocess.Popen`` from its module; swap in a
            # Popen with our options for that one call (main thread, before the flow's threads exist).
            server_module.subprocess = _PopenWithOptions(linked_child_options())  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess

    return LinkedServer


class _PopenWithOptions:
    """Stands in for the ``subprocess`` module: ``Popen`` gets extra options, the rest is the module's."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # the module's name for it
        return subprocess.Popen(*args, **{**self._options, **kwargs})
