"""What the fault tests share: a stack of real processes on a private Redis that can be
restarted on the same port, a cut for the database (a TCP proxy in front of PostgreSQL,
a directory link in front of SQLite), a candle streamer that retries like a real feed,
and WebSocket watchers that reconnect and keep what they received.

Every process and thread started here is stopped by the context manager that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import threading
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from aiosmtpd.controller import Controller
from stack import Stack, free_port, redis_server_binary, wait_for_port

from tests.alerts.helpers import candle as bar
from tests.alerts.servers import SmtpSink
from tests.e2e.conftest import ROOT, LiveStack, _stack_env

LOG_ROOT = ROOT / "var" / "test-logs"


# --------------------------------------------------------------------------- Redis


@dataclass
class PrivateRedis:
    """A redis-server of this test only, restartable on the same port. Configured as the
    project's own private Redis (`Stack.start_redis`): no persistence, so a restart loses
    every key, queued task and channel-layer group."""

    stack: Stack
    data_dir: Path
    port: int = field(default_factory=free_port)
    name: str = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server binary")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
                str(self.data_dir), "--save", "", "--appendonly", "no"]  # fmt: skip
        proc = self.stack.start(self.name, argv)
        wait_for_port(self.port, 15, proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stack.kill(self.name, sig)

    @property
    def up(self) -> bool:
        return self.name in self.stack.procs


@contextlib.contextmanager
def private_stack(
    env: dict[str, str] | None = None,
    *,
    web: bool = True,
    worker: bool = True,
    beat: bool = False,
    database_url: str | None = None,
    persistent: bool = False,
) -> Iterator[tuple[LiveStack, PrivateRedis]]:
    """uvicorn, a Celery worker (and beat) on the test database and a private Redis.
    `database_url` overrides the test database's URL (a cut in front of it); `persistent`
    keeps the configured CONN_MAX_AGE (see no_persistent_connections)."""
    from django.db import connection

    if not Path(str(connection.settings_dict["NAME"])).name.startswith("test"):
        raise RuntimeError(f"not a test database: {connection.settings_dict['NAME']}")
    stack = Stack(env={}, log_dir=LOG_ROOT / f"faults-{uuid.uuid4().hex[:8]}")
    redis = PrivateRedis(stack, stack.log_dir / "redis")
    port = free_port()
    try:
        redis.start()
        stack.env = _stack_env(redis.url)
        stack.env.update(env or {})
        if database_url:
            stack.env["DATABASE_URL"] = database_url
        if not persistent:
            stack.env["DATABASE_URL"] = no_persistent_connections(stack.env["DATABASE_URL"])
        if worker:
            stack.start_worker(concurrency=2)
        if beat:
            stack.start_beat()
        if web:
            stack.start_web(port)
        yield LiveStack(stack=stack, port=port), redis
    finally:
        stack.stop()


def no_persistent_connections(url: str) -> str:
    """PostgreSQL: CONN_MAX_AGE=0 for these processes. The configured 60 s leaks one
    connection per ASGI request (Django ticket #33497; tests/load/test_web_connections.py
    shows it): under the load of these tests it would exhaust the shared server's
    max_connections for everybody."""
    if not url.startswith("postgres"):
        return url
    return url + ("&" if "?" in url else "?") + "conn_max_age=0"


def restart_if_dead(stack: Stack, name: str = "worker") -> bool:
    """What a process supervisor does: start a process again that exited. True when it
    had exited."""
    proc = stack.procs.get(name)
    if proc is None or proc.poll() is None:
        return False
    stack.procs.pop(name)
    stack.start_worker(name=name, concurrency=2)
    return True


def tail(stack: Stack, lines: int = 40) -> str:
    """The end of every process log of a stack, for assertion messages."""
    out = []
    for log in sorted(stack.log_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"===== {log.name}\n" + "\n".join(text))
    return "\n".join(out)


# --------------------------------------------------------------------------- people, mail, data


def user_token(username: str, role: str, email: str = "") -> str:
    """A user in a role group and its API token (for tests that set up outside `db`)."""
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    from audit.roles import ensure_roles

    ensure_roles()
    user = User.objects.create_user(username=username, email=email, password=uuid.uuid4().hex)
    user.groups.add(Group.objects.get(name=role))
    return Token.objects.create(user=user).key


def flush_database() -> None:
    """Empty every table of the test database, as a transactional test does at its end."""
    from django.core.management import call_command
    from django.db import connection

    name = Path(str(connection.settings_dict["NAME"])).name
    if not name.startswith("test"):
        raise RuntimeError(f"refusing to flush {name!r}: not a test database")
    call_command("flush", interactive=False, verbosity=0)


@dataclass
class SlowSmtpSink(SmtpSink):
    """Accepts mail after `delay_s` (settable while it runs)."""

    delay_s: float = 0.0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super().handle_DATA(server, session, envelope)


@contextlib.contextmanager
def slow_smtp_server() -> Iterator[tuple[SlowSmtpSink, int]]:
    import logging

    logging.getLogger("mail.log").setLevel(logging.WARNING)
    sink = SlowSmtpSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


# --------------------------------------------------------------------------- database cut


class TcpCut:
    """A TCP proxy on 127.0.0.1 in front of a server. `cut()` drops every open connection
    and refuses new ones (the server looks unreachable); `restore()` forwards again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="tcp-cut", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()

    def cut(self) -> None:
        self._open.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.close()
        self._thread.join(timeout=2)


