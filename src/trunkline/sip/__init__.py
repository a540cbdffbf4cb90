"""SIP admission edge: answer every inbound call fast, place it or refuse it cleanly.

:class:`SipEdge` is the sans-IO core (bytes and ``now`` in, bytes out);
:class:`trunkline.runtime.sip_server.SipServer` runs it on asyncio UDP, TCP
and TLS listeners; the scheduler plugs in through :class:`AdmissionBackend`;
:func:`parse_sip_config` reads ``[sip]``. Who may start a call is decided in
:mod:`trunkline.sip.policy` (per-trunk ``allowed_addresses``, digest
authentication in :mod:`trunkline.sip.digest`, per-source limits in
:mod:`trunkline.sip.limits`) before anything reaches the backend. See
``docs/sip.md`` for the trust boundary and what the edge answers when.
"""

from trunkline.sip.backend import AdmissionBackend
from trunkline.sip.config import SipConfig, SipConfigError, Trunk, parse_sip_config
from trunkline.sip.edge import SipEdge
from trunkline.sip.message import SipParseError, SipRequest, SipResponse, parse_message
from trunkline.sip.transaction import Outgoing, Peer, TimerConfig

__all__ = [
    "AdmissionBackend",
    "Outgoing",
    "Peer",
    "SipConfig",
    "SipConfigError",
    "SipEdge",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "TimerConfig",
    "Trunk",
    "parse_message",
    "parse_sip_config",
]
