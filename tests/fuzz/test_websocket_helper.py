"""The in-process WebSocket client of these tests (tests/fuzz/websocket.py) on a slow
machine: an answer slower than usual is waited for, not taken for a dead consumer, and a
connection whose application is gone closes without raising (a CancelledError escaping a
fixture's teardown would skip the teardowns after it, the database flush among them, and
fail every later test on the rows left behind)."""

from __future__ import annotations

import asyncio

import pytest

from alerts.consumers import AlertConsumer

from .websocket import ConsumerDied, Socket, token_headers

pytestmark = [pytest.mark.django_db(transaction=True)]
NOT_AN_OBJECT = [{"type": "error", "error": "a message must be a JSON object"}]


def test_a_slow_answer_is_waited_for_and_the_connection_lives_on(api_token, monkeypatch):
    pong = AlertConsumer._ping

    async def slow_pong(self, content):
        await asyncio.sleep(0.6)
        await pong(self, content)

    monkeypatch.setattr(AlertConsumer, "_ping", slow_pong)
    sock = Socket(token_headers(api_token("ops", "Ops")))
    try:
        assert sock.send(text="[]") == NOT_AN_OBJECT
        assert sock.send(text="[]") == NOT_AN_OBJECT
        assert not sock.comm.future.done()
    finally:
        sock.close()


def test_a_dead_application_is_named_and_its_connection_closes_quietly(api_token):
    sock = Socket(token_headers(api_token("ops", "Ops")))
    sock.comm.future.cancel()
    with pytest.raises(ConsumerDied, match="the consumer died: cancelled"):
        sock.run(sock._next(timeout=5))
    sock.close()  # raises nothing
    assert sock.loop.is_closed()
