"""Structured logs: one line per event, fixed messages with fields, and levels an
operator can live with (a job's success path logs nothing at INFO)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from protoworker import ProtoWorker
from support import ServerProcess, wait_until

from trunkline.common.logs import JsonFormatter, TextFormatter


def record(msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("trunkline.test", logging.INFO, __file__, 1, msg, None, None)
    for k, v in fields.items():
        setattr(rec, k, v)
    return rec


def test_text_values_that_would_break_the_line_are_quoted() -> None:
    """Spaces, quotes, `=` and line breaks in a value are JSON-quoted: one event,
    one parseable line."""
    line = TextFormatter().format(
        record("worker refused", reason="bad\ntoken", worker_id="AW_1", note="a=b", empty="")
    )
    assert "\n" not in line
    assert 'reason="bad\\ntoken"' in line
    assert "worker_id=AW_1" in line
    assert 'note="a=b"' in line
    assert 'empty=""' in line


def test_json_fields_never_overwrite_the_core_keys() -> None:
    """A field named like a core key (`level`, `ts`, ...) is kept under `field_<name>`."""
    out = json.loads(JsonFormatter().format(record("job ended", level="x", job_id="AJ_1")))
    assert out["level"] == "info"
    assert out["field_level"] == "x"
    assert out["msg"] == "job ended"
    assert out["job_id"] == "AJ_1"


async def test_json_logs_keep_the_success_path_quiet(tmp_path: Path) -> None:
    """`--log-format json` at INFO: every line is a JSON object with a fixed message;
    a job that succeeds logs nothing at INFO, while workers joining do."""
    srv = ServerProcess(tmp_path, "[pools.quiet]\nmax_jobs_per_worker = 2\n")
    srv.config.write_text(srv.config.read_text().replace("[keys]", 'log_format = "json"\n[keys]'))
    srv.start()
    w = ProtoWorker.autonomous(srv.ws_url, "quiet", max_jobs=2)
    try:
        await w.connect()
        job_ids = []
        for _ in range(3):
            _, job = await srv.post("/v1/dispatches", {"agent_name": "quiet", "wait": True})
            job_ids.append(job["job_id"])
            await w.succeed(job["job_id"])

        async def all_ended() -> bool:
            jobs = [await srv.get(f"/v1/jobs/{j}") for j in job_ids]
            return all(j["state"] == "succeeded" for j in jobs)

        await wait_until(all_ended, what="jobs succeeded")
    finally:
        await w.close()
        srv.stop()
    lines = [json.loads(ln) for ln in srv.log.read_text().splitlines() if ln.startswith("{")]
    messages = {ln["msg"] for ln in lines}
    assert "worker registered" in messages
    assert not any(j in json.dumps(ln) for ln in lines for j in job_ids)
    for ln in lines:
        assert set(ln) >= {"ts", "level", "logger", "msg"}
        assert ln["msg"] == ln["msg"].strip()
        assert not any(ch.isdigit() for ch in ln["msg"])  # variable parts live in fields
