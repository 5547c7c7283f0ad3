"""Alert speed: ``python bench/bench_alerts.py`` (``make bench`` runs it with the others).

1. Detectors backtest throughput (from bench_detectors).
2. End to end on a stack of its own: uvicorn + one Celery worker per queue (candle
   processing, deliveries, the rest: WORKERS), a scratch PostgreSQL database
   ``bench_alerts`` when DATABASE_URL points at PostgreSQL (else a scratch SQLite file), a
   private Redis and a real SMTP server in its own process. 100 WebSocket subscribers; one
   candle POSTed every 50 ms for 10 s, each engulfing the previous one (20 alerts/s).
   Figures: POST to WebSocket receipt p50/p95/p99 and the median of each hop, messages lost
   (each client's receipts compared with its Delivery rows, and rows never marked sent),
   POST to SMTP receipt p95, CPU per candle of each process, and the machine's load (the 2
   cores are shared with whatever else runs).

Bounded in time: every wait has a deadline; a run takes under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from bench.bench_detectors import DATA as DETECTOR_DATA  # noqa: E402
from bench.bench_detectors import VECTOR_GOAL, vector_rate  # noqa: E402

SUBSCRIBERS = 100
RATE_PER_S = 20
DURATION_S = 10
WS_GOAL_MS = 100.0
SMTP_GOAL_MS = 2000.0
# name: (queues, processes). Candles of one stream are processed one transaction at a
# time, so a second process only overlaps one candle's broadcast and bookkeeping with the
# next candle's detection.
WORKERS: dict[str, tuple[tuple[str, ...], int]] = {
    "worker-candles": (("alerts.candles",), 2),
    "worker-deliver": (("alerts.deliver",), 1),
    "worker": (("celery",), 1),
}
DB_PREFIX = "bench_alerts"
START_MS = 1_600_000_000_000
STEP_MS = 300_000


def _row(figure: str, value: Any, unit: str, goal: str, ok: bool) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered))) - 1))]


# --------------------------------------------------------------------------- environment


def _database_url(var: Path) -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        path = var / "bench_alerts.sqlite3"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"
    import psycopg

    parts = urlsplit(url)
    name = _scratch_name(url)
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return urlunsplit(parts._replace(path=f"/{name}"))


def _scratch_name(url: str) -> str:
    """The scratch database, named after DATABASE_URL's (``bench_alerts_<name>``), so that
    runs against different databases of one server never drop each other's."""
    base = re.sub(r"[^a-z0-9_]", "_", urlsplit(url).path.strip("/").lower())
    if not base or base.startswith(DB_PREFIX):
        return base or DB_PREFIX
    return f"{DB_PREFIX}_{base}"[:63]


def _drop_database(url: str) -> None:
    if not url.startswith(("postgres://", "postgresql://")):
        return
    import psycopg

    parts = urlsplit(url)
    name = urlsplit(url).path.strip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _env(database_url: str, redis_url: str, smtp_port: int, var: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        DEBUG="false",
        SECRET_KEY=env.get("SECRET_KEY") or secrets.token_urlsafe(40),
        SECURE_SSL_REDIRECT="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        EMAIL_URL=f"smtp://127.0.0.1:{smtp_port}",
        CHANNELS_PREFIX=f"bench-{uuid.uuid4().hex[:6]}",
        CELERY_TASK_ALWAYS_EAGER="false",
        VAR_DIR=str(var),
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ALERTS_WEBHOOK_URLS", None)
    return env


# --------------------------------------------------------------------------- SMTP sink

SMTP_SINK = """
import email, sys, time
from aiosmtpd.controller import Controller

out = open(sys.argv[2], "a", buffering=1)

class Sink:
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content)
        out.write(f"{message.get('X-Alert-Id')} {time.time()}\\n")
        return "250 OK"

controller = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
sys.stdin.read()
controller.stop()
"""


@dataclass
class _Mail:
    path: Path

    def received(self) -> dict[int, float]:
        found: dict[int, float] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                alert_id, _, at = line.partition(" ")
                if alert_id.isdigit():
                    found.setdefault(int(alert_id), float(at))
        return found


@contextlib.contextmanager
def _smtp(var: Path) -> Iterator[tuple[_Mail, int]]:
    """A real SMTP server in its own process (so the clients here do not slow it down)."""
    from stack import free_port, wait_for_port

    port = free_port()
    path = var / "smtp-received.txt"
    path.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", SMTP_SINK, str(port), str(path)], stdin=subprocess.PIPE
    )
    try:
        wait_for_port(port, 15, proc)
        yield _Mail(path), port
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- data


