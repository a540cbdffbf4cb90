"""Configuration errors: collect every problem of a file, report them all at once.

Theory of operation: a loader passes one `ErrorCollector` through every section
it checks (``[server]``, ``[pools.x]``, ``[sip]``, ...). Each check records
``section.key: message`` and carries on with the next key, so a user fixing a
file sees every problem in one run instead of one per restart. At the end the
loader calls `ErrorCollector.raise_if_any`, which raises one `ConfigError`
listing them all.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigError", "ErrorCollector"]


class ConfigError(ValueError):
    """The configuration is invalid. The message lists every problem found;
    `errors` holds them one per entry (``"section.key: message"``)."""

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors: tuple[str, ...] = tuple(errors) or (message,)


class ErrorCollector:
    """Problems found so far, in the order they were found."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[str] = []

    def add(self, key: str, message: str) -> None:
        """Record that `key` (a dotted path such as ``pools.a.max_strikes``, or a
        section name) is wrong: `message` says what is allowed."""
        self._items.append(f"{key}: {message}")

    @property
    def items(self) -> tuple[str, ...]:
        """Every problem recorded, as ``"key: message"`` lines."""
        return tuple(self._items)

    def __len__(self) -> int:
        """How many problems were recorded; compare before and after a check to
        learn whether that check found any."""
        return len(self._items)

    def raise_if_any(
        self, header: str | None = "invalid configuration:", error: type[ConfigError] = ConfigError
    ) -> None:
        """Return if nothing was recorded; otherwise raise `error` listing every
        problem, one per line: indented under `header`, or one per line alone
        when `header` is None."""
        if not self._items:
            return
        if header is None:
            message = "\n".join(self._items)
        else:
            message = header + "\n  " + "\n  ".join(self._items)
        raise error(message, self._items)
