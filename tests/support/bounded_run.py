"""Wait for a command started in its own session (``start_new_session=True``) for a bounded time: past the
bound the test fails with the end of its output, and the whole process group is killed (a hung run's loader
workers included)."""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Tuple

import pytest


def finish(p: subprocess.Popen, bound: float) -> Tuple[int, str]:
    """(exit status, output) of ``p``, whose stdout is a text pipe (stderr merged into it)."""
    try:
        out, _ = p.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"the run did not end within {bound} s:\n{out[-3000:]}")
    return p.returncode, out
