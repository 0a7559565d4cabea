"""An app settings module as many are: it configures logging, and prints, when imported; its
code relies on that configuration (`check`, at import and as env.py migrates)."""

import logging
import logging.config
import sys

import structlog

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": True,
    "formatters": {"plain": {"format": "app %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"}},
    "root": {"level": "DEBUG", "handlers": ["out"]},
    "loggers": {"alembic": {"level": "DEBUG", "handlers": ["out"], "propagate": False},
                "app.audit": {"level": "WARNING", "handlers": ["out"], "propagate": False}},
})
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, force=True)
logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
logging.getLogger("alembic").propagate = False
structlog.configure(processors=[structlog.dev.ConsoleRenderer()])
print("settings loaded")


def check(at_import: bool = False) -> None:
    """The configuration the app asked for is the one its code finds, as under bare Alembic (where a
    stock env.py's fileConfig(alembic.ini) comes after this module's import: it resets the root
    logger and the loggers it names, not the app's own)."""
    problems = []
    audit = logging.getLogger("app.audit")
    if audit.level != logging.WARNING or not audit.handlers:
        problems.append("app.audit's level and handler")
    if at_import and logging.getLogger().level != logging.DEBUG:
        problems.append(f"root level {logging.getLevelName(logging.getLogger().level)}")
    if at_import and logging.getLogger("alembic").propagate:
        problems.append("alembic propagating")
    if problems:
        raise RuntimeError(f"the app's logging configuration is gone: {', '.join(problems)}")
    audit.disabled = False  # (fileConfig disables the loggers it does not name; the app turns its own back on)
    audit.warning("migrating")


check(at_import=True)
