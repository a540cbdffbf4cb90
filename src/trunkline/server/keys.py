"""Typed keys for what `build_app` stores on the aiohttp application."""

from __future__ import annotations

from aiohttp import web

from trunkline.auth import Authenticator
from trunkline.config import Config
from trunkline.runtime.autoscaler import AutoscaleController
from trunkline.runtime.dispatcher import Dispatcher
from trunkline.runtime.idempotency import IdempotencyKeys
from trunkline.runtime.metrics import Metrics
from trunkline.runtime.sip_server import SipServer

CONFIG = web.AppKey("config", Config)
AUTH = web.AppKey("auth", Authenticator)
METRICS = web.AppKey("metrics", Metrics)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SIP = web.AppKey[SipServer | None]("sip")
AUTOSCALER = web.AppKey("autoscaler", AutoscaleController)
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyKeys)
