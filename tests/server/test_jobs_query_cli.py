"""`trunkline jobs` as a user runs it: a real `trunkline` child process
against a real server (in this test's loop, SQLite history): filters, cursor
following for the table and --json, CSV / JSON lines export to stdout, and
the server's refusal of a bad filter as exit 2."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
from server.conftest import MakeServer
from server.helpers import Srv
from support import KEY, SECRET

import trunkline.server.job_export as job_export


async def cli(srv: Srv, *args: str) -> tuple[int, str, str]:
    """Run `python -m trunkline jobs ARGS` against `srv`; (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "TRUNKLINE_"))}
    env.update(
        COLUMNS="250",
        NO_COLOR="1",
        TRUNKLINE_URL=srv.url,
        LIVEKIT_API_KEY=KEY,
        LIVEKIT_API_SECRET=SECRET,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trunkline",
        "jobs",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def history(make_server: MakeServer, tmp_path: Path) -> tuple[Srv, list[str], list[str]]:
    """A server whose history holds 6 refusals in `support` and 3 in `sales`."""
    srv = await make_server({"server": {"data_dir": str(tmp_path)}})
    support = [(await srv.dispatch("support", max_wait_s=0))["job_id"] for _ in range(6)]
    sales = [(await srv.dispatch("sales", max_wait_s=0, room="r"))["job_id"] for _ in range(3)]
    return srv, support, sales


async def test_filters_and_json_follow_cursors(history: tuple[Srv, list[str], list[str]]) -> None:
    """--since 1h --outcome no_capacity --pool support --json lists that
    pool's refusals newest first; a --limit over several server pages is
    gathered by following next_cursor, and --cursor goes on from it."""
    srv, support, sales = history
    rc, out, err = await cli(
        srv, "--since", "1h", "--outcome", "no_capacity", "--pool", "support", "--json"
    )
    assert rc == 0, err
    body = json.loads(out)
    assert [j["job_id"] for j in body["jobs"]] == support[::-1]
    assert body["next_cursor"] is None
    rc, out, err = await cli(srv, "--room", "r", "--until", str(time.time() + 60), "--json")
    assert rc == 0, err
    assert [j["job_id"] for j in json.loads(out)["jobs"]] == sales[::-1]

    rc, out, err = await cli(srv, "--limit", "4", "--json")
    assert rc == 0, err
    first = json.loads(out)
    everything = (support + sales)[::-1]
    assert [j["job_id"] for j in first["jobs"]] == everything[:4]
    rc, out, err = await cli(srv, "--cursor", first["next_cursor"], "--json")
    assert rc == 0, err
    assert [j["job_id"] for j in json.loads(out)["jobs"]] == everything[4:]


async def test_table_lists_jobs(history: tuple[Srv, list[str], list[str]]) -> None:
    """The table shows one line per job, with its pool and state."""
    srv, support, _ = history
    rc, out, err = await cli(srv, "--pool", "support", "--state", "no_capacity")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if ln.startswith("AJ_")]
    assert [ln.split()[0] for ln in lines] == support[::-1]
    assert all("support" in ln and "no_capacity" in ln for ln in lines)


async def test_export_csv_and_jsonl_to_stdout(
    history: tuple[Srv, list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--format csv writes the header and every matching job (through several
    server pages); jsonl one JSON record with its trace per line."""
    srv, support, sales = history
    monkeypatch.setattr(job_export, "PAGE", 2)  # the server, in this process, pages by 2
    rc, out, err = await cli(srv, "--format", "csv", "--since", "1d")
    assert rc == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert tuple(rows[0]) == job_export.CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == (support + sales)[::-1]
    rc, out, err = await cli(srv, "--format", "jsonl", "--pool", "sales")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [j["job_id"] for j in lines] == sales[::-1]
    assert all(j["trace"] for j in lines)
    rc, out, _ = await cli(srv, "--format", "jsonl", "--limit", "3")
    assert rc == 0
    assert len(out.splitlines()) == 3


async def test_bad_filter_exits_2_with_the_servers_reason(
    history: tuple[Srv, list[str], list[str]],
) -> None:
    """A time the server cannot read, or an unknown outcome, is exit 2 with
    the server's message naming the parameter (table and export alike)."""
    srv, _, _ = history
    rc, _, err = await cli(srv, "--since", "yesterday")
    assert rc == 2
    assert "'since' must be Unix seconds" in err
    rc, _, err = await cli(srv, "--outcome", "busy", "--format", "csv")
    assert rc == 2
    assert "unknown outcome 'busy'" in err


def test_table_shows_callers_text_literally(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller number or reason holding rich markup is printed as text, not
    interpreted (the caller chooses the From of its INVITE)."""
    from trunkline.cli.jobs import render

    monkeypatch.setenv("COLUMNS", "250")

    job = {
        "job_id": "AJ_1",
        "agent_name": "support",
        "state": "no_capacity",
        "reason": "[bold]why[/bold]",
        "created_at": time.time(),
        "sip": {"from": "[red]+1555[/red]", "trunk": "main", "final_status": 503},
    }
    render([job])
    out = capsys.readouterr().out
    assert "[red]+1555[/red]" in out
    assert "[bold]why[/bold]" in out
