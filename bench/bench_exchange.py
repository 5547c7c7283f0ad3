"""close_all speed: ``python -m bench.bench_exchange``.

Scenario for both: 20 BTC-quoted symbols, 50 market buys spread over them (one holding per
symbol) plus one resting limit order per symbol. close_all cancels the 20 books and sells
the 20 holdings.

- paper: PaperExchange, median of several rounds (set-up outside the timing).
- stub: the real ccxt binance client against the Binance stub with 50 ms added to every
  request; concurrent threads, orders paced at 8/s. Checked against Binance spot limits:
  at most 10 orders in any 1 s window and at most 1200 request weight per minute (request
  weights as Binance documents them for these endpoints).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import format_table  # noqa: E402
from tests.trading.binance_stub import API_KEY, API_SECRET, BinanceStub, StubMarket  # noqa: E402
from trading.exchange import OrderRequest, PaperSettings  # noqa: E402
from trading.exchange_ccxt import CcxtExchange  # noqa: E402
from trading.exchange_paper import PaperExchange  # noqa: E402

SYMBOLS = [f"C{n:02d}/BTC" for n in range(20)]
BUYS = 50
PAPER_GOAL_S = 1.0
STUB_GOAL_S = 10.0
STUB_DELAY_S = 0.05
MAX_ORDERS_PER_S = 10
MAX_WEIGHT_PER_MIN = 1200
# Binance spot request weights (GET account 20, 24hr ticker with a symbol 2, the rest 1).
WEIGHTS = {("GET", "/api/v3/account"): 20, ("GET", "/api/v3/ticker/24hr"): 2}
ROUNDS = 5


def _row(figure: str, value: float, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def _orders() -> list[OrderRequest]:
    buys = [
        OrderRequest(SYMBOLS[n % len(SYMBOLS)], "buy", "market", 1.0, client_order_id=f"buy-{n}")
        for n in range(BUYS)
    ]
    rests = [
        OrderRequest(s, "sell", "limit", 0.5, price=0.01, client_order_id=f"rest-{n}")
        for n, s in enumerate(SYMBOLS)
    ]
    return buys + rests


def _paper_once() -> tuple[float, int, int]:
    ex = PaperExchange(SYMBOLS, PaperSettings(starting_balances={"BTC": 100.0}, seed=1))
    for n, symbol in enumerate(SYMBOLS):
        ex.set_price(symbol, 0.001 + n * 0.0001, 1_000)
    for order in _orders():
        ex.create_order(order)
    start = time.perf_counter()
    result = ex.close_all(SYMBOLS, tag="bench")
    elapsed = time.perf_counter() - start
    assert ex.positions() == {} and ex.fetch_open_orders() == []
    return elapsed, len(result), len(result.canceled)


def _max_in_window(times: list[float], window: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _stub_once() -> dict[str, float]:
    markets = [
        StubMarket(
            s.replace("/", ""),
            s.split("/")[0],
            "BTC",
            0.001 + n * 0.0001,
            "0.01",
            "0.01",
            "0.000001",
            "0.0001",
        )
        for n, s in enumerate(SYMBOLS)
    ]
    with BinanceStub(markets, balances={"BTC": 100.0}) as stub:
        ex = CcxtExchange(
            api_key=API_KEY,
            secret=API_SECRET,
            base_url=stub.base_url,
            timeout_ms=2_000,
            symbols=SYMBOLS,
        )
        for order in _orders():
            ex.create_order(order)
        stub.delay_s = STUB_DELAY_S
        first = len(stub.log)
        start = time.perf_counter()
        result = ex.close_all(SYMBOLS, tag="bench")
        elapsed = time.perf_counter() - start
        stub.delay_s = 0.0
        calls = stub.log[first:]
        flat = not ex.positions() and not stub.open_orders()
    posts = sorted(r.at for r in calls if (r.method, r.path) == ("POST", "/api/v3/order"))
    return {
        "elapsed": elapsed,
        "requests": len(calls),
        "orders": len(posts),
        "sold": len(result),
        "canceled": len(result.canceled),
        "max_orders_1s": _max_in_window(posts, 1.0),
        "weight": sum(WEIGHTS.get((r.method, r.path), 1) for r in calls),
        "flat": flat,
    }


def run(rounds: int = ROUNDS) -> list[dict]:
    paper = [_paper_once() for _ in range(rounds)]
    paper_s = statistics.median(p[0] for p in paper)
    stub = _stub_once()
    minutes = max(stub["elapsed"] / 60.0, 1.0)  # the weight budget is per started minute
    weight_rate = stub["weight"] / minutes
    return [
        _row("paper close_all (20 symbols, 20 books, 50 fills)", round(paper_s * 1000, 2), "ms", f"< {PAPER_GOAL_S * 1000:.0f} ms", paper_s < PAPER_GOAL_S),
        _row("paper close_all orders sent / canceled", f"{paper[0][1]} / {paper[0][2]}", "orders"),
        _row(f"stub close_all, {STUB_DELAY_S * 1000:.0f} ms per request", round(stub["elapsed"], 2), "s", f"< {STUB_GOAL_S:.0f} s", stub["elapsed"] < STUB_GOAL_S),
        _row("stub requests / orders sent / canceled", f"{stub['requests']} / {stub['orders']} / {stub['canceled']}", "requests"),
        _row("stub max orders in any 1 s", stub["max_orders_1s"], "orders/s", f"<= {MAX_ORDERS_PER_S}", stub["max_orders_1s"] <= MAX_ORDERS_PER_S),
        _row("stub request weight used", stub["weight"], "weight", f"<= {MAX_WEIGHT_PER_MIN}/min", weight_rate <= MAX_WEIGHT_PER_MIN),
        _row("stub account flat after close_all", stub["flat"], "-", "True", bool(stub["flat"])),
    ]  # fmt: skip


if __name__ == "__main__":
    print(format_table(run()))
