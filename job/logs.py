"""The only place structlog and stdlib logging are configured.

One JSON object per line on stdout (a console renderer when a person is watching), with
`timestamp`, `level`, `event` and `run_id` on every line. Alembic's and SQLAlchemy's stdlib
records go through the same processors, and every line passes the redactor last.
"""

from __future__ import annotations

import logging
import secrets
import sys
import urllib.parse
from typing import Any, Iterable

import structlog

from job.config import redact_url

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

log = structlog.get_logger("migrate-job")


class Redactor:
    """Masks the known secrets, and the password part of any URL, in every string of an event."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        for secret in values:
            # the secret as typed and as it appears inside a URL
            for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret)}:
                if form and form not in self.secrets:
                    self.secrets.append(form)
        self.secrets.sort(key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "***")
        return redact_url(value)

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        return {k: self._value(v) for k, v in event.items()}

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (list, tuple)):
            return [self._value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        return value


redactor = Redactor()


class Output:
    """A stream for log lines that outlives its reader: a reader that went away (`| head`, a crashed
    log shipper) must not abort a migration half-way. From the first broken pipe on, lines are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.gone = True

    def isatty(self) -> bool:
        return self.stream.isatty()


def new_run_id() -> str:
    # secrets, not uuid: importing uuid costs more than the rest of a run at head
    return secrets.token_hex(8)


def configure(log_format: str = "json", level: str = "info", run_id: str | None = None, stream: Any = None) -> str:
    """Set up structlog and route stdlib logging through it; return the run_id every line carries."""
    stream = Output(stream or sys.stdout)
    run_id = run_id or new_run_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(run_id=run_id)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        tail: list[Any] = [redactor, renderer]
    else:
        tail = [structlog.processors.format_exc_info, redactor, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # SQLAlchemy echoes every statement at INFO: only in debug.
    logging.getLogger("sqlalchemy").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("alembic").setLevel(LEVELS[level])
    # Alembic announces each of its plugins at INFO: only in debug
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    return run_id


def run_id() -> str:
    """This run's id, as every log line carries it."""
    return structlog.contextvars.get_contextvars().get("run_id", "")
