"""The only place structlog and stdlib logging are configured.

One JSON object per line on stdout (a console renderer when a person is watching), with
`timestamp`, `level`, `event` and `run_id` on every line. Alembic's and SQLAlchemy's stdlib
records go through the same processors, and every line passes the redactor last.

structlog loads when the first line is written, except in `run`: loading it costs a start-up
about 40 ms of CPU, as much as the interpreter and the driver together, and when many replicas
start at once on a few cores that decides when the first of them reaches the migration lock. So
`run` holds its first lines (each with the time it happened) until it has tried the lock; a
replica that must wait lowers its priority first (`job.lock`). A failed first connect, a warning
or an error, and the end of the run release the held lines too.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import select
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from contextlib import contextmanager as _contextmanager
from typing import Any, Iterable, Iterator

from job.config import redact_url

# stdlib logging's numbers, without importing it before structlog loads
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Log:
    """The job's logger. Lines go to structlog, loaded with the first one; lines logged while
    held wait, with the time they happened, until `release()`."""

    def __init__(self) -> None:
        self._logger: Any = None
        self._held: list[tuple[str, str, dict[str, Any]]] | None = None

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def _log(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self._held is not None and event in HELD and LEVELS[level] < LEVELS["warning"]:
            self._held.append((level, event, {**fields, "timestamp": _now()}))
            return
        self.release()
        getattr(self._logger, level)(event, **fields)

    def hold(self) -> None:
        """Hold the lines from now until `release()`."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Load structlog if it is not yet, and write the held lines."""
        if self._logger is None:
            _load()
        held, self._held = self._held or [], None
        for level, event, fields in held:
            getattr(self._logger, level)(event, **fields)


# The lines `run` holds (configure(hold=True)) until its first other line (lock.acquired,
# lock.waiting, wait.retry, a warning): by then it has tried the lock. Loading structlog costs a
# start-up about as much CPU as the interpreter and the driver together, and when sixteen replicas
# start at once on two cores that decides when the first of them reaches the lock (make bench's
# 16-replica row: 3.36 s median with, 3.44 s without).
HELD = frozenset({"run.start", "wait.ready"})

log = Log()
_options: dict[str, Any] = {}
_run_id = ""
# fields every line carries for a while (`about`): a rehearsal's lines name the copy they are of
_about: dict[str, Any] = {}


