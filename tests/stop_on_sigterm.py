"""A pytest plugin: SIGTERM ends a test run the way Ctrl-C does, so that fixture teardowns still run.

Without it, a test run stopped from outside (a CI timeout, ``kill`` on its process group) exits at once and
the servers, workers and databases that fixtures started in their own sessions are left running. With it,
pytest reports the run as interrupted and tears every fixture down; a second SIGTERM exits at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import pytest


def _stop_like_ctrl_c(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM: no more teardown, exit now
    raise KeyboardInterrupt("stopped by SIGTERM")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
