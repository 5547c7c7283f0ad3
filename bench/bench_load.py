"""Load figures, on loopback only: ``python -m bench.bench_load [--quick] [--json]``.

1. 1,000 concurrent authenticated WebSocket clients on one uvicorn process (a Celery
   worker, a private Redis): resident memory of the web process per connection, then five
   alerts fanned out to all of them: messages lost (missing, doubled or out of order) and
   the time from the POST to the last client's receipt.
2. 200 candle POSTs per second for 5 minutes, one candle per request over 20 streams, open
   loop (a request leaves at its due time whatever the previous answers): errors, the
   achieved rate and the p50/p95/p99 latency; the worker's backlog when it ends. On
   PostgreSQL the web server takes its connections from its pool and the worker keeps
   one per process (WORKER_DB_CONN_MAX_AGE); when the server runs with autovacuum off,
   the bench analyses the tables as autovacuum would (analyzed_as_by_autovacuum).
3. A phase holding 100,000 orders: the phase metrics in SQL and one whole monitor step
   (lock, metrics, verdict, decision, stored evaluation), median of 5.

The web server and the worker run as in production: DEBUG off (no SQL query log), TLS
taken to end in front of them (no redirect to https on loopback).

``--quick``: 100 clients, 10 s of POSTs, 10,000 orders. ``--web-processes N``: the POSTs
against N uvicorn processes (the WebSocket figures are skipped then). Runs in a throwaway database (a
temporary SQLite file, or a scratch PostgreSQL database when DATABASE_URL points at
PostgreSQL) and a private Redis, both removed at the end; the processes' logs are kept in
var/bench-load/. ``run() -> list[dict]`` rows
{"figure", "value", "unit", "goal", "ok"} for bench/run_all.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVALUATION_GOAL_MS = 1000.0  # a tenth of CANARY_MONITOR_INTERVAL_S
RATE_TOLERANCE = 0.97


@dataclass(frozen=True)
class Scale:
    clients: int
    post_rate: float
    post_seconds: float
    orders: int

    @classmethod
    def of(cls, quick: bool) -> Scale:
        return cls(100, 200.0, 10.0, 10_000) if quick else cls(1000, 200.0, 300.0, 100_000)


def _row(figure: str, value: Any, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": bool(ok)}


# --------------------------------------------------------------------------- set-up


def setup_django(tmp: Path) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["DEBUG"] = "true"
    os.environ.setdefault("SECRET_KEY", f"bench-{uuid.uuid4().hex}")
    os.environ["LOG_LEVEL"] = "WARNING"
    os.environ["SAFETY_REDIS_PREFIX"] = f"bench-load-{uuid.uuid4().hex[:8]}"
    for name in ("BACKUP", "JOURNAL", "PREFLIGHT"):
        os.environ[f"SAFETY_{name}_DIR"] = str(tmp / name.lower())
    for path in (str(ROOT), str(ROOT / "scripts")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import django

    django.setup()


@contextmanager
def scratch_database(tmp: Path) -> Iterator[str]:
    """A migrated throwaway database, dropped on exit; yields its DATABASE_URL."""
    from django.db import connection

    from audit.roles import ensure_roles

    test = connection.settings_dict.setdefault("TEST", {})
    saved, old_name = dict(test), connection.settings_dict["NAME"]
    sqlite = connection.vendor == "sqlite"
    test["NAME"] = str(tmp / "load.sqlite3") if sqlite else f"bench_load_{os.getpid()}"
    try:
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        ensure_roles()
        conf = connection.settings_dict
        yield (
            f"sqlite:///{conf['NAME']}"
            if sqlite
            else f"postgres://{conf['USER'] or 'postgres'}@{conf['HOST'] or '127.0.0.1'}:"
            f"{conf['PORT'] or 5432}/{conf['NAME']}"
        )
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        test.clear()
        test.update(saved)


def _start_web(stack: Any, port: int, processes: int) -> None:
    """The stack's web server; `processes` > 1: uvicorn --workers (scale-out on one host)."""
    stack.start_web(port, workers=processes)


@contextmanager
def live_stack(tmp: Path, database_url: str, processes: int = 1) -> Iterator[Any]:
    """uvicorn and a Celery worker on the scratch database and a private Redis."""
    from stack import Stack, free_port

    from tests.e2e.conftest import LiveStack
    from tests.faults.harness import no_persistent_connections

    logs = ROOT / "var" / "bench-load" / time.strftime("%Y%m%d-%H%M%S")
    stack = Stack(env=dict(os.environ), log_dir=logs)
    try:
        redis_url = stack.start_redis(tmp / "redis")
        stack.env.update(
            DATABASE_URL=no_persistent_connections(database_url), REDIS_URL=redis_url, CELERY_TASK_ALWAYS_EAGER="false",
            ALLOWED_HOSTS="127.0.0.1,localhost", PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING",
            # As in production (no SQL query log: with DEBUG on every statement is also
            # rendered with its parameters for it), TLS ending in front of the server.
            DEBUG="false", SECURE_SSL_REDIRECT="false",
        )  # fmt: skip
        port = free_port()
        stack.start_worker(concurrency=2)
        _start_web(stack, port, processes)
        yield LiveStack(stack=stack, port=port), redis_url
    finally:
        stack.stop()


