"""Secrets masked in every form they can take in a line; long text cut, and marked; the lines
`run` holds at start-up."""

from __future__ import annotations

import io
import json
from typing import Callable, Iterator

import pytest

from job.logs import FIELD_LIMIT, TERMINATION_LIMIT, Redactor, termination_message


def test_a_secret_is_masked_as_typed_url_encoded_and_in_repr_form() -> None:
    """SQLAlchemy's debug lines show bound parameters in repr form: that form is masked too."""
    redactor = Redactor(["it's\\a%secret"])
    line = f"{'it' + chr(39) + 's'}\\a%secret | it%27s%5Ca%25secret | {repr(chr(39) + 'x')} {repr(chr(92))} " \
           f"params: {repr(('it' + chr(39) + 's' + chr(92) + 'a%secret',))}"

    masked = redactor({}, "", {"event": line})["event"]

    assert "secret" not in masked and masked.count("***") == 3


def test_a_long_field_is_cut_and_says_so() -> None:
    """A 4.5-million-character error becomes a bounded field that says how much was cut."""
    masked = Redactor()({}, "", {"error": "x" * 4_500_000})["error"]

    assert len(masked) < FIELD_LIMIT + 100 and masked.endswith("[cut: 4492000 more characters]")


def test_the_termination_message_fits_kubernetes_limit_on_a_character_boundary() -> None:
    """Multi-byte text is cut to at most 4096 bytes of valid UTF-8, marked as cut."""
    message = termination_message("é" * 5000)

    assert len(message) <= TERMINATION_LIMIT and message.decode().endswith(" [cut]\n")


def test_a_short_termination_message_is_kept_whole() -> None:
    assert b"migrated (exit 0)\n" == termination_message("migrated (exit 0)")


def test_an_error_from_the_tools_is_its_first_error_with_its_detail() -> None:
    """psql/pg_restore output: the first ERROR and its DETAIL, not the `Command was:` line at the end."""
    from job.archive import first_error

    stderr = ("psql:<stdin>:41: ERROR:  cannot drop table users because other objects depend on it\n"
              "DETAIL:  constraint profiles_user_id_fkey on table profiles depends on table users\n"
              "HINT:  Use DROP ... CASCADE to drop the dependent objects too.\n"
              "psql:<stdin>:42: ERROR:  current transaction is aborted\n"
              "Command was: ALTER TABLE ONLY public.profiles DROP CONSTRAINT profiles_user_id_fkey;\n")

    assert ("psql:<stdin>:41: ERROR:  cannot drop table users because other objects depend on it "
            "DETAIL:  constraint profiles_user_id_fkey on table profiles depends on table users "
            "HINT:  Use DROP ... CASCADE to drop the dependent objects too.") == first_error(stderr)


# --- the lines themselves, read as JSON, in this process --------------------------------------
# (structlog's capture_logs sees only loggers built from structlog's global configuration; the
# job's has processors of its own, so that a project's structlog setup cannot change its lines)

@pytest.fixture
def lines() -> Iterator[Callable[[], list[dict]]]:
    """The job's logger writing JSON into a buffer; the logged lines, parsed."""
    from job import logs

    buffer = io.StringIO()
    saved = (logs.log._logger, logs.log._held, dict(logs._options))
    logs.log._logger = None
    logs.configure("json", "info", run_id="r1", stream=buffer, hold=True)

    def written() -> list[dict]:
        logs.drain(5)  # (a thread of its own writes them)
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield written
    logs.log._logger, logs.log._held = saved[0], saved[1]
    logs._options.clear()
    logs._options.update(saved[2])


def test_runs_first_lines_wait_for_its_first_other_line(lines: Callable[[], list[dict]]) -> None:
    """run.start and wait.ready are held until the next line, then written first, with their own time."""
    from job.logs import log

    log.info("run.start", command="run")
    log.info("wait.ready", seconds=0.01)
    held = lines()
    log.info("lock.acquired", mode="shared")

    written = lines()
    assert ([], ["run.start", "wait.ready", "lock.acquired"]) == (held, [line["event"] for line in written])
    assert {"r1"} == {line["run_id"] for line in written}
    assert written[0]["timestamp"] <= written[1]["timestamp"] <= written[2]["timestamp"]


def test_a_warning_is_never_held(lines: Callable[[], list[dict]]) -> None:
    from job.logs import log

    log.info("run.start", command="run")
    log.warning("run.start", note="a warning goes out at once, and the held lines before it")

    assert [("info", "run.start"), ("warning", "run.start")] == [(line["level"], line["event"]) for line in lines()]


def test_a_known_secret_never_reaches_a_line(lines: Callable[[], list[dict]]) -> None:
    from job.logs import log, redactor

    redactor.add(["hunter2-pw"])
    log.info("lock.waiting", holder={"application_name": "app", "query": "SET password = 'hunter2-pw'"},
             url="postgresql://u:other-pw@h/db")

    (line,) = lines()
    assert "hunter2-pw" not in json.dumps(line) and "other-pw" not in json.dumps(line)


def test_a_stream_nobody_reads_never_blocks_the_job() -> None:
    """A pipe that fills up: writing lines returns at once, whatever is queued (past the bound,
    lines are dropped), and drain gives up at its timeout."""
    import os
    import time

    from job.logs import Output

    reading, writing = os.pipe()
    stream = os.fdopen(writing, "w")
    out = Output(stream)
    started = time.monotonic()
    for _ in range(200_000):  # far more than the pipe (64 KiB) and the queue (4 MiB) hold
        out.write("x" * 60 + "\n")
    out.drain(0.5)
    assert time.monotonic() - started < 10
    os.close(reading)


@pytest.mark.parametrize("stream", ["closed", "none"])
def test_a_closed_or_missing_stream_costs_lines_only(stream: str) -> None:
    """stdout closed before the job started (None in Python), or closed under it: writes are dropped."""
    from job.logs import Output

    target = None
    if stream == "closed":
        target = io.StringIO()
        target.close()
    out = Output(target)

    assert (5, False) == (out.write("line\n"), out.isatty())
    out.drain(1)
