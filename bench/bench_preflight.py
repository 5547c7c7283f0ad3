"""Pre-flight speed in paper mode: ``python -m bench.bench_preflight``.

A paper deployment on 3 symbols with 60 fresh candles each and live streams, a fresh
backup, a real Celery worker (started here on the throwaway database, on its own queue)
to answer the ping, the real Redis channel layer, the order router's paper exchange.
The beat heartbeat is marked by hand (no beat runs here). Goal: a GO in < 5 s.

- first run: the backup is restored into a scratch database and checked (the slow part);
- later runs: that restore was verified minutes ago, only the checksum is recomputed.

Throwaway database (temp SQLite file, or a scratch PostgreSQL database when DATABASE_URL
points at PostgreSQL), own Redis namespace and directories.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_rollback import format_table, scratch_database, setup_django  # noqa: E402

SYMBOLS = ("ETH/BTC", "LTC/BTC", "XRP/BTC")
GOAL_S = 5.0
ROUNDS = 3


def _row(figure: str, value: Any, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _database_url() -> str:
    from django.db import connection

    conf = connection.settings_dict
    if connection.vendor == "postgresql":
        host, port = conf["HOST"] or "127.0.0.1", conf["PORT"] or 5432
        return f"postgres://{conf['USER'] or 'postgres'}@{host}:{port}/{conf['NAME']}"
    return f"sqlite:///{conf['NAME']}"


def _start_worker(tmp: Path) -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    from stack import PYTHON, Stack

    env = dict(os.environ, DATABASE_URL=_database_url(), CELERY_TASK_ALWAYS_EAGER="false")
    stack = Stack(env=env, log_dir=tmp / "logs")
    queue = f"bench-preflight-{uuid.uuid4().hex[:8]}"
    stack.start(
        "worker",
        [PYTHON, "-m", "celery", "-A", "config", "worker", "-l", "warning", "-n", f"{queue}@%h",
         "-Q", queue, "--concurrency", "1", "--without-gossip", "--without-mingle"],
    )  # fmt: skip
    from config.celery import app

    name = f"{queue}@{socket.gethostname()}"
    deadline = time.monotonic() + 60
    while not app.control.ping(destination=[name], timeout=1.0):
        if time.monotonic() > deadline:
            stack.stop()
            raise RuntimeError("the bench worker did not answer within 60 s")
    return stack


def _prepare() -> Any:
    from canary.backup import backup_create
    from canary.heartbeat import KEY_BEAT, mark
    from tests.safety.helpers import fresh_market
    from trading.models import Deployment, KillSwitch

    deployment = Deployment.objects.create(
        name="bench-preflight",
        exchange="paper",
        symbols=list(SYMBOLS),
        timeframe="5m",
        full_order_notional=0.1,
        kill_switch=KillSwitch.HALTED,
        starting_cash=1.0,
        cash=1.0,
    )
    fresh_market(deployment)
    backup_create(actor="bench")
    mark(KEY_BEAT)
    return deployment


def _once(deployment: Any) -> tuple[float, Any]:
    from canary.heartbeat import KEY_BEAT, mark
    from canary.preflight import preflight_run

    mark(KEY_BEAT)
    started = time.perf_counter()
    run = preflight_run(actor="bench", deployment=deployment)
    return time.perf_counter() - started, run


def run(rounds: int = ROUNDS) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_preflight-") as tmp:
        setup_django(Path(tmp))
        with scratch_database(Path(tmp), "bench_preflight") as vendor:
            deployment = _prepare()
            stack = _start_worker(Path(tmp))
            try:
                first_s, first = _once(deployment)
                later = [_once(deployment) for _ in range(rounds)]
            finally:
                stack.stop()
    later_s = statistics.median(s for s, _ in later)
    slowest = max(first.checks, key=lambda c: c["duration_ms"])
    backup = next(c for c in first.checks if c["name"] == "backup")
    failed = [f"{c['name']}: {c['detail']}" for c in first.checks if c["status"] == "FAIL"]
    return [
        _row(f"pre-flight, paper, first run (scratch restore; {vendor})", round(first_s, 3), "s", f"< {GOAL_S:.0f} s", first_s < GOAL_S),
        _row("pre-flight, paper, restore verified earlier (median)", round(later_s, 3), "s", f"< {GOAL_S:.0f} s", later_s < GOAL_S),
        _row("decision", first.decision, "-", "GO", first.decision == "GO" and all(r.decision == "GO" for _, r in later)),
        _row(f"slowest check of the first run: {slowest['name']}", slowest["duration_ms"], "ms"),
        _row("backup check of the first run: " + backup["detail"][:60], backup["duration_ms"], "ms"),
        *([_row("failed checks", "; ".join(failed), "-", "none", False)] if failed else []),
    ]  # fmt: skip


if __name__ == "__main__":
    rows = run()
    print(format_table(rows))
    if "--json" in sys.argv:
        print(json.dumps(rows))