# --------------------------------------------------------------------------- 1. WebSocket


def websocket_rows(live: Any, scale: Scale) -> list[dict]:
    from tests.faults.harness import engulfing_series, user_token
    from tests.load.clients import Client, Fleet, make_viewers, percentile, rss_kib

    tokens = make_viewers(scale.clients, prefix="bench")
    poster = user_token(f"bench-ops-{uuid.uuid4().hex[:6]}", "Ops")
    fleet = Fleet(f"{live.ws_url}/ws/alerts/", live.base_url, [Client(t) for t in tokens])
    web = live.stack.procs["web"].pid
    alerts = 5

    async def scenario() -> tuple[int, int, float, float, bool]:
        idle = rss_kib(web)
        started = time.monotonic()
        await fleet.connect(parallel=50, timeout=60)
        connect_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        connected = rss_kib(web)
        posted = time.time()
        series = engulfing_series(alerts * 4)
        status, body = await asyncio.to_thread(
            live.request, "POST", "/api/v1/market/candles", series, poster
        )
        if status != 201:
            raise RuntimeError(f"POST answered {status}: {body}")
        complete = await fleet.wait_for(alerts, timeout=180)
        await fleet.close()
        return idle, connected, connect_s, posted, complete

    idle, connected, connect_s, posted, complete = asyncio.run(scenario())
    from alerts.models import Alert

    expected = list(
        Alert.objects.filter(suppressed=False).order_by("event_ms").values_list("pk", flat=True)
    )
    lost = fleet.lost(expected)
    last = [max(t for _, t in c.alerts) - posted for c in fleet.clients if c.alerts]
    per_conn = (connected - idle) / scale.clients
    n = scale.clients
    return [
        _row(f"{n:,} WebSocket clients connected (50 at a time)", round(connect_s, 1), "s"),
        _row("web process memory per WebSocket connection", round(per_conn, 1), "KiB",
             "-", True),
        _row(f"web process memory with {n:,} connections", round(connected / 1024, 1), "MiB"),
        _row(f"alerts to {n:,} clients: clients missing one / doubled / out of order",
             f"{lost['missing']} / {lost['doubled']} / {lost['out_of_order']}", "clients",
             "0 / 0 / 0", complete and not any(lost.values()) and len(expected) == alerts),
        _row(f"POST to the last of {n:,} clients' receipt of {alerts} alerts (p95 of clients)",
             round((percentile(last, 95) or 0) * 1000), "ms"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- 2. POSTs

ANALYZE_EVERY_S = 15.0


@contextmanager
def analyzed_as_by_autovacuum(database_url: str) -> Iterator[dict]:
    """When the PostgreSQL server runs with autovacuum off (this machine's does), ANALYZE
    the scratch database's tables as autovacuum's default rule would (a table changed by
    more than 50 rows + 10 % of its rows since its last analysis, looked at every
    ANALYZE_EVERY_S). Without it the candle table, growing from empty, is never analysed:
    the plans the server caches for the prepared statements stay those made when it held
    a few rows (sequential scans), and every POST costs more than the last. Yields
    {"autovacuum": on/off, "analyses": count}."""
    state: dict[str, Any] = {"autovacuum": "n/a", "analyses": 0}
    if not database_url.startswith("postgres"):
        yield state
        return
    import threading

    import psycopg

    conn = psycopg.connect(database_url.split("?")[0], autocommit=True)
    state["autovacuum"] = conn.execute("SHOW autovacuum").fetchone()[0]
    stop = threading.Event()

    def analyze() -> None:
        while not stop.wait(ANALYZE_EVERY_S):
            due = conn.execute(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(relname)"
                " FROM pg_stat_user_tables"
                " WHERE n_mod_since_analyze > 50 + 0.1 * greatest(n_live_tup, 0)"
            ).fetchall()
            for (table,) in due:
                conn.execute(f"ANALYZE {table}")
                state["analyses"] += 1

    thread = threading.Thread(target=analyze, name="analyze", daemon=True)
    if state["autovacuum"] == "off":
        thread.start()
    try:
        yield state
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(60)
        conn.close()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes of a process group (Linux /proc):
    a stack process and its children (uvicorn's workers, Celery's pool)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state (field 3 of proc(5))
            total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_cpu_ticks() -> list[int]:
    """The machine's CPU time by state since boot, in ticks (Linux /proc/stat: user, nice,
    system, idle, iowait, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:9]]


def machine_cpu_shares(before: list[int], after: list[int]) -> str:
    """Busy / idle / stolen shares of the machine's CPU time between two readings; stolen:
    time the hypervisor gave the virtual CPUs to others, which none of the processes can
    use (this machine's slow phases)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    idle, steal = delta[3] + delta[4], delta[7]
    busy = total - idle - steal
    return " / ".join(f"{100 * x / total:.0f} %" for x in (busy, idle, steal))


def post_rows(
    live: Any, redis_url: str, scale: Scale, processes: int = 1, database_url: str = ""
) -> list[dict]:
    import redis

    from tests.faults.harness import user_token
    from tests.load.clients import post_load, stream_candle

    token = user_token(f"bench-feed-{uuid.uuid4().hex[:6]}", "Ops")
    groups = {name: live.stack.procs[name].pid for name in ("web", "worker")}
    cpu_before = {name: group_cpu_s(pgid) for name, pgid in groups.items()}
    load_before = os.getloadavg()[0]
    ticks_before = machine_cpu_ticks()
    with analyzed_as_by_autovacuum(database_url) as maintenance:
        result = post_load(
            "127.0.0.1", live.port, token, lambda i: [stream_candle(i)],
            scale.post_rate, scale.post_seconds, threads=32,
        )  # fmt: skip
    cpu = {name: group_cpu_s(pgid) - cpu_before[name] for name, pgid in groups.items()}
    shares = machine_cpu_shares(ticks_before, machine_cpu_ticks())
    load_after = os.getloadavg()[0]
    broker = redis.Redis.from_url(redis_url)
    backlog = " / ".join(str(broker.llen(queue)) for queue in ("celery", "alerts.candles"))
    what = f"{scale.post_rate:.0f} candle POSTs/s for {scale.post_seconds:.0f} s"
    if processes > 1:
        what += f" ({processes} web processes)"
    late = result.lag_ms
    unsent = result.planned - result.sent
    return [
        _row(f"{what}: errors (answers: {dict(sorted(result.statuses.items()))})", result.errors,
             f"of {result.sent:,} sent", "0", result.errors == 0),
        _row(f"{what}: due but never sent within the window (server too slow)", unsent,
             f"of {result.planned:,}", "0", unsent == 0),
        _row(f"{what}: achieved rate", round(result.rate, 1), "POST/s",
             f">= {scale.post_rate:.0f}", result.rate >= scale.post_rate * RATE_TOLERANCE),
        _row(f"{what}: latency p50 / p95 / p99",
             " / ".join(f"{result.p(q) or 0:.0f}" for q in (50, 95, 99)), "ms"),
        _row(f"{what}: requests leaving > 100 ms after their due time",
             sum(1 for x in late if x > 100), "requests"),
        _row(f"{what}: web server CPU per POST (user + system)",
             round(1000 * cpu["web"] / max(result.sent, 1), 2), "ms"),
        _row(f"{what}: Celery worker CPU per POST during the window",
             round(1000 * cpu["worker"] / max(result.sent, 1), 2), "ms"),
        _row("worker backlog when the POSTs end (tasks queued: celery / alerts.candles)", backlog,
             "tasks"),
        _row(f"PostgreSQL autovacuum {maintenance['autovacuum']}: tables analysed by the bench "
             "as autovacuum would", maintenance["analyses"], "ANALYZE"),
        _row("machine load average (1 min) before / after the POSTs",
             f"{load_before:.1f} / {load_after:.1f}", f"on {os.cpu_count()} cores"),
        _row("machine CPU during the POSTs: busy / idle / stolen by the hypervisor", shares,
             "of its time"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- 3. evaluation


def seed_phase(orders: int, now: datetime) -> int:
    """A RUNNING rollout whose phase 1 started two hours ago holding `orders` orders."""
    from canary.models import Phase, Rollout
    from trading.models import Deployment, MarketStream, Order, Signal

    rng = random.Random(7)
    start = now - timedelta(hours=2)
    deployment = Deployment.objects.create(
        name=f"bench-load-{uuid.uuid4().hex[:6]}", symbols=["ETH/BTC"], full_order_notional=0.1
    )
    signals = Signal.objects.bulk_create(
        Signal(deployment=deployment, symbol="ETH/BTC", side="buy", entry=0.1, stop=0.09,
               target=0.14, reward_risk=4.0, score=rng.choice((3, 4)), ts_ms=i, created_at=start)
        for i in range(2000)
    )  # fmt: skip
    statuses = ["FILLED"] * 95 + ["PARTIAL"] * 3 + ["ERROR", "REJECTED"]
    batch = []
    for i in range(orders):
        status = rng.choice(statuses)
        at = start + timedelta(milliseconds=rng.randrange(7_000_000))
        latency = rng.lognormvariate(4.5, 0.5)
        batch.append(
            Order(deployment=deployment, signal=signals[i % len(signals)],
                  client_order_id=f"bl-{deployment.pk}-{i}", symbol="ETH/BTC", side="buy",
                  purpose="entry" if i % 2 else "exit", requested_qty=0.1,
                  filled_qty=0.1 if status == "FILLED" else 0.0, slippage_bps=rng.gauss(2, 3),
                  status=status, created_at=at, submitted_at=at,
                  acked_at=at + timedelta(milliseconds=latency), latency_ms=latency)
        )  # fmt: skip
        if len(batch) == 5000:
            Order.objects.bulk_create(batch)
            batch = []
    Order.objects.bulk_create(batch)
    MarketStream.objects.update_or_create(
        exchange="paper", symbol="ETH/BTC", timeframe=deployment.timeframe,
        defaults={"last_received_at": now},
    )  # fmt: skip
    plan = [{"allocation": a, "min_duration_s": 86400, "extension_s": 600} for a in (0.1, 0.5)]
    rollout = Rollout.objects.create(
        deployment=deployment, name="bench-load", plan=plan, thresholds={}, state="RUNNING",
        current_phase=1, created_at=start, started_at=start,
    )  # fmt: skip
    Phase.objects.create(
        rollout=rollout, index=1, allocation=0.1, min_duration_s=86400, extension_s=600,
        started_at=start, ends_at=start + timedelta(days=1),
    )  # fmt: skip
    return rollout.pk


def _median_ms(work: Any, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def evaluation_rows(scale: Scale, vendor: str) -> list[dict]:
    from canary.metrics import phase_metrics
    from canary.models import Rollout
    from canary.monitor import monitor_step

    now = datetime.now(UTC)
    started = time.perf_counter()
    rollout_id = seed_phase(scale.orders, now)
    seed_s = time.perf_counter() - started
    rollout = Rollout.objects.select_related("deployment").get(pk=rollout_id)
    since = rollout.phases.get(index=1).started_at
    metrics = phase_metrics(deployment=rollout.deployment, since=since, now=now)
    if metrics.orders != scale.orders:
        raise RuntimeError(f"the phase holds {metrics.orders} orders, not {scale.orders}")
    sql_ms = _median_ms(lambda: phase_metrics(deployment=rollout.deployment, since=since, now=now))
    step = monitor_step(rollout_id=rollout_id, now=now)
    if step.error or not step.evaluation_id or step.state != "RUNNING":
        raise RuntimeError(f"the monitor step did not leave the phase running: {step}")
    step_ms = _median_ms(lambda: monitor_step(rollout_id=rollout_id, now=now))
    n = f"{scale.orders:,} orders"
    return [
        _row(f"seeding a phase of {n} ({vendor})", round(seed_s, 1), "s"),
        _row(f"phase metrics in SQL, {n} ({vendor}, median of 5)", round(sql_ms, 1), "ms"),
        _row(f"one evaluation (monitor step), {n} ({vendor}, median of 5)", round(step_ms, 1),
             "ms", f"< {EVALUATION_GOAL_MS:.0f} ms", step_ms < EVALUATION_GOAL_MS),
        _row(f"  its verdict ({'; '.join(step.reasons)[:80] or 'no reason'})", step.verdict,
             f"action {step.action}"),
    ]  # fmt: skip


# --------------------------------------------------------------------------- main


def run(quick: bool = False, web_processes: int = 1) -> list[dict]:
    from tests.load.clients import raise_fd_limit

    scale = Scale.of(quick)
    limit = raise_fd_limit(4 * scale.clients + 1024)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        setup_django(Path(tmp))
        from django.db import connection

        with scratch_database(Path(tmp)) as database_url:
            vendor = connection.vendor
            with live_stack(Path(tmp), database_url, web_processes) as (live, redis_url):
                rows = [] if web_processes > 1 else websocket_rows(live, scale)
                rows += post_rows(live, redis_url, scale, web_processes, database_url)
            rows += evaluation_rows(scale, vendor)
    rows.append(_row("open-file limit of the bench and its processes", limit, "fds"))
    return rows


def format_table(rows: list[dict]) -> str:
    headers = ("figure", "value", "unit", "goal", "ok")
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def _arg(name: str, default: int) -> int:
    return int(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


if __name__ == "__main__":
    table = run(quick="--quick" in sys.argv, web_processes=_arg("--web-processes", 1))
    print(format_table(table))
    if "--json" in sys.argv:
        print(json.dumps(table))
