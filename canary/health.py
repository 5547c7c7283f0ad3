"""Health of every moving part, for GET /health. Never raises."""

import asyncio
import time
import uuid
from collections.abc import Callable

from asgiref.sync import async_to_sync
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
from django.conf import settings
from django.db import connection

from .heartbeat import KEY_BEAT, KEY_WORKER, last_seen, redis_client

CHANNEL_LAYER_TIMEOUT_S = 2.0


def _database() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"ok": True, "vendor": connection.vendor}


def _redis() -> dict:
    redis_client().ping()
    return {"ok": True}


def _channel_layer() -> dict:
    """A send/receive round trip on a private layer instance, bounded in time.

    The process-wide layer's receive state (lock, buffers, event loop) is shared with the
    WebSocket consumers of the same process; receiving on it from a sync view's thread
    can block, and every sync view with it."""
    layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)

    async def round_trip() -> bool:
        try:
            channel = await layer.new_channel(prefix="health")
            token = uuid.uuid4().hex
            await layer.send(channel, {"type": "health.ping", "token": token})
            message = await asyncio.wait_for(layer.receive(channel), CHANNEL_LAYER_TIMEOUT_S)
            return message.get("token") == token
        finally:
            if hasattr(layer, "close_pools"):
                await layer.close_pools()

    return {"ok": async_to_sync(round_trip)()}


def _heartbeat(key: str) -> Callable[[], dict]:
    def check() -> dict:
        seen = last_seen(key)
        if seen is None:
            return {"ok": False, "error": "no heartbeat yet"}
        age = time.time() - seen
        return {"ok": age <= settings.HEARTBEAT_STALE_S, "age_s": round(age, 1)}

    return check


CHECKS: dict[str, Callable[[], dict]] = {
    "database": _database,
    "redis": _redis,
    "channel_layer": _channel_layer,
    "worker": _heartbeat(KEY_WORKER),
    "beat": _heartbeat(KEY_BEAT),
}


def health_report() -> tuple[bool, dict]:
    components = {}
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        result["ms"] = round((time.perf_counter() - started) * 1000, 1)
        components[name] = result
    healthy = all(c["ok"] for c in components.values())
    return healthy, {"status": "ok" if healthy else "degraded", "components": components}
