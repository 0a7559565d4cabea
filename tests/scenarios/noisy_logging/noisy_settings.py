"""An app settings module as many are: it configures logging, and prints, when imported."""

import logging
import logging.config
import sys

import structlog

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": True,
    "handlers": {"out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}},
    "root": {"level": "DEBUG", "handlers": ["out"]},
    "loggers": {"alembic": {"level": "DEBUG", "handlers": ["out"], "propagate": False}},
})
logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, force=True)
logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
logging.getLogger("alembic").propagate = False
structlog.configure(processors=[structlog.dev.ConsoleRenderer()])
print("settings loaded")
