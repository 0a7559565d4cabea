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

PR_SET_PDEATHSIG = 1
_prctl: list[Any] = []  # libc's prctl, loaded in the job before the first fork (the child must load nothing)


def spawn(argv: list[str], **options: Any) -> subprocess.Popen:
    """subprocess.Popen(argv, **options), the child dying with the job. From the main thread: Linux
    ties the request to the thread that forked."""
    if not _prctl:
        try:
            import ctypes

            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError):  # not Linux: nothing to ask for
            _prctl.append(None)
    return subprocess.Popen(argv, preexec_fn=_dies_with(os.getpid(), _prctl[0]), **options)


def _dies_with(parent: int, prctl: Any) -> Any:
    def in_the_child() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the job died before the request: nobody is there to be killed by
            os._exit(1)
    return in_the_child
