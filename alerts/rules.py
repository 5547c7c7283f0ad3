"""Rules between detection and delivery. Pure: no ORM, no Django, time passed in.

The live path (alerts.services) and the backtest (alerts.backtest) call the same
functions here, so a CSV replay makes the same rate-limit decisions as the worker.

Decision order for one detection: dedupe (one alert per candle and detector: the caller's
unique key), then silence, then rate limit (per symbol, timeframe, detector, direction, in
event time: the candle's open time).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .detectors import Detector, DetectorConfigError, get_detector

SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
WILDCARD = ""

RATE_LIMITED = "rate_limited"
SILENCED = "silenced"
DELIVER = "deliver"


def severity_rank(severity: str) -> int:
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        raise ValueError(f"unknown severity {severity!r}; one of {list(SEVERITIES)}") from None


# --------------------------------------------------------------------------- rule specs


@dataclass(frozen=True)
class RuleSpec:
    """One configured detector for a stream pattern ("" is the wildcard)."""

    detector: str
    params: Mapping[str, Any] = field(default_factory=dict)
    symbol: str = WILDCARD
    timeframe: str = WILDCARD
    enabled: bool = True
    severity: str = "info"
    rate_limit_s: float | None = None

    @property
    def specificity(self) -> int:
        return (2 if self.symbol else 0) + (1 if self.timeframe else 0)

    def matches(self, symbol: str, timeframe: str) -> bool:
        return self.symbol in (WILDCARD, symbol) and self.timeframe in (WILDCARD, timeframe)

    def build(self) -> Detector[Any, Any]:
        return build_detector(self.detector, self.params)


DEFAULT_RULES: tuple[RuleSpec, ...] = (
    RuleSpec("volatility", {"window": 20, "k": 2.0}, severity="warning"),
    RuleSpec("engulfing", {}, severity="info"),
)


def build_detector(name: str, params: Mapping[str, Any]) -> Detector[Any, Any]:
    """A detector from a name and params; DetectorConfigError names the bad field, with
    params fields prefixed ``params.``."""
    if not isinstance(params, Mapping):
        raise DetectorConfigError("params", "must be a JSON object")
    if name == "":
        raise DetectorConfigError("detector", "is required")
    try:
        return get_detector(name, **params)
    except DetectorConfigError as err:
        if err.field == "name":
            raise DetectorConfigError("detector", err.message) from None
        raise DetectorConfigError(f"params.{err.field}", err.message) from None
    except TypeError as err:
        raise DetectorConfigError("params", str(err)) from None


def validate_rule(spec: RuleSpec) -> None:
    """Raise DetectorConfigError naming the field of a rule that cannot work."""
    build_detector(spec.detector, spec.params)
    if spec.severity not in SEVERITIES:
        raise DetectorConfigError("severity", f"must be one of {list(SEVERITIES)}")
    limit = spec.rate_limit_s
    if limit is not None and (isinstance(limit, bool) or not 0 <= limit < math.inf):
        raise DetectorConfigError("rate_limit_s", f"must be a number >= 0, got {limit!r}")


def resolve_rules(specs: Iterable[RuleSpec], symbol: str, timeframe: str) -> list[RuleSpec]:
    """The enabled rules for one stream: per detector the most specific matching rule wins
    (symbol+timeframe > symbol > timeframe > wildcard); stored rules beat the defaults of
    the same specificity. Sorted by detector name."""
    best: dict[str, tuple[tuple[int, int], RuleSpec]] = {}
    candidates = [(0, s) for s in DEFAULT_RULES] + [(1, s) for s in specs]
    for stored, spec in candidates:
        if not spec.matches(symbol, timeframe):
            continue
        rank = (spec.specificity, stored)
        current = best.get(spec.detector)
        if current is None or rank >= current[0]:
            best[spec.detector] = (rank, spec)
    return [spec for _, (_, spec) in sorted(best.items()) if spec.enabled]


def rate_limit_for(spec: RuleSpec | None, default_s: float) -> float:
    if spec is None or spec.rate_limit_s is None:
        return default_s
    return float(spec.rate_limit_s)


# --------------------------------------------------------------------------- decisions


def rate_key(symbol: str, timeframe: str, detector: str, direction: str) -> str:
    return f"{symbol}|{timeframe}|{detector}|{direction}"


def candle_dedupe_key(candle_id: int, detector: str) -> str:
    return f"candle:{candle_id}:{detector}"


@dataclass(frozen=True)
class SilenceSpec:
    id: int
    symbol: str
    detector: str
    expires_ms: int
    author: str = ""
    reason: str = ""

    def covers(self, symbol: str, detector: str, now_ms: int) -> bool:
        return (
            now_ms < self.expires_ms
            and self.symbol in (WILDCARD, symbol)
            and self.detector in (WILDCARD, detector)
        )


@dataclass(frozen=True)
class Decision:
    suppressed: bool
    code: str
    reason: str = ""
    silence_id: int | None = None


def rate_limited(last_passed_ms: int | None, event_ms: int, limit_s: float) -> bool:
    """True when an alert for the same key passed less than ``limit_s`` of event time ago."""
    if last_passed_ms is None or limit_s <= 0:
        return False
    return event_ms - last_passed_ms < limit_s * 1000


def decide(
    *,
    symbol: str,
    detector: str,
    event_ms: int,
    last_passed_ms: int | None,
    limit_s: float,
    silences: Sequence[SilenceSpec] = (),
    now_ms: int = 0,
) -> Decision:
    for silence in silences:
        if silence.covers(symbol, detector, now_ms):
            reason = f"silence #{silence.id} by {silence.author or '?'}: {silence.reason}"
            return Decision(True, SILENCED, reason[:200], silence.id)
    if rate_limited(last_passed_ms, event_ms, limit_s):
        gap_s = (event_ms - last_passed_ms) / 1000 if last_passed_ms is not None else 0.0
        reason = f"rate limit: previous alert {gap_s:g}s earlier (limit {limit_s:g}s)"
        return Decision(True, RATE_LIMITED, reason)
    return Decision(False, DELIVER)


class RateLimiter:
    """In-memory rate-limit state for a replay: remembers the last passed event per key."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def last(self, key: str) -> int | None:
        return self._last.get(key)

    def passed(self, key: str, event_ms: int) -> None:
        self._last[key] = event_ms


