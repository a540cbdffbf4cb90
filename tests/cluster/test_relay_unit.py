"""server/relay.py's small pieces that need no servers."""

from __future__ import annotations

from trunkline.server import agent_ws, relay


def test_relay_frame_limit_is_the_agent_endpoints() -> None:
    """The pipe accepts from the owner exactly the frame size /agent accepts from a worker."""
    assert relay.MAX_FRAME_BYTES == agent_ws.MAX_FRAME_BYTES


def test_owner_urls_become_websocket_urls() -> None:
    """http(s) owner URLs map to ws(s); anything else is used as given."""
    assert relay._ws_url("http://10.0.0.1:7880") == "ws://10.0.0.1:7880"
    assert relay._ws_url("https://a.example") == "wss://a.example"
    assert relay._ws_url("ws://b:1") == "ws://b:1"
