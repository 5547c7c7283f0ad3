"""Real local servers for delivery tests: an SMTP server (aiosmtpd) and a webhook
receiver (http.server), both on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import contextlib
import email
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from stack import free_port


@dataclass
class Received:
    rcpt: list[str]
    message: Message
    at: float
    peer: Any = None
    """The client's (host, port): one per SMTP connection."""

    @property
    def body(self) -> str:
        payload = self.message.get_payload(decode=True)
        return payload.decode() if isinstance(payload, bytes) else str(payload)


@dataclass
class SmtpSink:
    """Accepts mail; refuses recipients starting with ``refuse`` (550) or ``later`` (451)."""

    messages: list[Received] = field(default_factory=list)
    controller: Controller | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refuse"):
            return "550 5.1.1 no such user"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content)
        self.messages.append(Received(list(envelope.rcpt_tos), message, time.time(), session.peer))
        return "250 Message accepted"

    def restart(self) -> None:
        """Stop (dropping every client connection) and listen again on the same port."""
        assert self.controller is not None
        old = self.controller
        old.stop()
        self.controller = Controller(self, hostname=old.hostname, port=old.port)
        self.controller.start()


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[SmtpSink, int]]:
    sink = SmtpSink()
    port = free_port()
    sink.controller = Controller(sink, hostname="127.0.0.1", port=port)
    sink.controller.start()
    try:
        yield sink, port
    finally:
        sink.controller.stop()


@dataclass
class Hook:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> dict:
        return json.loads(self.body)


class _Handler(BaseHTTPRequestHandler):
    server: _HookServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.server.hooks.append(Hook(self.path, dict(self.headers), body, time.time()))
        if self.path.startswith("/hang"):
            time.sleep(self.server.hang_s)
        status = {"/fail": 500, "/bad": 400}.get(self.path, 200)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _HookServer(ThreadingHTTPServer):
    daemon_threads = True
    hooks: list[Hook]
    hang_s: float


@contextlib.contextmanager
def webhook_server(hang_s: float = 3.0) -> Iterator[tuple[list[Hook], int]]:
    server = _HookServer(("127.0.0.1", 0), _Handler)
    server.hooks = []
    server.hang_s = hang_s
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.hooks, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
