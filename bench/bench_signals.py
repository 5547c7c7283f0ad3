"""Confluence scorer speed over a replay: ``python -m bench.bench_signals``.

Input: all of ETH_BTC-5m repeated REPEAT times (timestamps shifted so they keep rising).
Vectorised: `compute_signals` on the arrays. Live: `SignalEngine.update` per candle, candles
already built as tuples. Each figure is the median of several rounds.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import format_table  # noqa: E402
from trading.signals import SignalEngine, SignalParams, compute_signals, load_csv  # noqa: E402

DATA = ROOT / "data" / "market" / "ETH_BTC-5m.csv"
GOAL = 50_000.0
REPEAT = 20
ROUNDS = 5


def _median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _repeated(repeat: int) -> dict[str, np.ndarray]:
    base = load_csv(DATA)
    span = int(base["timestamp_ms"][-1] - base["timestamp_ms"][0]) + 300_000
    out = {k: np.tile(v, repeat) for k, v in base.items()}
    out["timestamp_ms"] = out["timestamp_ms"] + np.repeat(
        np.arange(repeat, dtype=np.int64) * span, len(base["close"])
    )
    return out


def _row(figure: str, value: float, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def run(repeat: int = REPEAT, rounds: int = ROUNDS) -> list[dict]:
    arrays = _repeated(repeat)
    n = len(arrays["close"])
    params = SignalParams()
    cols = ("timestamp_ms", "open", "high", "low", "close", "volume")
    candles = list(zip(*(arrays[c].tolist() for c in cols), strict=True))
    emitted: dict[str, int] = {}

    def vectorised() -> None:
        emitted["vectorised"] = len(compute_signals(arrays, params))

    def live() -> None:
        engine = SignalEngine(params)
        update = engine.update
        emitted["live"] = sum(1 for c in candles if update(c) is not None)

    vector_rate = n / _median_seconds(vectorised, rounds)
    live_rate = n / _median_seconds(live, rounds)
    same = emitted["vectorised"] == emitted["live"]
    return [
        _row("candles per replay", n, "candles", f"ETH_BTC-5m x{repeat}"),
        _row(
            "vectorised compute_signals",
            round(vector_rate),
            "candles/s",
            f">= {GOAL:,.0f}",
            vector_rate >= GOAL,
        ),
        _row(
            "live SignalEngine.update",
            round(live_rate),
            "candles/s",
            f">= {GOAL:,.0f}",
            live_rate >= GOAL,
        ),
        _row("live mean cost", round(1e6 / live_rate, 2), "us/candle"),
        _row(
            "signals emitted (min_score 3)",
            emitted["vectorised"],
            "signals",
            "live == vectorised",
            same,
        ),
    ]


if __name__ == "__main__":
    print(format_table(run()))
