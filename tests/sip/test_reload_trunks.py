"""What a reload does with `[sip]` besides swapping trunks (runtime/reload.py):
listener keys and the section itself need a restart; a LiveKit SIP trunk needs
the room binder that only a start creates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import KEY, SECRET

from trunkline.config import ConfigError, load_config
from trunkline.runtime.reload import Reloader

LIVEKIT = '[livekit]\nurl = "ws://127.0.0.1:7880"\napi_key = "k"\napi_secret = "s"\n'
TRUNK = """
[sip.trunks.{name}]
numbers = ["{number}"]
pool = "support"
downstream = "127.0.0.1:5080"
downstream_kind = "{kind}"
"""


def reloader(path: Path, text: str) -> Reloader:
    """A Reloader over the config in `path` (written from `text`); nothing else
    is wired, so only what does not touch the dispatcher or keys may change."""
    path.write_text(f'[keys]\n{KEY} = "{SECRET}"\n' + text)
    none: Any = None
    return Reloader(load_config(path), none, none)


def test_a_livekit_trunk_needs_a_restart_on_a_server_started_without_one(
    tmp_path: Path,
) -> None:
    """Adding a downstream_kind = "livekit" trunk is refused naming its key (the room
    binder starts with the server); with one at start, another is accepted."""
    path = tmp_path / "t.toml"
    sip = "[sip]\nport = 5060\n"
    r = reloader(path, LIVEKIT + sip + TRUNK.format(name="a", number="1", kind="gateway"))
    path.write_text(path.read_text() + TRUNK.format(name="lk", number="2", kind="livekit"))
    with pytest.raises(ConfigError) as err:
        r.load()
    assert "sip.trunks.lk.downstream_kind" in str(err.value)
    assert "needs a restart" in str(err.value)
    r = reloader(path, LIVEKIT + sip + TRUNK.format(name="a", number="1", kind="livekit"))
    path.write_text(path.read_text() + TRUNK.format(name="lk", number="2", kind="livekit"))
    assert [t.name for t in r.load().sip.trunks] == ["a", "lk"]  # type: ignore[union-attr]


async def test_sip_appearing_or_its_listener_changing_needs_a_restart(tmp_path: Path) -> None:
    """A [sip] section added by a reload is listed as `sip` under restart_needed (no
    listener runs); nothing else is reported as changed."""
    path = tmp_path / "t.toml"
    r = reloader(path, "")
    path.write_text(
        path.read_text() + "[sip]\n" + TRUNK.format(name="a", number="1", kind="gateway")
    )
    out = await r.reload()
    assert out.restart_needed == ["sip"]
    assert out.changed == []
