"""The processes the job starts (pg_dump, pg_restore, psql, squawk): each dies with the job.

A job SIGKILLed at its grace period (or OOM-killed) runs no cleanup of its own, and a pg_dump it
left would hold a share lock on every table for as long as it dumps, so that the next run's
revision times out on its table locks. So every child asks Linux, before it runs the program, to
be killed when the job dies (PR_SET_PDEATHSIG), and checks that the job has not died already
(between the fork and that request).
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

try:
    import ctypes

    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: the child must not load a library
except (OSError, AttributeError):  # not Linux: nothing to ask for
    _prctl = None

PR_SET_PDEATHSIG = 1


def spawn(argv: list[str], **options: Any) -> subprocess.Popen:
    """subprocess.Popen(argv, **options), the child dying with the job."""
    return subprocess.Popen(argv, preexec_fn=_dies_with(os.getpid()), **options)


def _dies_with(parent: int) -> Any:
    def in_the_child() -> None:
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the job died before the request: nobody is there to be killed by
            os._exit(1)
    return in_the_child
