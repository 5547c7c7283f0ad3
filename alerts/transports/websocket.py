"""WebSocket: one Redis broadcast per batch of alerts to the web processes, whose hub
hands them to the connected consumers; each consumer applies its own subscription
filters (the same ones the presence registry holds, from which the delivery rows are
made)."""

from __future__ import annotations

from typing import Any

import redis

from .. import hub
from . import Outgoing, Transport, TransportError, register


@register
class WebSocketTransport(Transport):
    kind = "websocket"
    queued = False

    def broadcast(self, messages: list[dict[str, Any]]) -> int:
        """Returns how many web processes listen."""
        try:
            return hub.publish(messages)
        except redis.RedisError as err:
            raise TransportError(f"{type(err).__name__}: {err}"[:300]) from err

    def send(self, outgoing: Outgoing) -> None:
        self.broadcast([outgoing.alert])
