"""The ASGI application's HTTP side (config.asgi_handler): the middleware chain is built
synchronously, each request is handed once to a kept thread that also closes it (a
streamed response is read there too), and a request through the ASGI app gets what the
middleware and the API do (headers, authentication, a stored candle)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

URL = "/api/v1/market/candles"
CANDLE = {
    "exchange": "binance",
    "symbol": "ETH/BTC",
    "timeframe": "1m",
    "open_time_ms": 1_600_000_000_000,
    "open": 1.0,
    "high": 1.1,
    "low": 0.9,
    "close": 1.05,
    "volume": 3.0,
}


def asgi_request(method: str, path: str, body: bytes = b"", token: str = "") -> tuple[int, dict]:
    status, headers, _ = asgi_exchange(method, path, body, token)
    return status, headers


def asgi_exchange(
    method: str, path: str, body: bytes = b"", token: str = ""
) -> tuple[int, dict, bytes]:
    from config.asgi import application

    path, _, query = path.partition("?")
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    if token:
        headers.append((b"authorization", f"Token {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    async def run() -> None:
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await application(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, content


@pytest.fixture
def request_threads():
    """The thread of each request_started and request_finished signal, in order."""
    from django.core import signals

    seen: list[tuple[str, threading.Thread]] = []

    def started(**kwargs):
        seen.append(("started", threading.current_thread()))

    def finished(**kwargs):
        seen.append(("finished", threading.current_thread()))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield seen
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


def test_the_middleware_chain_is_synchronous():
    from asgiref.sync import iscoroutinefunction

    from config.asgi import django_asgi_app
    from config.asgi_handler import SyncChainASGIHandler

    assert isinstance(django_asgi_app, SyncChainASGIHandler)
    assert not iscoroutinefunction(django_asgi_app._middleware_chain)


@pytest.mark.django_db(transaction=True)
def test_a_request_through_the_asgi_app(api_token):
    from trading.models import Candle

    body = json.dumps([CANDLE]).encode()
    status, headers = asgi_request("POST", URL, body)
    assert status == 401
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    status, _ = asgi_request("POST", URL, body, token=api_token())
    assert status == 201
    assert Candle.objects.filter(symbol="ETH/BTC", open_time_ms=CANDLE["open_time_ms"]).exists()


def test_each_request_runs_in_one_thread_kept_from_request_to_request(request_threads):
    body = json.dumps([CANDLE]).encode()
    for _ in range(3):
        assert asgi_request("POST", URL, body)[0] == 401
    assert [event for event, _ in request_threads] == ["started", "finished"] * 3
    threads = {thread for _, thread in request_threads}
    assert len(threads) == 1
    [thread] = threads
    assert thread.name.startswith("http") and thread is not threading.main_thread()


@pytest.mark.django_db(transaction=True)
def test_a_streamed_response_is_read_and_sent_from_its_request_thread(api_token, request_threads):
    from audit.services import audit_record

    for i in range(3):
        audit_record(action=f"test.stream.{i}", actor="test", payload={"i": i})
    status, headers, content = asgi_exchange(
        "GET",
        "/api/v1/audit/export?action_prefix=test.stream.",
        token=api_token("viewer", "Viewer"),
    )
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in content.splitlines()]
    assert [line["action"] for line in lines] == [f"test.stream.{i}" for i in range(3)]
    assert [event for event, _ in request_threads] == ["started", "finished"]
    assert request_threads[0][1] is request_threads[1][1]


def test_async_code_called_from_a_request_runs_on_the_servers_event_loop():
    """A channel-layer send from a view (async_to_sync) must run on the server's loop, where
    the layer's connections live, not on a loop of its own in another thread."""
    from asgiref.sync import async_to_sync
    from django.core import signals

    ran_in: list[threading.Thread] = []

    async def where() -> None:
        ran_in.append(threading.current_thread())

    def started(**kwargs):
        async_to_sync(where)()

    signals.request_started.connect(started)
    try:
        assert asgi_request("POST", URL, json.dumps([CANDLE]).encode())[0] == 401
    finally:
        signals.request_started.disconnect(started)
    assert ran_in == [threading.current_thread()]  # the thread running the test's loop


def test_the_web_process_collector_is_tuned_once_built_unless_told_not_to(settings):
    """WEB_GC_GEN0: what exists once the application is built is frozen out of the
    collections and young collections are spaced out; 0 leaves the collector alone (as in
    this suite's own process)."""
    import gc

    from config.asgi import tune_gc

    assert settings.WEB_GC_GEN0 == 0
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        assert tune_gc(0) is False
        assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
        marker = [object()]  # a container the collector tracks, made before the tuning
        assert tune_gc(25_000) is True
        assert gc.get_threshold() == (25_000, *threshold[1:])
        assert gc.get_freeze_count() > frozen
        assert not any(ref is marker for ref in gc.get_objects())  # frozen: not in a generation
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
