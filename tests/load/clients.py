"""Load clients on loopback, shared by tests/load (small, checking correctness) and
bench/bench_load.py (the figures): many authenticated WebSocket clients that record every
alert they receive, an open-loop HTTP client that POSTs candles at a fixed rate, and the
resident memory of a process.

Everything is bounded: a number of clients or requests and a time limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident memory of a process, KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def database_handles(pid: int, database: str, port: int = 5432) -> int:
    """Open connections of a process to a database: established TCP sockets to `port`
    (PostgreSQL), or file descriptors on the SQLite file `database`."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    if not database.startswith("/"):
        sockets = {link[8:-1] for link in links if link.startswith("socket:[")}
        count = 0
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as rows:
                for row in list(rows)[1:]:
                    cols = row.split()
                    remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                    count += remote_port == port and cols[3] == "01" and cols[9] in sockets
        return count
    return sum(1 for link in links if link == database)


def make_viewers(count: int, prefix: str = "load") -> list[str]:
    """`count` users in the Viewer role (unusable passwords: nothing to hash) and their
    API tokens, in bulk."""
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    from audit.roles import ensure_roles

    ensure_roles()
    tag = uuid.uuid4().hex[:6]
    users = User.objects.bulk_create(
        User(username=f"{prefix}-{tag}-{n}", password="!unusable") for n in range(count)
    )
    viewer = Group.objects.get(name="Viewer")
    User.groups.through.objects.bulk_create(
        User.groups.through(user_id=u.pk, group_id=viewer.pk) for u in users
    )
    tokens = Token.objects.bulk_create(
        Token(user=u, key=uuid.uuid4().hex + uuid.uuid4().hex[:8]) for u in users
    )
    return [t.key for t in tokens]


# --------------------------------------------------------------------------- WebSocket


@dataclass
class Client:
    token: str
    ws: Any = None
    snapshot: list[int] | None = None
    alerts: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""


@dataclass
class Fleet:
    """Many WebSocket clients on one event loop."""

    url: str
    origin: str
    clients: list[Client]
    _readers: list[asyncio.Task] = field(default_factory=list)

    async def connect(self, parallel: int = 50, timeout: float = 30) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one(client: Client) -> None:
            async with gate:
                client.ws = await websockets.connect(
                    self.url,
                    additional_headers={"Authorization": f"Token {client.token}"},
                    origin=self.origin,  # type: ignore[arg-type]
                    open_timeout=timeout,
                    max_queue=None,
                )
                frame = json.loads(await asyncio.wait_for(client.ws.recv(), timeout))
                if frame.get("type") != "snapshot":
                    raise RuntimeError(f"first frame {frame}")
                client.snapshot = [a["id"] for a in frame["alerts"]]

        await asyncio.gather(*(one(c) for c in self.clients))
        self._readers = [asyncio.create_task(self._read(c)) for c in self.clients]

    async def _read(self, client: Client) -> None:
        try:
            async for raw in client.ws:
                frame = json.loads(raw)
                if frame.get("type") == "alert":
                    client.alerts.append((frame["alert"]["id"], time.time()))
        except websockets.ConnectionClosed as exc:
            client.error = f"closed {exc.rcvd.code if exc.rcvd else '-'}"

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Until every client has `count` alerts (False at the time limit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(c.alerts) >= count for c in self.clients):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(
            *(c.ws.close() for c in self.clients if c.ws is not None), return_exceptions=True
        )

    def lost(self, expected: list[int]) -> dict[str, int]:
        """Clients missing an expected alert, receiving one twice, or out of order."""
        missing = sum(1 for c in self.clients if {a for a, _ in c.alerts} != set(expected))
        doubled = sum(1 for c in self.clients if len(c.alerts) != len({a for a, _ in c.alerts}))
        disorder = sum(1 for c in self.clients if [a for a, _ in c.alerts] != expected)
        return {"missing": missing, "doubled": doubled, "out_of_order": disorder}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- HTTP load


