"""Backtest: the configured detectors and rules over a candle series, in event time.

Pure (no ORM): the management command passes the rules it read (or the defaults).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .detectors import Arrays, Detection, scan_all
from .rules import RateLimiter, RuleSpec, decide, rate_key, rate_limit_for, resolve_rules


@dataclass(frozen=True)
class BacktestRow:
    ts: int
    symbol: str
    timeframe: str
    detector: str
    direction: str
    value: float | None
    severity: str
    suppressed: bool
    reason: str
    index: int

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["time"] = datetime.fromtimestamp(self.ts / 1000, tz=UTC).isoformat()
        return row


def run_backtest(
    arrays: Arrays,
    *,
    symbol: str,
    timeframe: str,
    rules: Iterable[RuleSpec],
    default_rate_limit_s: float,
) -> list[BacktestRow]:
    """Every detection, in candle order, with the rule decision the live path would take."""
    active = resolve_rules(rules, symbol, timeframe)
    by_name = {spec.detector: spec for spec in active}
    detections = scan_all(arrays, [spec.build() for spec in active])
    limiter = RateLimiter()
    return [
        _decide(det, by_name[det.detector], symbol, timeframe, limiter, default_rate_limit_s)
        for det in detections
    ]


def _decide(
    det: Detection,
    spec: RuleSpec,
    symbol: str,
    timeframe: str,
    limiter: RateLimiter,
    default_rate_limit_s: float,
) -> BacktestRow:
    key = rate_key(symbol, timeframe, det.detector, det.direction)
    decision = decide(
        symbol=symbol,
        detector=det.detector,
        event_ms=det.ts,
        last_passed_ms=limiter.last(key),
        limit_s=rate_limit_for(spec, default_rate_limit_s),
    )
    if not decision.suppressed:
        limiter.passed(key, det.ts)
    return BacktestRow(
        ts=det.ts,
        symbol=symbol,
        timeframe=timeframe,
        detector=det.detector,
        direction=det.direction,
        value=det.value,
        severity=spec.severity,
        suppressed=decision.suppressed,
        reason=decision.reason or decision.code,
        index=det.index,
    )


def counts(rows: Sequence[BacktestRow]) -> dict[str, dict[str, int]]:
    total = Counter(r.detector for r in rows)
    suppressed = Counter(r.detector for r in rows if r.suppressed)
    return {
        name: {
            "detections": total[name],
            "suppressed": suppressed[name],
            "delivered": total[name] - suppressed[name],
        }
        for name in sorted(total)
    }