def _setup_users() -> tuple[list[tuple[int, str]], str]:
    """SUBSCRIBERS viewers with tokens and one Ops user with an email (default email)."""
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    def make(name: str, group: str, email: str = "") -> User:
        user = User(username=name, email=email)
        user.set_unusable_password()
        user.save()
        user.groups.add(Group.objects.get(name=group))
        return user

    ops = make("bench-ops", "Ops", "ops@bench.example")
    viewers = [make(f"bench-viewer-{i}", "Viewer") for i in range(SUBSCRIBERS)]
    tokens = Token.objects.bulk_create(
        [Token(user=u, key=secrets.token_hex(20)) for u in [ops, *viewers]]
    )
    return [(t.user_id, t.key) for t in tokens[1:]], tokens[0].key


def _candle(i: int) -> dict:
    """Bodies centred on 100 and growing 1 % per candle, colours alternating: every
    candle after the first engulfs the previous one."""
    half = 0.1 * 1.01**i
    o, c = (100 + half, 100 - half) if i % 2 == 0 else (100 - half, 100 + half)
    return {
        "exchange": "bench",
        "symbol": "BENCH/USDT",
        "timeframe": "5m",
        "open_time_ms": START_MS + i * STEP_MS,
        "open": o,
        "high": max(o, c),
        "low": min(o, c),
        "close": c,
        "volume": 1.0,
    }


