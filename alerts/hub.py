"""Fan-out of alert broadcasts inside each ASGI process.

The worker PUBLISHes one Redis message per batch of alerts; each web process holds one
subscription and hands the alerts to its connected consumers, which apply their own
filters. One Redis message per alert and process instead of one per connection keeps
100 subscribers cheap. Best effort, like any socket push: the Delivery rows, made from
the presence registry, say who should have received what."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
from django.conf import settings

from . import presence

log = logging.getLogger(__name__)
SUBSCRIBE_TIMEOUT_S = 5.0
RETRY_S = 1.0

Frame = tuple[dict[str, Any], str]


class Listener(Protocol):
    async def alerts_received(self, frames: list[Frame]) -> None: ...


def _channel() -> str:
    config = settings.CHANNEL_LAYERS["default"].get("CONFIG", {})
    return f"{config.get('prefix', 'asgi')}:alerts:broadcast"


def publish(messages: list[dict[str, Any]]) -> int:
    """Broadcast alert messages to every web process; returns how many processes listen.
    Raises redis.RedisError."""
    return int(presence.sync_client().publish(_channel(), json.dumps(messages)))


class Hub:
    def __init__(self) -> None:
        self.listeners: set[Listener] = set()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def join(self, listener: Listener) -> None:
        """Register and wait until the process's subscription is live (so a Delivery row
        made after this never names a message this listener cannot get)."""
        self.listeners.add(listener)
        if self._task is None or self._task.done():
            self._ready.clear()
            self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), SUBSCRIBE_TIMEOUT_S)

    def leave(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except (redis.RedisError, OSError) as err:
                log.warning("alert broadcast subscription lost: %s", err)
            self._ready.clear()
            await asyncio.sleep(RETRY_S)

    async def _listen(self) -> None:
        client = aioredis.Redis.from_url(
            settings.REDIS_URL, socket_connect_timeout=2, health_check_interval=30
        )
        async with client, client.pubsub() as pubsub:
            await pubsub.subscribe(_channel())
            async for message in pubsub.listen():
                if message["type"] == "subscribe":
                    self._ready.set()
                elif message["type"] == "message":
                    await self._dispatch(message["data"])

    async def _dispatch(self, data: bytes) -> None:
        try:
            alerts = json.loads(data)
        except ValueError:
            log.warning("malformed alert broadcast ignored")
            return
        frames = [(a, json.dumps({"type": "alert", "alert": a})) for a in alerts]
        for listener in list(self.listeners):
            try:
                await listener.alerts_received(frames)
            except Exception:  # one broken socket must not stop the others
                log.exception("alert frames not sent to one connection")


_hubs: dict[int, Hub] = {}


def hub() -> Hub:
    """The hub of the running event loop (one per web process)."""
    loop_id = id(asyncio.get_running_loop())
    if loop_id not in _hubs:
        _hubs[loop_id] = Hub()
    return _hubs[loop_id]
