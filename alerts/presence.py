"""Which WebSocket connections are open, for whom, with which filters: a Redis hash
(field: channel name) written by the consumers and read by the worker to make one
Delivery row per alert and subscribed user. Entries not refreshed within
ALERTS_PRESENCE_TTL_S (a crashed server) are ignored and removed."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

from .rules import Filters, parse_filters

log = logging.getLogger(__name__)
_sync_client: redis.Redis | None = None
_async_clients: dict[int, aioredis.Redis] = {}


@dataclass(frozen=True)
class Connection:
    channel: str
    user_id: int
    filters: Filters
    seen: float


def _key() -> str:
    config = settings.CHANNEL_LAYERS["default"].get("CONFIG", {})
    return f"{config.get('prefix', 'asgi')}:alerts:presence"


def _encode(user_id: int, filters: Filters, now: float) -> str:
    return json.dumps({"u": user_id, "f": filters.as_dict(), "seen": now})


def _decode(channel: str, raw: Any) -> Connection | None:
    decoded = _decode_value(raw)
    return None if decoded is None else Connection(channel, *decoded)


@functools.lru_cache(maxsize=4096)
def _decode_value(raw: Any) -> tuple[int, Filters, float] | None:
    """An entry changes only when its connection refreshes it or changes its filters, and
    is read for every candle: decoded once."""
    try:
        data = json.loads(raw)
        return int(data["u"]), parse_filters(data["f"]), float(data["seen"])
    except (ValueError, KeyError, TypeError):
        return None


def sync_client() -> redis.Redis:
    global _sync_client
    if _sync_client is None:
        _sync_client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
    return _sync_client


def live_connections(now: float | None = None) -> list[Connection]:
    """Open connections; [] (logged) when Redis cannot be read."""
    now = time.time() if now is None else now
    try:
        raw = sync_client().hgetall(_key())
    except redis.RedisError as err:
        log.warning("alert presence unreadable: %s", err)
        return []
    live, stale = [], []
    for channel, value in raw.items():
        conn = _decode(channel, value)
        if conn is None or now - conn.seen > settings.ALERTS_PRESENCE_TTL_S:
            stale.append(channel)
        else:
            live.append(conn)
    if stale:
        with contextlib.suppress(redis.RedisError):
            sync_client().hdel(_key(), *stale)
    return live


def _aclient() -> aioredis.Redis:
    import asyncio

    loop_id = id(asyncio.get_running_loop())
    client = _async_clients.get(loop_id)
    if client is None:
        client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        _async_clients[loop_id] = client
    return client


async def announce(channel: str, user_id: int, filters: Filters) -> bool:
    try:
        await _aclient().hset(_key(), channel, _encode(user_id, filters, time.time()))
    except (redis.RedisError, OSError) as err:
        log.warning("alert presence not written: %s", err)
        return False
    return True


async def withdraw(channel: str) -> None:
    try:
        await _aclient().hdel(_key(), channel)
    except (redis.RedisError, OSError) as err:
        log.warning("alert presence not removed: %s", err)
