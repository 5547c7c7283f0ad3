"""Alert detector speed on real candles: ``python bench/bench_detectors.py``.

Vectorised figure: volatility + engulfing ``scan()`` together over ETH_BTC-1m (arrays already
loaded). Live figures: ``update()`` per candle for each registered detector, candles already
built. Each figure is the median of several rounds.
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

from alerts.detectors import (  # noqa: E402
    REGISTRY,
    Candle,
    Detector,
    candles_from_arrays,
    get_detector,
    load_csv,
)
from bench.common import format_table  # noqa: E402

DATA = ROOT / "data" / "market" / "ETH_BTC-1m.csv"
VECTOR_GOAL = 1_000_000.0
LIVE_GOAL_US = 20.0
ROUNDS = 7


def _median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(figure: str, value: float, unit: str, goal: str, ok: bool) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def vector_rate(arrays: dict, rounds: int = ROUNDS) -> float:
    """Candles per second for volatility + engulfing scanned together."""
    dets = [get_detector("volatility"), get_detector("engulfing")]

    def work() -> None:
        for det in dets:
            det.scan(arrays)

    work()
    return len(arrays["close"]) / _median_seconds(work, rounds)


def live_us_per_candle(det: Detector, candles: list[Candle], rounds: int = ROUNDS) -> float:
    def work() -> None:
        state = det.make_state()
        update = det.update
        for candle in candles:
            update(state, candle)

    return _median_seconds(work, rounds) / len(candles) * 1e6


def run(path: Path = DATA, rounds: int = ROUNDS) -> list[dict]:
    arrays = load_csv(path)
    candles = candles_from_arrays(arrays)
    rate = vector_rate(arrays, rounds)
    rows = [
        _row(
            f"vectorised volatility+engulfing ({path.name}, {len(candles)} candles)",
            round(rate),
            "candles/s",
            f">= {VECTOR_GOAL:,.0f}",
            rate >= VECTOR_GOAL,
        )
    ]
    for name in sorted(REGISTRY):
        us = live_us_per_candle(get_detector(name), candles, rounds)
        rows.append(
            _row(
                f"live update {name}",
                round(us, 2),
                "us/candle",
                f"< {LIVE_GOAL_US:g}",
                us < LIVE_GOAL_US,
            )
        )
    return rows


if __name__ == "__main__":
    print(format_table(run()))