@dataclass
class DatabaseCut:
    """Makes the test database unreachable for processes given `url`, and back. PostgreSQL:
    through a TcpCut. SQLite: through a directory symlink that is removed (a missing
    directory cannot be opened, even by root) and put back."""

    url: str
    cut: Callable[[], None]
    restore: Callable[[], None]
    close: Callable[[], None]


@contextlib.contextmanager
def database_cut(tmp: Path) -> Iterator[DatabaseCut]:
    from django.db import connection

    conf = connection.settings_dict
    if not Path(str(conf["NAME"])).name.startswith("test"):
        raise RuntimeError(f"not a test database: {conf['NAME']}")
    if connection.vendor == "postgresql":
        proxy = TcpCut((conf["HOST"] or "127.0.0.1", int(conf["PORT"] or 5432)))
        url = f"postgres://{conf['USER'] or 'postgres'}@127.0.0.1:{proxy.port}/{conf['NAME']}"
        try:
            yield DatabaseCut(url, proxy.cut, proxy.restore, proxy.close)
        finally:
            proxy.close()
        return
    real = Path(conf["NAME"]).resolve()
    link = tmp / "dblink"

    def restore() -> None:
        if not link.is_symlink():
            link.symlink_to(real.parent, target_is_directory=True)

    def cut() -> None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()

    restore()
    try:
        yield DatabaseCut(f"sqlite:///{link / real.name}", cut, restore, cut)
    finally:
        cut()


# --------------------------------------------------------------------------- candles


def engulfing_series(n: int) -> list[dict]:
    """Blocks of four 5m candles: green, green, a small red, a green engulfing it (one
    bullish engulfing alert per block)."""
    out, price = [], 1.0
    for i in range(0, n, 4):
        up1, up2 = price * 1.001, price * 1.002
        red_close = up2 * 0.9995
        out += [
            bar(i, price, up1),
            bar(i + 1, up1, up2),
            bar(i + 2, up2, red_close),
            bar(i + 3, red_close * 0.9993, up2 * 1.0008),
        ]
        price = up2 * 1.0008
    return out[:n]


@dataclass
class Streamer:
    """POSTs candles one request at a time, every `pace_s`, like a feed: a request that
    fails (connection error or a 5xx) is sent again until it is answered 2xx or 4xx."""

    live: LiveStack
    token: str
    candles: list[dict[str, Any]]
    pace_s: float = 0.05
    retry_s: float = 0.2
    statuses: list[int] = field(default_factory=list)
    failures: int = 0
    sent: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Streamer:
        self._thread = threading.Thread(target=self._run, name="streamer", daemon=True)
        self._thread.start()
        return self

    def _post(self, candle: dict[str, Any]) -> int:
        while not self._stop.is_set():
            try:
                status, _ = self.live.request(
                    "POST", "/api/v1/market/candles", [candle], self.token
                )
            except (OSError, urllib.error.URLError, ValueError):
                status = 0
            if 200 <= status < 500:
                return status
            self.failures += 1
            time.sleep(self.retry_s)
        return 0

    def _run(self) -> None:
        for candle in self.candles:
            if self._stop.is_set():
                return
            self.statuses.append(self._post(candle))
            self.sent += 1
            time.sleep(self.pace_s)

    def wait(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


# --------------------------------------------------------------------------- WebSocket


@dataclass
class Watcher:
    """A WebSocket client that stays connected: on any drop it reconnects (every 0.2 s
    until it succeeds). Keeps each connection's snapshot and every live alert id."""

    url: str
    token: str
    origin: str
    live: list[int] = field(default_factory=list)
    snapshots: list[list[int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connects: int = 0
    drops: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._session(stop)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                self.drops += 1
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
                await asyncio.sleep(0.2)

    async def _session(self, stop: asyncio.Event) -> None:
        async with websockets.connect(
            self.url,
            additional_headers={"Authorization": f"Token {self.token}"},
            origin=self.origin,  # type: ignore[arg-type]
            open_timeout=5,
        ) as ws:
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 0.3)
                except TimeoutError:
                    continue
                self._take(json.loads(raw))

    def _take(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "snapshot":
            self.connects += 1
            self.snapshots.append([a["id"] for a in frame["alerts"]])
        elif frame.get("type") == "alert":
            self.live.append(frame["alert"]["id"])

    @property
    def seen(self) -> set[int]:
        return set(self.live).union(*map(set, self.snapshots))


class WatcherThread:
    """Runs watchers on an event loop of their own thread, until `stop()`."""

    def __init__(self, watchers: list[Watcher]):
        self.watchers = watchers
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="watchers", daemon=True)
        self._ready = threading.Event()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            self._ready.set()
            await asyncio.gather(*(w.run(self._stop) for w in self.watchers))

        self._loop.run_until_complete(main())
        self._loop.close()

    def start(self) -> WatcherThread:
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.1,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    label = what() if callable(what) else what
    raise AssertionError(f"{label}: not reached within {timeout:.0f} s")


@contextlib.contextmanager
def restored_connection() -> Iterator[None]:
    """The default database connection's settings put back (and the connection closed)
    after the block, whatever it pointed the connection at."""
    from django.db import connection

    saved = dict(connection.settings_dict)
    try:
        yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)
