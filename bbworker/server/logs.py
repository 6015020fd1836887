"""Logging: gunicorn's logging configuration for bb-worker, and JSON lines (LOG_FORMAT=json)."""
import json
import logging
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC ISO-8601), level, logger, message, and the
    record's `extra` fields (request_id, status, bytes_in, ... for access lines)."""

    def format(self, record):
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def config(level, fmt):
    """gunicorn's `logconfig_dict` (dict): its defaults plus the app's "bb_worker" loggers on
    stderr, at `level` ("info", ...); `fmt` "json" writes one JSON object per line."""
    stderr = {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stderr"}
    generic = {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
               "datefmt": "[%Y-%m-%d %H:%M:%S %z]"}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["error_console"], "propagate": False,
                               "qualname": "gunicorn.error"},
            "bb_worker": {"level": level, "handlers": ["console"], "propagate": False},
        },
        "handlers": {"console": stderr, "error_console": dict(stderr)},
        "formatters": {"generic": {"()": JsonFormatter} if fmt == "json" else generic},
    }