def _post(base_url: str, token: str, candle: dict, posted: dict[int, float]) -> int:
    """POST one candle; its send time goes into ``posted``. Called from one thread, so
    candles reach the server in order (a reordered one would be stored as late)."""
    request = urllib.request.Request(
        f"{base_url}/api/v1/market/candles", data=json.dumps([candle]).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", f"Token {token}")
    posted[candle["open_time_ms"]] = time.time()
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


# --------------------------------------------------------------------------- clients


@dataclass
class _Client:
    user_id: int
    received: dict[int, tuple[int, float]] = field(default_factory=dict)


async def _listen(ws: Any, client: _Client, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            raw = await asyncio.wait_for(ws.recv(), 0.5)
        except TimeoutError:
            continue
        now = time.time()
        frame = json.loads(raw)
        if frame.get("type") == "alert":
            alert = frame["alert"]
            client.received.setdefault(alert["id"], (alert["event_ms"], now))


def _tree(pid: int) -> list[int]:
    """pid and its children (a Celery worker's pool processes)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children, from /proc."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _cpu_sample(stack: Any) -> dict[str, float]:
    sample = {name: _cpu_s(proc.pid) for name, proc in stack.procs.items()}
    sample["bench clients"] = time.process_time()
    return sample


async def _scenario(
    base: str, ws_url: str, users: list[tuple[int, str]], ops_token: str, stack: Any
):
    import websockets

    clients = [_Client(uid) for uid, _ in users]
    sockets = []
    for (_, token), _client in zip(users, clients, strict=True):
        ws = await websockets.connect(
            f"{ws_url}/ws/alerts/",
            additional_headers={"Authorization": f"Token {token}"},
            origin=base,
            open_timeout=20,
            max_queue=None,
        )
        await asyncio.wait_for(ws.recv(), 20)  # snapshot
        sockets.append(ws)
    stop = asyncio.Event()
    listeners = [
        asyncio.create_task(_listen(ws, c, stop)) for ws, c in zip(sockets, clients, strict=True)
    ]
    await asyncio.to_thread(_post, base, ops_token, _candle(0), {})
    await asyncio.sleep(1.0)
    cpu_before = _cpu_sample(stack)
    posted: dict[int, float] = {}
    posts: list[asyncio.Future] = []
    pool = ThreadPoolExecutor(max_workers=1)
    count = RATE_PER_S * DURATION_S
    start = time.monotonic()
    for i in range(1, count + 1):
        await asyncio.sleep(max(0.0, start + i / RATE_PER_S - time.monotonic()))
        candle = _candle(i)
        posts.append(
            asyncio.get_running_loop().run_in_executor(pool, _post, base, ops_token, candle, posted)
        )
    statuses = await asyncio.gather(*posts, return_exceptions=True)
    failed = [s for s in statuses if s not in (200, 201)]
    if failed:
        print(f"{len(failed)} POSTs failed: {failed[:3]}", file=sys.stderr)
    await asyncio.to_thread(_wait_processed, count + 1, 60)
    await _wait_quiet(clients, count, deadline_s=3)
    cpu = {k: v - cpu_before[k] for k, v in _cpu_sample(stack).items()}
    stop.set()
    await asyncio.gather(*listeners)
    for ws in sockets:
        await ws.close()
    return clients, posted, cpu


def _wait_processed(candles: int, deadline_s: float) -> None:
    """Until the worker has processed every candle and pushed every alert."""
    from django.db import connection

    from alerts.models import Alert, Delivery
    from trading.models import Candle

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        done = Candle.objects.filter(exchange="bench", processed_at__isnull=False).count()
        alerts = Alert.objects.filter(suppressed=False).count()
        pushed = (
            Delivery.objects.filter(channel="websocket")
            .exclude(status="pending")
            .values("alert")
            .distinct()
            .count()
        )
        if done >= candles and pushed >= alerts:
            break
        time.sleep(0.2)
    connection.close()


async def _wait_quiet(clients: list[_Client], expected: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if all(len(c.received) >= expected for c in clients):
            return
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- measuring


def _websocket_figures(clients: list[_Client], posted: dict[int, float]) -> list[dict]:
    from alerts.models import Delivery

    rows = defaultdict(set)
    for user_id, alert_id in Delivery.objects.filter(
        channel="websocket", status="sent"
    ).values_list("user_id", "alert_id"):
        rows[user_id].add(alert_id)
    unsent = Delivery.objects.filter(channel="websocket").exclude(status="sent").count()
    latencies = [
        (at - posted[event]) * 1000
        for c in clients
        for event, at in c.received.values()
        if event in posted
    ]
    lost = sum(len(rows[c.user_id] - set(c.received)) for c in clients)
    unrecorded = sum(len(set(c.received) - rows[c.user_id]) for c in clients)
    p95 = _percentile(latencies, 95)
    label = f"({SUBSCRIBERS} subscribers, {RATE_PER_S} alerts/s)"
    return [
        _row(
            f"POST -> WebSocket receipt p95 {label}",
            None if p95 is None else round(p95, 1),
            "ms",
            f"< {WS_GOAL_MS:g}",
            p95 is not None and p95 < WS_GOAL_MS,
        ),
        _row(
            "POST -> WebSocket receipt p50 / p99",
            f"{_fmt(_percentile(latencies, 50))} / {_fmt(_percentile(latencies, 99))}",
            "ms",
            "-",
            True,
        ),
        _row(
            "median per hop: " + ", ".join(_breakdown(clients, posted)),
            " / ".join(_fmt(v) for v in _breakdown(clients, posted).values()),
            "ms",
            "-",
            True,
        ),
        _row(
            f"WebSocket messages received / Delivery rows sent ({len(latencies)} received)",
            f"lost {lost}, unrecorded {unrecorded}, rows not sent {unsent}",
            "messages",
            "lost 0",
            lost == 0 and unsent == 0 and bool(latencies),
        ),
    ]


def _breakdown(clients: list[_Client], posted: dict[int, float]) -> dict:
    """Median time of each hop, from the stamps on the alerts and their deliveries."""
    from django.db.models import Min

    from alerts.models import Alert

    hops: dict[str, list[float]] = defaultdict(list)
    first_receipt: dict[int, float] = {}
    for c in clients:
        for alert_id, (_, at) in c.received.items():
            first_receipt[alert_id] = min(at, first_receipt.get(alert_id, at))
    rows = Alert.objects.annotate(sent=Min("deliveries__sent_at")).values_list(
        "pk", "event_ms", "ingested_at", "detected_at", "sent"
    )
    for pk, event, ingested, detected, sent in rows:
        if event not in posted or sent is None or pk not in first_receipt:
            continue
        stamps = [posted[event], ingested.timestamp(), detected.timestamp(), sent.timestamp()]
        stamps.append(first_receipt[pk])
        names = ("post->stored", "stored->detected", "detected->pushed", "pushed->received")
        for name, a, b in zip(names, stamps, stamps[1:], strict=False):
            hops[name].append((b - a) * 1000)
    return {name: _percentile(values, 50) for name, values in hops.items()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _email_figures(mail: _Mail, posted: dict[int, float]) -> list[dict]:
    from alerts.models import Alert, Delivery

    expected = Delivery.objects.filter(channel="email").count()
    deadline = time.monotonic() + 20
    while len(mail.received()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    received = mail.received()
    events = dict(Alert.objects.values_list("pk", "event_ms"))
    latencies = [
        (at - posted[events[pk]]) * 1000 for pk, at in received.items() if events.get(pk) in posted
    ]
    p95 = _percentile(latencies, 95)
    return [
        _row(
            f"POST -> SMTP receipt p95 ({len(latencies)} of {expected} emails)",
            None if p95 is None else round(p95, 1),
            "ms",
            f"< {SMTP_GOAL_MS:g}",
            p95 is not None and p95 < SMTP_GOAL_MS and len(received) == expected,
        )
    ]


# --------------------------------------------------------------------------- running


def _django(env: dict[str, str]) -> None:
    for key in ("DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "EMAIL_URL", "VAR_DIR"):
        os.environ[key] = env[key]
    os.environ.update(
        CHANNELS_PREFIX=env["CHANNELS_PREFIX"],
        SECURE_SSL_REDIRECT="false",
        ALLOWED_HOSTS="127.0.0.1,localhost",
    )
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    import django

    django.setup()


def end_to_end() -> list[dict]:
    from stack import Stack, free_port

    # one folder per database named in DATABASE_URL, like the scratch database
    var = ROOT / "var" / "bench-alerts" / (_scratch_name(os.environ.get("DATABASE_URL", "")))
    var.mkdir(parents=True, exist_ok=True)
    database_url = _database_url(var)
    with _smtp(var) as (mail, smtp_port):
        stack = Stack(env={}, log_dir=var / "log")
        try:
            redis_url = stack.start_redis(var / "redis")
            env = _env(database_url, redis_url, smtp_port, var)
            subprocess.run(
                [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True
            )
            _django(env)
            users, ops_token = _setup_users()
            stack.env = env
            port = free_port()
            for name, (queues, processes) in WORKERS.items():
                stack.start_worker(name, concurrency=processes, queues=queues)
            stack.start_web(port)
            time.sleep(2.0)  # worker ready
            base = f"http://127.0.0.1:{port}"
            clients, posted, cpu = asyncio.run(
                _scenario(base, f"ws://127.0.0.1:{port}", users, ops_token, stack)
            )
            rows = _websocket_figures(clients, posted) + _email_figures(mail, posted)
            per_alert = {k: v / max(1, len(posted)) * 1000 for k, v in cpu.items()}
            rows.append(
                _row(
                    "CPU per candle+alert: " + ", ".join(per_alert),
                    " / ".join(f"{v:.1f}" for v in per_alert.values()),
                    "ms",
                    "-",
                    True,
                )
            )
        finally:
            stack.stop()
            from django.db import connections

            connections.close_all()
            _drop_database(database_url)
    return rows


def run() -> list[dict]:
    from bench.bench_detectors import load_csv

    load_before = os.getloadavg()[0]
    rate = vector_rate(load_csv(DETECTOR_DATA))
    rows = [
        _row(
            "detectors backtest volatility+engulfing (bench_detectors)",
            round(rate),
            "candles/s",
            f">= {VECTOR_GOAL:,.0f}",
            rate >= VECTOR_GOAL,
        )
    ]
    rows += end_to_end()
    rows.append(
        _row(
            "machine load average (1 min) before / after, 2 cores",
            f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
            "processes",
            "-",
            True,
        )
    )
    return rows


def _table(rows: list[dict]) -> str:
    from bench.bench_detectors import format_table

    return format_table(rows)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    print(_table(run()))
