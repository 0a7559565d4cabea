"""The fleet's summary: its exit code by what its databases did, and a termination message that
names the failures first and fits Kubernetes' 4096 bytes however many there are."""

from __future__ import annotations

import signal

from job import fleet, logs


def _ended(count: int, outcome: str, code: int | None) -> list[fleet.Ended]:
    return [fleet.Ended(fleet.Target(f"postgresql://h/{outcome}_{i}", f"{outcome}_{i}"), outcome, code, 0.1,
                        "a revision failed" if code else None) for i in range(count)]


def test_every_database_done_is_exit_0() -> None:
    outcome, code, message = fleet.summary(_ended(3, "migrated", 0) + _ended(2, "up-to-date", 0), None)
    assert (outcome, code) == ("fleet-done", 0)
    assert message == "fleet-done: 0 of 5 failed; 3 migrated, 2 up-to-date"


def test_any_failure_is_exit_6_and_named_first_within_4096_bytes() -> None:
    ended = _ended(900, "migrated", 0) + _ended(600, "failed", 4) + _ended(50, "not-started", None)
    outcome, code, message = fleet.summary(ended, None)
    assert (outcome, code) == ("fleet-failed", 6)
    assert message.startswith("fleet-failed: 600 of 1550 failed; failed_0 (exit 4): a revision failed; failed_1")
    written = logs.termination_message(message)
    assert len(written) <= 4096 and written.endswith(b" [cut]\n")


def test_a_signal_is_its_exit_code() -> None:
    ended = _ended(1, "migrated", 0) + _ended(2, "interrupted", 143) + _ended(3, "not-started", None)
    outcome, code, message = fleet.summary(ended, signal.SIGTERM)
    assert (outcome, code) == ("interrupted", 143)
    assert message.startswith("interrupted: 2 of 6 failed; interrupted_0 (exit 143)")
    assert fleet.summary(ended, signal.SIGINT)[1] == 130
