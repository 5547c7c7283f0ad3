"""Throughput of the pure gate engine: ``python -m bench.bench_engine``.

The SQL-side figure (evaluating a phase of 10,000 orders on PostgreSQL in < 50 ms) needs the
Django models and lives elsewhere.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict

from bench.common import format_table
from canary.engine import Metrics, Outcome, Thresholds, evaluate
from canary.evaluate_cli import evaluate_stream

SAMPLES = 1_000
ROUNDS = 20


# Per metric: a value range on the PASS side, outside the target, and past the fail bound.
_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "latency_p95_ms": ((80, 499), (500, 1500), (1501, 4000)),
    "fill_rate": ((0.951, 1.0), (0.90, 0.95), (0.5, 0.899)),
    "slippage_bps": ((-5, 14.9), (15, 30), (30.1, 80)),
    "confluence_avg": ((3.2, 4.0), (3.0, 3.19), (1.0, 2.99)),
    "drawdown_pct": ((-0.99, 0), (-2.99, -1.0), (-6, -3.0)),
    "error_rate": ((0, 0.0099), (0.01, 0.05), (0.051, 0.2)),
    "stream_gap_s": ((0, 10), (10, 30), (30.1, 120)),
}
_WEIGHTS = (90, 9, 1)


def _sample_metrics(rng: random.Random) -> Metrics:
    """Mostly healthy metrics, with some outside their target and a few past a fail bound."""
    values = {
        name: rng.uniform(*rng.choices(ranges, weights=_WEIGHTS)[0])
        for name, ranges in _RANGES.items()
    }
    return Metrics(
        orders=rng.randint(0, 200),
        critical_errors=rng.choices((0, 1), weights=(99, 1))[0],
        db_ok=rng.random() > 0.005,
        **values,
    )


def _best_rate(work: Callable[[], int], rounds: int) -> float:
    """Items per second of the fastest round (least disturbed by the machine)."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        items = work()
        elapsed = time.perf_counter() - start
        best = max(best, items / elapsed if elapsed > 0 else float("inf"))
    return best


def _row(figure: str, value: float, unit: str, goal: str = "-", ok: bool = True) -> dict:
    return {"figure": figure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def run(samples: int = SAMPLES, rounds: int = ROUNDS, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    thresholds = Thresholds()
    batch = [(_sample_metrics(rng), rng.randint(1, 3)) for _ in range(samples)]
    lines = [json.dumps(asdict(m) | {"phase": p}) for m, p in batch]

    def evaluate_batch() -> int:
        for metrics, phase in batch:
            evaluate(metrics, thresholds, phase)
        return len(batch)

    def stream_batch() -> int:
        return sum(1 for _ in evaluate_stream(lines, thresholds))

    per_s = _best_rate(evaluate_batch, rounds)
    mix = {outcome: 0 for outcome in Outcome}
    for metrics, phase in batch:
        mix[evaluate(metrics, thresholds, phase).outcome] += 1
    return [
        _row("evaluate() throughput", round(per_s), "evaluations/s"),
        _row("evaluate() mean time", round(1e6 / per_s, 2), "us/evaluation"),
        _row("evaluate_stream() throughput", round(_best_rate(stream_batch, rounds)), "lines/s"),
        _row("sample verdict mix", _format_mix(mix), f"of {samples}"),
    ]


def _format_mix(mix: dict[Outcome, int]) -> str:
    return " ".join(f"{outcome.value}={count}" for outcome, count in mix.items())


if __name__ == "__main__":
    print(format_table(run()))
