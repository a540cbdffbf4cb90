"""`trunkline plan`: flags in, table or JSON out, exit code 2 on bad input."""

from __future__ import annotations

import json

import pytest

from trunkline.cli import main

# 12.03 erlangs (12.03 calls/min x 60 s): the published 20-servers-at-1 % point.
REFERENCE = ["plan", "--rate-per-min", "12.03", "--call-seconds", "60", "--cap", "4"]
REFERENCE += ["--cold-start-s", "2"]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Pins the table: offered load, Erlang B slots, replicas and spare appear; exit code 0."""
    assert main(REFERENCE) == 0
    out = capsys.readouterr().out
    assert "12.03 erl" in out
    assert "slots (Erlang B)" in out
    assert "5 replicas" in out
    assert "ceil(20 / 4) = 20 slots" in out
    assert "spare slots" in out
    assert "min replicas" in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Pins --json: one strict JSON document with the plan's numbers and nothing else."""
    assert main([*REFERENCE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["offered_load_erlangs"] == pytest.approx(12.03)
    assert data["fixed"]["slots"] == 20
    assert data["fixed"]["replicas"] == 5
    assert data["fixed"]["blocking_probability"] <= 0.01
    assert data["request"]["blocking_target"] == 0.01
    assert data["autoscale"]["exposure_s"] == 2.0
    assert data["autoscale"]["min_replicas"] * 4 >= data["autoscale"]["spare_slots"]


def test_rate_per_second_and_per_minute_agree(capsys: pytest.CaptureFixture[str]) -> None:
    """Pins the units: --rate 0.5 (per second) plans the same as --rate-per-min 30."""
    tail = ["--call-seconds", "180", "--cap", "4", "--cold-start-s", "1.5", "--json"]
    assert main(["plan", "--rate", "0.5", *tail]) == 0
    per_second = json.loads(capsys.readouterr().out)
    assert main(["plan", "--rate-per-min", "30", *tail]) == 0
    per_minute = json.loads(capsys.readouterr().out)
    assert per_second == per_minute


def test_wait_target_and_unstable_queue(capsys: pytest.CaptureFixture[str]) -> None:
    """Pins --wait-target sizing in JSON, and 'unbounded' wait in an overloaded table."""
    argv = ["plan", "--rate", "2", "--call-seconds", "180", "--cap", "4", "--cold-start-s", "20"]
    assert main([*argv, "--wait-target", "0.05", "--max-wait-s", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["request"]["blocking_target"] is None
    assert data["fixed"]["slots_for_wait"] == data["fixed"]["slots"]
    assert data["fixed"]["wait_exceeds_max_probability"] <= 0.05
    assert data["autoscale"]["exposure_s"] == 15.0

    assert main([*argv, "--blocking", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "unbounded" in out
    assert "without bound" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "-1"], "--rate must be a finite number > 0, got -1.0"),
        (["--rate-per-min", "0"], "--rate-per-min must be a finite number > 0, got 0.0"),
        (["--rate", "nan"], "--rate must be a finite number > 0"),
        (["--rate", "1", "--blocking", "1.5"], "--blocking must be strictly between 0 and 1"),
        (["--rate", "1", "--wait-target", "0"], "--wait-target must be strictly between 0 and 1"),
        (["--rate", "1", "--max-wait-s", "-2"], "--max-wait-s must be a finite number >= 0"),
        (["--rate", "1", "--cap", "0"], "--cap must be an integer >= 1, got 0"),
        (["--rate", "20000"], "needs more than 1000000 servers"),
    ],
)
def test_bad_values_exit_2_with_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pins exit code 2 and a message naming the flag (not the internal field) on bad values."""
    argv = ["plan", "--call-seconds", "60", "--cap", "4", "--cold-start-s", "2", *flags]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("trunkline plan: error: ")
    assert message in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--rate", "abc", "--call-seconds", "60", "--cap", "4", "--cold-start-s", "2"],
        ["plan", "--rate", "1", "--call-seconds", "60", "--cold-start-s", "2"],
        ["plan", "--call-seconds", "60", "--cap", "4", "--cold-start-s", "2"],
        ["plan", "--rate", "1", "--rate-per-min", "60", "--call-seconds", "60", "--cap", "4"],
        ["plan", "--rate", "1", "--call-seconds", "60", "--cap", "2.5", "--cold-start-s", "2"],
    ],
)
def test_unparseable_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Pins argparse-level errors (not a number, missing or conflicting flags): exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err
