"""Log formatting for worker processes: fixed message, then `key=value` fields.

Theory of operation: log calls pass variable parts in `extra=`; this formatter
appends every attribute that is not a standard `LogRecord` field, so operators
see the fields without the messages embedding them.
"""

from __future__ import annotations

import logging

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class FieldsFormatter(logging.Formatter):
    """`logging.Formatter` that appends `extra=` fields as `key=value` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        if not fields:
            return text
        head, sep, tail = text.partition("\n")
        return f"{head} {' '.join(fields)}{sep}{tail}"


def configure_logging(level: int, *, prefix: str = "") -> None:
    """Give the root logger one stderr handler with `FieldsFormatter` (once)."""
    root = logging.getLogger()
    root.setLevel(level)
    if any(getattr(h, "_trunkline", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._trunkline = True  # type: ignore[attr-defined]
    handler.setFormatter(
        FieldsFormatter(f"%(asctime)s %(levelname)s %(name)s{prefix}: %(message)s")
    )
    root.addHandler(handler)
