"""`trunkline worker` argument handling (the running worker is tested elsewhere)."""

from __future__ import annotations

import sys

import pytest

from trunkline.cli import main


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command puts the current directory on sys.path.
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:run", "cannot load 'no_such_module_xyz:run'"),
        ("worker.agents:no_such_function", "cannot load"),
    ],
)
def test_bad_entrypoint_exits_2(
    spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An entrypoint that cannot be loaded exits 2 with a message naming it."""
    assert main(["worker", spec]) == 2
    assert message in capsys.readouterr().err


def test_invalid_max_jobs_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--max-jobs 0 exits 2 naming max_jobs."""
    assert main(["worker", "worker.agents:hold", "--max-jobs", "0"]) == 2
    assert "max_jobs must be at least 1" in capsys.readouterr().err


def test_help_lists_capacity_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """`trunkline worker --help` documents the capacity and connection flags."""
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-jobs", "--agent-name", "--url", "--api-key", "--api-secret"):
        assert flag in out
