"""A WebSocket client of the real ASGI application (config.asgi: origin check, session and
token authentication, the alerts consumer) in this process, kept open on an event loop of
its own so that many frames go through one connection."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from asgiref.testing import ApplicationCommunicator

REPLIES = {"error", "pong", "subscribed", "snapshot", "result"}


class ConsumerDied(AssertionError):
    """The connection was closed or the application raised."""


class Socket:
    def __init__(self, headers: list[tuple[bytes, bytes]], path: str = "/ws/alerts/"):
        from config.asgi import application

        self.loop = asyncio.new_event_loop()
        scope = {
            "type": "websocket",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers,
            "subprotocols": [],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        # channels.testing would import daphne (not installed): the same, by hand
        self.comm = self.run_sync(lambda: ApplicationCommunicator(application, scope))
        self.first: dict[str, Any] | None = None
        self.close_code: int | None = None
        self.accepted = self.run(self._connect())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def run_sync(self, make: Any) -> Any:
        async def build() -> Any:
            return make()

        return self.run(build())

    async def _connect(self) -> bool:
        """Accepted or not; then the first frame (the snapshot) or the close code."""
        await self.comm.send_input({"type": "websocket.connect"})
        answer = await self.comm.receive_output(timeout=10)
        if answer["type"] != "websocket.accept":
            self.close_code = answer.get("code")
            return False
        message = await self.comm.receive_output(timeout=10)
        if message["type"] == "websocket.close":
            self.close_code = message.get("code")
        else:
            self.first = json.loads(message["text"])
        return True

    async def _next(self, timeout: float = 10) -> dict[str, Any]:
        """The application's next frame. Not ApplicationCommunicator.receive_output with a
        short timeout and a loop: its timeout cancels the application, so an answer slower
        than that timeout (a busy machine) would kill the connection under test."""
        get = asyncio.ensure_future(self.comm.output_queue.get())
        await asyncio.wait({get, self.comm.future}, timeout=timeout, return_when="FIRST_COMPLETED")
        if not get.done():
            get.cancel()
            if self.comm.future.done():
                raise ConsumerDied(f"the consumer died: {self._ending()}")
            raise ConsumerDied(f"no answer within {timeout:.0f} s")
        message = get.result()
        if message["type"] == "websocket.close":
            raise ConsumerDied(f"the consumer closed the connection ({message.get('code')})")
        return json.loads(message["text"])

    def _ending(self) -> str:
        future = self.comm.future
        if future.cancelled():
            return "cancelled"
        exc = future.exception()
        return f"{type(exc).__name__}: {exc}" if exc else "returned"

    async def _send(self, text: str | None = None, data: bytes | None = None) -> None:
        frame: dict[str, Any] = {"type": "websocket.receive"}
        frame.update({"text": text} if text is not None else {"bytes": data})
        await self.comm.send_input(frame)

    async def _exchange(self, text: str | None, data: bytes | None) -> list[dict[str, Any]]:
        await self._send(text, data)
        await self._send(json.dumps({"type": "ping"}))
        frames = []
        while True:
            frame = await self._next()
            if frame == {"type": "pong"}:
                return frames
            frames.append(frame)

    def send(self, text: str | None = None, data: bytes | None = None) -> list[dict[str, Any]]:
        """Send one frame, then a ping; the frames answered before the pong."""
        return self.run(self._exchange(text, data))

    def close(self) -> None:
        from asgiref.sync import sync_to_async
        from django.db import connections

        try:
            self.run(self.comm.send_input({"type": "websocket.disconnect", "code": 1000}))
            self.run(self.comm.wait(timeout=5))
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - the application may be gone
            # CancelledError is no Exception: escaping this fixture's teardown, it would skip
            # the teardowns after it, the database flush among them
            pass
        finally:
            # the consumer's queries ran on asgiref's shared thread: close its connection
            self.run(sync_to_async(connections.close_all, thread_sensitive=True)())
            self.loop.close()


def token_headers(token: str, origin: str = "http://127.0.0.1") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"127.0.0.1"),
        (b"origin", origin.encode()),
        (b"authorization", f"Token {token}".encode()),
    ]
