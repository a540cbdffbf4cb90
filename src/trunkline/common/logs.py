"""Structured logs: fixed messages, variable parts as fields.

`text` renders `HH:MM:SS.mmm LEVEL logger: message key=value ...`; `json`
renders one JSON object per line (`ts`, `level`, `logger`, `msg`, then the
fields). Fields come from the `extra=` of each call. Either way one event is
one line: a text value holding spaces, quotes, `=` or line breaks is
JSON-quoted, and tracebacks are the only multi-line output (in JSON they are
the `exc` field). A field named like a core JSON key is kept as `field_<name>`.

Levels: INFO is for what an operator acts on or wants in the record (server
start, workers joining and leaving, jobs that end badly); the success path of
a single job and anything per frame are DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


_CORE_JSON_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{ts}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "]
        parts.append(record.getMessage())
        for k, v in _fields(record).items():
            parts.append(f" {k}={_text_value(v)}")
        if record.exc_info:
            parts.append("\n" + self.formatException(record.exc_info))
        if record.stack_info:
            parts.append("\n" + self.formatStack(record.stack_info))
        return "".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in _fields(record).items():
            out[f"field_{k}" if k in _CORE_JSON_KEYS else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger for the process (called once by the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is one line per request: noise at INFO under load.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
