"""`trunkline demo` end to end, without a terminal (as CI runs it)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_small_burst_passes_without_a_tty() -> None:
    """A small burst: every call placed within the cap, plain progress lines,
    both tables and a PASS verdict, exit code 0."""
    args = ["--calls", "5", "--cap", "2", "--max-replicas", "3", "--call-seconds", "0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "trunkline", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "burst: 5 calls of 0.5 s at once" in out
    assert "scale up 1->3" in out
    assert "queued for" in out
    assert "peak slots" in out
    assert "verdict: PASS: cap respected: yes (peak 2 of 2 slots" in out
    assert "calls lost: 0 of 5" in out


def test_demo_refuses_bad_arguments() -> None:
    """Impossible settings are refused with exit code 2 before anything starts."""
    proc = subprocess.run(
        [sys.executable, "-m", "trunkline", "demo", "--min-replicas", "3", "--max-replicas", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--min-replicas <= --max-replicas" in proc.stderr