@dataclass
class LoadResult:
    planned: int
    sent: int
    errors: int
    statuses: dict[int, int]
    latencies_ms: list[float]
    lag_ms: list[float]
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, q: float) -> float | None:
        return percentile(self.latencies_ms, q)

    def summary(self) -> str:
        median = statistics.median(self.latencies_ms) if self.latencies_ms else None
        return (
            f"{self.sent} of {self.planned} POSTs in {self.elapsed_s:.1f} s ({self.rate:.0f}/s), errors "
            f"{self.errors}, statuses {self.statuses}, latency p50 {median} p95 {self.p(95)} "
            f"max {max(self.latencies_ms, default=None)} ms"
        )


def post_load(
    host: str,
    port: int,
    token: str,
    body: Callable[[int], list[dict[str, Any]]],
    rate: float,
    seconds: float,
    threads: int = 16,
) -> LoadResult:
    """Open loop: request i is due at start + i/rate, whatever the previous answers;
    `threads` connections (HTTP/1.1, kept alive) each send one request at a time. Latency
    is measured from sending; lag is how late a request left after its due time (the
    server too slow to take them). Bounded in time: nothing is sent after the window (plus
    one second), and a request unanswered for 30 s counts as an error; what was due and not
    sent by then is `planned - sent`.

    The connections are tasks of one event loop writing prepared bytes and reading the
    answers' status and length: the load generator shares the machine with the server it
    measures, so it should take as little of it as it can (about 0.4 ms of CPU per request
    in bench_load against 0.6 ms for http.client in as many threads)."""
    try:
        from uvloop import new_event_loop  # the ASGI server's own loop, when installed
    except ImportError:
        new_event_loop = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_post_load(host, port, token, body, rate, seconds, threads))


class _Connection:
    """One kept-alive HTTP/1.1 connection sending prepared POSTs, opened when first used
    and again after a failure."""

    def __init__(self, host: str, port: int, head: bytes) -> None:
        self.host, self.port, self.head = host, port, head
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, payload: bytes) -> int:
        """The answer's status (its body read and dropped)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(payload), payload))
        status = int((await reader.readline()).split(b" ", 2)[1])
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ConnectionError("answer without a Content-Length")
        await reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def _post_load(
    host: str,
    port: int,
    token: str,
    body: Callable[[int], list[dict[str, Any]]],
    rate: float,
    seconds: float,
    connections: int,
) -> LoadResult:
    total = int(rate * seconds)
    counter = iter(range(total))
    result = LoadResult(total, 0, 0, {}, [], [], 0.0)
    start = time.monotonic() + 0.2
    last_send = start + seconds + 1.0
    head = (
        f"POST /api/v1/market/candles HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nAuthorization: Token {token}\r\n"
    ).encode()

    async def sender() -> None:
        conn = _Connection(host, port, head)
        while time.monotonic() < last_send and (i := next(counter, None)) is not None:
            due = start + i / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            payload = json.dumps(body(i)).encode()
            sent = time.monotonic()
            try:
                async with asyncio.timeout(30):
                    status = await conn.post(payload)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError):
                conn.close()
                status = 0
            result.sent += 1
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.latencies_ms.append((time.monotonic() - sent) * 1000)
            result.lag_ms.append(max(0.0, (sent - due) * 1000))
            result.errors += status not in (200, 201)
        conn.close()

    await asyncio.gather(*(sender() for _ in range(connections)))
    result.elapsed_s = time.monotonic() - start
    return result


def stream_candle(i: int, streams: int = 20, base_ms: int = 1_600_000_000_000) -> dict[str, Any]:
    """Candle i of a round robin over `streams` symbols, each stream's candles in order."""
    price = 1.0 + (i % 97) * 0.001
    return {
        "exchange": "load",
        "symbol": f"L{i % streams:02d}/BTC",
        "timeframe": "1m",
        "open_time_ms": base_ms + (i // streams) * 60_000,
        "open": price,
        "high": price * 1.002,
        "low": price * 0.998,
        "close": price * 1.001,
        "volume": 1.0 + i % 13,
    }
