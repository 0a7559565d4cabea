"""Watching a running job's log: shared by the tests and the benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path


def wait_for_event(proc_output: Path, name: str, timeout: float = 30, poll: float = 0.02) -> None:
    """Wait until a job writing its stdout to `proc_output` has logged `name`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_output.exists() and name in events(proc_output.read_text()):
            return
        time.sleep(poll)
    raise TimeoutError(f"no {name!r} event within {timeout} s: {proc_output.read_text() if proc_output.exists() else ''}")


def events(output: str) -> list[str]:
    """The events of a job's JSON log lines, in order (a line still being written is passed over)."""
    found = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            found.append(record["event"])
    return found
