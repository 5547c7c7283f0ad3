"""The open-loop POST client itself (tests/load/clients.post_load), against a plain HTTP
server on loopback: every request is sent once, statuses and errors are counted as
answered, and a connection the server drops is opened again."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .clients import post_load


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept alive, as the client expects
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        item = json.loads(self.rfile.read(int(self.headers["Content-Length"])))[0]
        type(self).seen.append({"i": item["i"], "auth": self.headers["Authorization"]})
        if item["i"] == 3:
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)  # dropped without an answer
            return
        status = 500 if item["i"] % 5 == 4 else 201
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_every_request_is_sent_once_and_its_answer_counted():
    _Handler.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = post_load(
            "127.0.0.1", server.server_address[1], "tok", lambda i: [{"i": i}], 50, 0.4, 2
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.planned == result.sent == 20
    assert sorted(s["i"] for s in _Handler.seen) == list(range(20))
    assert {s["auth"] for s in _Handler.seen} == {"Token tok"}
    assert result.statuses == {0: 1, 201: 15, 500: 4}
    assert result.errors == 5
    assert len(result.latencies_ms) == len(result.lag_ms) == 20
