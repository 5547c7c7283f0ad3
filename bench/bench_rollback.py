"""Rollback stage 1 speed: ``python -m bench.bench_rollback``.

Scenario (as bench_exchange's close_all): one deployment on 20 BTC-quoted symbols, 50
market buys spread over them (one spot holding per symbol, 20 Position rows) plus one
resting limit sell per symbol. Stage 1 (kill switch REDUCING, signals off, cancel the 20
books, close the 20 holdings with reduce-only market sells, re-read until flat, HALTED,
critical alert), each step recorded with its audit record, through the same services as
production (`rollback_request`, `rollback_run`; stage 2 runs after and is not timed).

- paper: an in-process PaperExchange, median of several rounds. Goal < 2 s.
- stub: the real ccxt binance client against the Binance stub with 50 ms added to every
  request. Goal < 10 s, within Binance spot limits: at most 10 orders in any 1 s window,
  at most 1200 request weight per minute.

Runs in a throwaway database (a temp SQLite file, or a scratch PostgreSQL database when
DATABASE_URL points at PostgreSQL), with its own Redis namespace and directories.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = [f"C{n:02d}/BTC" for n in range(20)]
BUYS = 50
PAPER_GOAL_S = 2.0
STUB_GOAL_S = 10.0
STUB_DELAY_S = 0.05
MAX_ORDERS_PER_S = 10
MAX_WEIGHT_PER_MIN = 1200
# Binance spot request weights (GET account 20, 24hr ticker with a symbol 2, the rest 1).
WEIGHTS = {("GET", "/api/v3/account"): 20, ("GET", "/api/v3/ticker/24hr"): 2}
ROUNDS = 3


def setup_django(tmp: Path) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DEBUG", "true")
    os.environ.setdefault("SECRET_KEY", f"bench-{uuid.uuid4().hex}")
    os.environ["SAFETY_REDIS_PREFIX"] = f"bench-{uuid.uuid4().hex[:8]}"
    for name in ("BACKUP", "JOURNAL", "PREFLIGHT"):
        os.environ[f"SAFETY_{name}_DIR"] = str(tmp / name.lower())
    os.environ["SAFETY_FLAT_CHECK_PAUSE_S"] = "0.05"
    os.environ["LOG_LEVEL"] = "WARNING"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


@contextmanager
def scratch_database(tmp: Path, name: str) -> Iterator[str]:
    """A migrated throwaway database, dropped on exit. Yields the vendor name."""
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    setup_test_environment(debug=False)
    test_settings = connection.settings_dict.setdefault("TEST", {})
    saved = dict(test_settings)
    if connection.vendor == "sqlite":
        test_settings["NAME"] = str(tmp / f"{name}.sqlite3")
    else:
        test_settings["NAME"] = f"{name}_{os.getpid()}"
    old_name = connection.settings_dict["NAME"]
    try:
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        from audit.roles import ensure_roles

        ensure_roles()
        try:
            yield connection.vendor
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)
    finally:
        test_settings.clear()
        test_settings.update(saved)
        teardown_test_environment()


def _row(figure: str, value: Any, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _deployment(exchange: str = "paper") -> Any:
    from trading.models import Deployment, KillSwitch

    return Deployment.objects.create(
        name=f"bench-{uuid.uuid4().hex[:8]}",
        exchange=exchange,
        symbols=SYMBOLS,
        full_order_notional=0.1,
        allocation=1.0,
        kill_switch=KillSwitch.ACTIVE,
        starting_cash=100.0,
        cash=100.0,
    )


def _lots() -> list[tuple[str, float]]:
    return [(SYMBOLS[n % len(SYMBOLS)], 1.0) for n in range(BUYS)]


def _rollback(deployment: Any) -> Any:
    """Request (queue nothing), then run stages 1 and 2 here; return the finished row."""
    import canary.rollback as rb
    from canary import killswitch
    from trading.models import KillSwitch

    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    queue, rb.enqueue_run = rb.enqueue_run, lambda pk, queue=None: None
    try:
        rollback = rb.rollback_request(
            deployment=deployment, trigger="gate", cause="bench", actor="bench"
        )
    finally:
        rb.enqueue_run = queue
    rb.rollback_run(rollback.pk)
    rollback.refresh_from_db()
    return rollback


def _stage1_s(rollback: Any) -> float:
    stage1 = rollback.report.get("stage1") or {}
    if not stage1.get("complete"):
        raise RuntimeError(f"stage 1 incomplete: {stage1}")
    return float(stage1["run_s"])


# --------------------------------------------------------------------------- paper


def _paper_once() -> tuple[float, float, int]:
    from canary import safety_adapters
    from tests.safety.helpers import open_positions, paper_exchange

    deployment = _deployment()
    paper = paper_exchange(SYMBOLS, balance=100.0)
    open_positions(deployment, paper, _lots(), resting=SYMBOLS)
    original, safety_adapters.exchange_for = safety_adapters.exchange_for, lambda d: paper
    try:
        rollback = _rollback(deployment)
    finally:
        safety_adapters.exchange_for = original
    if paper.positions() or paper.fetch_open_orders():
        raise RuntimeError("paper exchange not flat after stage 1")
    sells = sum(1 for _, side, _, _ in paper.fills if side == "sell")
    return _stage1_s(rollback), rollback.report["stage1"]["from_request_s"], sells


# --------------------------------------------------------------------------- stub


def _stub_markets() -> list[Any]:
    from tests.trading.binance_stub import StubMarket

    return [
        StubMarket(s.replace("/", ""), s.split("/")[0], "BTC", 0.001 + n * 0.0001, "0.01", "0.01", "0.000001", "0.0001")
        for n, s in enumerate(SYMBOLS)
    ]  # fmt: skip


def _stub_positions(deployment: Any, exchange: Any) -> None:
    from trading.exchange import OrderRequest
    from trading.models import Position

    cost: dict[str, float] = {}
    for n, (symbol, qty) in enumerate(_lots()):
        result = exchange.create_order(
            OrderRequest(symbol, "buy", "market", qty, client_order_id=f"buy-{n}")
        )
        cost[symbol] = cost.get(symbol, 0.0) + result.filled * (result.average or 0.0)
    for n, symbol in enumerate(SYMBOLS):
        exchange.create_order(
            OrderRequest(symbol, "sell", "limit", 0.5, price=0.01, client_order_id=f"rest-{n}")
        )
    for symbol, held in exchange.positions(SYMBOLS).items():
        Position.objects.create(
            deployment=deployment, symbol=symbol, qty=held, avg_entry=cost[symbol] / held
        )


def _max_in_window(times: list[float], window: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _stub_once() -> dict[str, Any]:
    from django.conf import settings

    from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub
    from trading.exchange_ccxt import CcxtExchange

    with BinanceStub(_stub_markets(), balances={"BTC": 100.0}) as stub:
        exchange = CcxtExchange(
            api_key=API_KEY,
            secret=API_SECRET,
            base_url=stub.base_url,
            timeout_ms=3_000,
            symbols=SYMBOLS,
        )
        deployment = _deployment(exchange="binance")
        _stub_positions(deployment, exchange)
        settings.SAFETY_EXCHANGE_OVERRIDE = {
            "kind": "ccxt", "exchange_id": "binance", "base_url": stub.base_url,
            "api_key": API_KEY, "api_secret": API_SECRET, "timeout_ms": 3_000,
        }  # fmt: skip
        stub.delay_s = STUB_DELAY_S
        first = len(stub.log)
        try:
            rollback = _rollback(deployment)
        finally:
            stub.delay_s = 0.0
            settings.SAFETY_EXCHANGE_OVERRIDE = {}
        ended = rollback.stage1_ended_at.timestamp()
        calls = [r for r in stub.log[first:] if r.at <= time.monotonic() - (time.time() - ended)]
        flat = not exchange.positions(SYMBOLS) and not stub.open_orders()
    posts = sorted(r.at for r in calls if (r.method, r.path) == ("POST", "/api/v3/order"))
    return {
        "stage1_s": _stage1_s(rollback),
        "requests": len(calls),
        "orders": len(posts),
        "max_orders_1s": _max_in_window(posts, 1.0),
        "weight": sum(WEIGHTS.get((r.method, r.path), 1) for r in calls),
        "flat": flat,
    }


def run(rounds: int = ROUNDS) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_rollback-") as tmp:
        setup_django(Path(tmp))
        with scratch_database(Path(tmp), "bench_rollback") as vendor:
            paper = [_paper_once() for _ in range(rounds)]
            stub = _stub_once()
    paper_s = statistics.median(p[0] for p in paper)
    weight_rate = stub["weight"] / max(stub["stage1_s"] / 60.0, 1.0)
    return [
        _row(f"paper stage 1 ({len(SYMBOLS)} symbols, {BUYS} fills, {len(SYMBOLS)} books; {vendor})", round(paper_s, 3), "s", f"< {PAPER_GOAL_S:.0f} s", paper_s < PAPER_GOAL_S),
        _row("paper stage 1 from request to flat (median)", round(statistics.median(p[1] for p in paper), 3), "s", "< 30 s", True),
        _row("paper closing sells", paper[0][2], "orders", str(len(SYMBOLS)), paper[0][2] == len(SYMBOLS)),
        _row(f"stub stage 1, {STUB_DELAY_S * 1000:.0f} ms per request", round(stub["stage1_s"], 2), "s", f"< {STUB_GOAL_S:.0f} s", stub["stage1_s"] < STUB_GOAL_S),
        _row("stub requests / orders sent in stage 1", f"{stub['requests']} / {stub['orders']}", "requests"),
        _row("stub max orders in any 1 s", stub["max_orders_1s"], "orders/s", f"<= {MAX_ORDERS_PER_S}", stub["max_orders_1s"] <= MAX_ORDERS_PER_S),
        _row("stub request weight used", stub["weight"], "weight", f"<= {MAX_WEIGHT_PER_MIN}/min", weight_rate <= MAX_WEIGHT_PER_MIN),
        _row("stub account flat after stage 1", stub["flat"], "-", "True", bool(stub["flat"])),
    ]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    headers = ("figure", "value", "unit", "goal", "ok")
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    rows = run()
    print(format_table(rows))
    if "--json" in sys.argv:
        print(json.dumps(rows))
