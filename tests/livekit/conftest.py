"""Fixtures for the LiveKit bridge tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from livekit.lk_thread import DoubleThread


@pytest.fixture(scope="module")
def lk_double() -> Iterator[DoubleThread]:
    d = DoubleThread()
    try:
        yield d
    finally:
        d.close()