def queue_has_room(pending: int, limit: int) -> bool:
    """Bounded pending queue: a new queued delivery is admitted while fewer than
    ``limit`` deliveries are waiting."""
    return pending < limit


# --------------------------------------------------------------------------- subscriptions


@dataclass(frozen=True)
class Filters:
    """What a subscriber wants: empty symbol/detector lists mean everything."""

    symbols: tuple[str, ...] = ()
    detectors: tuple[str, ...] = ()
    min_severity: str = "info"

    def matches(self, *, symbol: str, detector: str, severity: str) -> bool:
        if self.symbols and symbol not in self.symbols:
            return False
        if self.detectors and detector not in self.detectors:
            return False
        return severity_rank(severity) >= severity_rank(self.min_severity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "symbols": list(self.symbols),
            "detectors": list(self.detectors),
            "min_severity": self.min_severity,
        }


def _str_list(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name}: must be a list of non-empty strings")
    if len(value) > 100:
        raise ValueError(f"{name}: at most 100 entries")
    return tuple(value)


def parse_filters(data: Mapping[str, Any]) -> Filters:
    """Filters from a client message or a stored subscription; ValueError names the field."""
    severity = data.get("min_severity") or "info"
    if severity not in SEVERITIES:
        raise ValueError(f"min_severity: must be one of {list(SEVERITIES)}")
    return Filters(
        symbols=_str_list("symbols", data.get("symbols")),
        detectors=_str_list("detectors", data.get("detectors")),
        min_severity=severity,
    )


# --------------------------------------------------------------------------- throttling


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(now)`` spends one if available."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
