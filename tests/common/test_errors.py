"""The config error collector: every problem recorded, one error listing them all."""

from __future__ import annotations

import pytest

from trunkline.common.errors import ConfigError, ErrorCollector


class SectionError(ConfigError):
    """A section's own error type, as [sip] has."""


def test_nothing_recorded_raises_nothing() -> None:
    """An empty collector lets the loader return."""
    e = ErrorCollector()
    e.raise_if_any()
    assert len(e) == 0
    assert e.items == ()


def test_every_problem_is_listed_under_the_header_in_order() -> None:
    """Problems come out as `key: message` lines, in the order found, under the header."""
    e = ErrorCollector()
    e.add("server.port", "must be 0..65535 (got -1)")
    e.add("sip", "expected a table")
    with pytest.raises(ConfigError) as err:
        e.raise_if_any()
    assert str(err.value) == (
        "invalid configuration:\n  server.port: must be 0..65535 (got -1)\n  sip: expected a table"
    )
    assert err.value.errors == ("server.port: must be 0..65535 (got -1)", "sip: expected a table")
    assert isinstance(err.value, ValueError)


def test_without_a_header_each_problem_is_one_line_of_the_given_type() -> None:
    """header=None gives bare lines; `error` picks the raised subclass."""
    e = ErrorCollector()
    e.add("sip.port", "expected a port number 0-65535, got 70000")
    with pytest.raises(SectionError, match=r"^sip\.port: expected a port number") as err:
        e.raise_if_any(header=None, error=SectionError)
    assert str(err.value) == "sip.port: expected a port number 0-65535, got 70000"


def test_a_plain_config_error_lists_its_message_as_its_one_error() -> None:
    """A ConfigError raised with a message only (e.g. unreadable file) has that one error."""
    assert ConfigError("cannot read config file x").errors == ("cannot read config file x",)