def _now() -> str:
    """The time as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    return datetime.datetime.fromtimestamp(time.time(), datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class Redactor:
    """Masks the known secrets, and the password part of any URL, in every string of an event."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.secrets: list[str] = []
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        for secret in values:
            # the secret as typed, inside a URL, and escaped as repr() and JSON write it (SQLAlchemy's
            # debug lines show bound parameters in repr form)
            forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret), repr(secret)[1:-1],
                     json.dumps(secret)[1:-1]}
            for form in forms:
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
            return _capped(self.text(value))
        if isinstance(value, (list, tuple)):
            return [self._value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        return value


redactor = Redactor()

# the longest text a log line carries in one field; a longer one is cut, and says so
FIELD_LIMIT = 8000


def _capped(text: str) -> str:
    if len(text) <= FIELD_LIMIT:
        return text
    return f"{text[:FIELD_LIMIT]}… [cut: {len(text) - FIELD_LIMIT} more characters]"


class Output:
    """A stream for the job's lines that never blocks it and never breaks it: a reader that stopped
    reading (a full pipe), went away (`| head`, a crashed log shipper) or a stream that was closed
    from the start costs lines, never the lock, the exit code or the termination message.

    Lines are queued and written by a thread of their own, in order; past QUEUED bytes waiting,
    lines are dropped (and the drop said when the writer catches up); from the first broken pipe on,
    everything is dropped. At exit, `drain` gives the writer a bounded moment to finish."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = stream is None or getattr(stream, "closed", False)
        self._lines: collections.deque[str] = collections.deque()
        self._queued = 0
        self._dropped = 0
        self._busy = False  # a line is being written
        self._partial = ""  # the start of a line whose end is still to come
        self._ready = threading.Condition()
        self._writer: threading.Thread | None = None
        outputs.append(self)

    def write(self, text: str) -> int:
        if self.gone or not text:
            return len(text)
        written = len(text)
        with self._ready:
            # whole lines only, each in one write: print() writes a line's text and its newline
            # apart, and the fleet's runs (job.fleet) share one stdout, where halves would interleave
            self._partial += text
            if not text.endswith("\n"):
                return written
            text, self._partial = self._partial, ""
            if not self._lines and not self._busy and len(text) <= select.PIPE_BUF and self._room():
                # the common case, written at once: a pipe with room for PIPE_BUF bytes takes a line
                # that long without blocking (a thread switch per line costs many replicas starting
                # together on a few cores: make bench's 16-replica row)
                self._put(text)
                return written
            if self._queued + len(text) > QUEUED:
                self._dropped += 1
                return written
            self._lines.append(text)
            self._queued += len(text)
            self._ready.notify()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_out, name="output", daemon=True)
            self._writer.start()
        return written

    def _put(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError, AttributeError):  # a broken pipe, a closed stream
            self.gone = True

    def _room(self) -> bool:
        """Whether the stream takes a line now: a pipe or socket with room, a file, a terminal (or
        a stream in memory, which has no descriptor)."""
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError, AttributeError):
            return True
        try:
            return bool(select.select([], [fd], [], 0)[1])
        except (OSError, ValueError):
            return False

    def flush(self) -> None:
        """(lines are flushed as they are written)"""

    def isatty(self) -> bool:
        try:
            return not self.gone and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def drain(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the queued lines to be written."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._lines or self._busy) and not self.gone:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._ready.wait(min(remaining, 0.05))

    def _write_out(self) -> None:
        while not self.gone:
            with self._ready:
                while not self._lines:
                    self._ready.wait()
                text = self._lines.popleft()
                self._queued -= len(text)
                self._busy = True
                dropped, self._dropped = self._dropped, 0
            if dropped:
                text = json.dumps({"event": "log.dropped", "lines": dropped, "run_id": _run_id,
                                   "level": "warning", "timestamp": _now()}) + "\n" + text
            self._put(text)
            with self._ready:
                self._busy = False
                self._ready.notify_all()


# every Output made, for `drain` at exit
outputs: list[Output] = []
# the most bytes of lines waiting to be written to one stream
QUEUED = 4 << 20


def _forget_outputs() -> None:
    """In a forked process (job.fleet's runs): the parent's outputs, their queues and writer
    threads are the parent's; this process makes its own on first use."""
    outputs.clear()


os.register_at_fork(after_in_child=_forget_outputs)


def output_for(stream: Any) -> Output:
    """The one Output of `stream` (stdout or stderr), made on first use."""
    for output in outputs:
        if output.stream is stream:
            return output
    return Output(stream)


def drain(timeout: float) -> None:
    """At exit: give every output's writer up to `timeout` seconds in all to finish."""
    deadline = time.monotonic() + timeout
    for output in outputs:
        output.drain(max(deadline - time.monotonic(), 0))


@_contextmanager
def about(**fields: Any) -> Iterator[None]:
    """Every line logged in the body carries `fields`."""
    before = dict(_about)
    _about.update(fields)
    try:
        yield
    finally:
        _about.clear()
        _about.update(before)


def new_run_id() -> str:
    # what secrets.token_hex(8) returns, without importing secrets (or uuid, which costs more than
    # the rest of a run at head)
    return os.urandom(8).hex()


def configure(log_format: str = "json", level: str = "info", run_id: str | None = None, stream: Any = None,
              hold: bool = False) -> str:
    """Set how lines are written (structlog loads with the first line, or at once if it already
    has); with `hold`, lines wait for `log.release()`. Return the run_id every line carries."""
    global _run_id
    _run_id = run_id or new_run_id()
    _options.update(log_format=log_format, level=level, stream=output_for(stream or sys.stdout))
    if hold:
        log.hold()
    if log._logger is not None:
        _load()
    return _run_id


def _load() -> None:
    """Set up structlog and route stdlib logging through it."""
    import logging

    import structlog

    if not _options:
        configure()
    log_format, level, stream = _options["log_format"], LEVELS[_options["level"]], _options["stream"]
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def stamped(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        """A held line keeps the time it happened."""
        when = event.pop("timestamp", None)
        return stamp(logger, name, event) if when is None else {**event, "timestamp": when}

    def with_run_id(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": _run_id, **_about, **event}

    shared = [with_run_id, structlog.processors.add_log_level, stamped]
    if log_format == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        tail: list[Any] = [redactor, renderer]
    else:
        tail = [structlog.processors.format_exc_info, redactor, structlog.processors.JSONRenderer()]
    # A logger of our own rather than structlog.configure(): the project's modules, imported in
    # this process by env.py, may configure structlog globally for their app.
    log._logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    handler.setLevel(level)
    handler.addFilter(_shown)
    _options["handler"] = handler
    # the job's defaults, before any of the project's code runs (which may change them as it likes)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(level)
    # (SQLAlchemy formats a message for every statement its loggers are enabled for: only in debug)
    logging.getLogger("sqlalchemy").setLevel(logging.DEBUG if _options["level"] == "debug" else logging.WARNING)
    reclaim()


# Records that reach the job's handler but are not shown: SQLAlchemy echoes every statement at INFO,
# Alembic announces each of its plugins: below WARNING, only in debug.
QUIET_UNLESS_DEBUG = ("sqlalchemy", "alembic.runtime.plugins")
# The AWS SDK's debug lines carry request headers (a session token among them): never shown, by any
# handler (these are the job's own S3 client's loggers, which the project's code does not use).
SECRET_BEARING = ("boto3", "botocore", "s3transfer", "urllib3")


def _shown(record: Any) -> bool:
    """The job's handler's filter (its level does the rest)."""
    quiet = record.name.startswith(QUIET_UNLESS_DEBUG) and _options["level"] != "debug"
    return not quiet or record.levelno >= LEVELS["warning"]


def reclaim() -> None:
    """After the project's code ran (env.py, the modules it imports, revision files), which may
    configure logging as it likes (a stock env.py calls fileConfig; app settings modules call
    dictConfig or basicConfig on import): its configuration stands, as under bare Alembic (its
    handlers, levels, disabled loggers). The job only makes sure its own handler is still on the
    root logger (dictConfig and fileConfig replace the root's handlers), and that no handler of the
    project's writes to stdout, which is the job's JSON lines: those write to stderr instead."""
    import logging

    handler = _options.get("handler")
    if handler is None:
        return
    root = logging.getLogger()
    if handler not in root.handlers:
        root.addHandler(handler)
    stdout = {id(s) for s in (sys.__stdout__, _options["stream"].stream) if s is not None}
    loggers = [root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for other in logger.handlers:
            if other is not handler and isinstance(other, logging.StreamHandler) and id(other.stream) in stdout:
                other.setStream(sys.stderr)
    level = LEVELS[_options["level"]]
    for name in SECRET_BEARING:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


@_contextmanager
def project_code() -> Iterator[None]:
    """While the project's code runs, whatever it prints, or logs through a handler it makes then,
    goes to stderr; each logging configuration call it makes does what it says and is followed by
    `reclaim` (so Alembic's records that follow still reach the job's handler), and so is the end."""
    import contextlib
    import functools
    import logging.config

    def then_reclaim(configure: Any) -> Any:
        @functools.wraps(configure)
        def configured(*args: Any, **kwargs: Any) -> Any:
            try:
                return configure(*args, **kwargs)
            finally:
                reclaim()
        return configured

    saved = (logging.config.fileConfig, logging.config.dictConfig, logging.basicConfig)
    logging.config.fileConfig, logging.config.dictConfig, logging.basicConfig = map(then_reclaim, saved)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logging.config.fileConfig, logging.config.dictConfig, logging.basicConfig = saved
        reclaim()


def show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """`warnings.showwarning` for the job: a Python warning (a deprecation in a dependency, the
    project's own) is a log line like any other, not raw text beside them."""
    log.warning("python.warning", category=category.__name__, message=str(message), source=f"{filename}:{lineno}")


def run_id() -> str:
    """This run's id, as every log line carries it."""
    return _run_id


def terminate(explicit: str | None, message: str) -> None:
    """Write the outcome where Kubernetes shows it (`kubectl describe pod`), when that file is there
    (MIGRATE_TERMINATION_LOG: a path set is always written)."""
    path = Path(explicit or "/dev/termination-log")
    if not (path.exists() or (explicit and path.parent.is_dir())):
        return
    try:
        path.write_bytes(termination_message(message))
    except OSError:
        pass


# Kubernetes keeps the first 4096 bytes of /dev/termination-log
TERMINATION_LIMIT = 4096


def termination_message(message: str) -> bytes:
    """The message as UTF-8 within Kubernetes' limit, cut on a character boundary and marked as cut."""
    encoded = message.encode() + b"\n"
    if len(encoded) <= TERMINATION_LIMIT:
        return encoded
    marker = " [cut]\n".encode()
    return encoded[: TERMINATION_LIMIT - len(marker)].decode(errors="ignore").encode() + marker
