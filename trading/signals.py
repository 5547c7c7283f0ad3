"""Heuristic confluence score 0..4 per candle. Pure numpy, no Django.

One point per agreeing factor, scored for each side:

- trend: EMA fast above EMA slow (long) / below (short)
- momentum: RSI inside (rsi_long_min, rsi_long_max) for long, (rsi_short_min, rsi_short_max)
  for short
- volume: volume above the mean of the previous `volume_period` candles (both sides)
- structure (Smart Money Concepts): break of structure, the first close above the last
  confirmed swing high (long) / below the last swing low (short); or a liquidity sweep, a
  wick below the last swing low with a close back above it (long) / mirror for short.
  A swing high is a high above the `swing_lookback` highs before it and not below the
  `swing_lookback` after it; it is confirmed (usable) `swing_lookback` candles later, so
  there is no look-ahead.

The side with the higher score wins (a tie gives no side). A Signal is emitted when the
score reaches `min_score` after the warm-up. Stop is `atr_mult` ATRs away, target
`reward_risk` times the stop distance on the other side.

`score_arrays`/`compute_signals` (replay) and `SignalEngine.update` (live, one candle at a
time) do the same floating-point operations in the same order, so they agree exactly.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .numbers import is_finite_number

FACTORS = ("trend", "momentum", "volume", "structure")
COLUMNS = ("timestamp_ms", "open", "high", "low", "close", "volume")


class InvalidSignalParams(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SignalParams:
    ema_fast: int = 9
    ema_slow: int = 21
    rsi_period: int = 14
    rsi_long_min: float = 50.0
    rsi_long_max: float = 70.0
    rsi_short_min: float = 30.0
    rsi_short_max: float = 50.0
    volume_period: int = 20
    swing_lookback: int = 2
    atr_period: int = 14
    atr_mult: float = 1.5
    reward_risk: float = 2.0
    min_score: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidSignalParams(f.name, f"must be an integer, got {value!r}")
            if f.type == "float" and not is_finite_number(value):
                raise InvalidSignalParams(f.name, f"must be a finite number, got {value!r}")
        _check(self.ema_fast >= 1, "ema_fast", "must be >= 1")
        _check(self.ema_slow > self.ema_fast, "ema_slow", "must be greater than ema_fast")
        for name in ("rsi_period", "atr_period", "volume_period", "swing_lookback"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for side in ("long", "short"):
            low, high = getattr(self, f"rsi_{side}_min"), getattr(self, f"rsi_{side}_max")
            _check(
                0 <= low < high <= 100,
                f"rsi_{side}_max",
                f"needs 0 <= rsi_{side}_min < rsi_{side}_max <= 100",
            )
        _check(self.atr_mult > 0, "atr_mult", "must be positive")
        _check(self.reward_risk > 0, "reward_risk", "must be positive")
        _check(1 <= self.min_score <= len(FACTORS), "min_score", f"must be in 1..{len(FACTORS)}")

    @property
    def warmup(self) -> int:
        """Index of the first candle that can be scored."""
        return max(self.ema_slow - 1, self.rsi_period, self.atr_period - 1, self.volume_period)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SignalParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSignalParams(unknown[0], "unknown parameter")
        return cls(**data)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidSignalParams(field, message)


@dataclass(frozen=True)
class Signal:
    side: str
    entry: float
    stop: float
    target: float
    reward_risk: float
    score: int
    factors: dict[str, bool]
    index: int
    ts: int

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ScoreArrays:
    """Per-candle indicators, factors and scores (arrays of equal length)."""

    ema_fast: np.ndarray
    ema_slow: np.ndarray
    rsi: np.ndarray
    atr: np.ndarray
    volume_mean: np.ndarray
    swing_high: np.ndarray
    swing_low: np.ndarray
    factors_long: dict[str, np.ndarray]
    factors_short: dict[str, np.ndarray]
    long_score: np.ndarray
    short_score: np.ndarray
    score: np.ndarray
    side: np.ndarray  # 1 long, -1 short, 0 none (tie or warm-up)
    valid: np.ndarray


# --------------------------------------------------------------------------- data loading


def load_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Candles CSV `timestamp_ms,open,high,low,close,volume` -> arrays keyed by column."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    arrays = {name: np.ascontiguousarray(data[:, i]) for i, name in enumerate(COLUMNS)}
    arrays["timestamp_ms"] = arrays["timestamp_ms"].astype(np.int64)
    return arrays


def candles_to_arrays(candles: Iterable[Any]) -> dict[str, np.ndarray]:
    rows = [_unpack(c) for c in candles]
    data = np.array(rows, dtype=np.float64).reshape(-1, 6)
    arrays = {name: np.ascontiguousarray(data[:, i]) for i, name in enumerate(COLUMNS)}
    arrays["timestamp_ms"] = arrays["timestamp_ms"].astype(np.int64)
    return arrays


def _unpack(candle: Any) -> tuple[float, float, float, float, float, float]:
    """A tuple (ts, o, h, l, c, v), a mapping or an object with open_time_ms..volume."""
    if isinstance(candle, tuple | list):
        return candle[0], candle[1], candle[2], candle[3], candle[4], candle[5]
    if isinstance(candle, Mapping):
        ts = candle["open_time_ms"] if "open_time_ms" in candle else candle["timestamp_ms"]
        return ts, candle["open"], candle["high"], candle["low"], candle["close"], candle["volume"]
    return (
        candle.open_time_ms,
        candle.open,
        candle.high,
        candle.low,
        candle.close,
        candle.volume,
    )


# --------------------------------------------------------------------------- scalar steps
# Shared by both paths so every rounding happens the same way.


def _rsi_value(avg_gain: float, avg_loss: float) -> float:
    if avg_loss == 0.0:
        return 100.0 if avg_gain > 0.0 else 50.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


def _ema(values: list[float], period: int) -> list[float]:
    alpha = 2.0 / (period + 1)
    out = [0.0] * len(values)
    y = values[0] if values else 0.0
    for i, x in enumerate(values):
        y = y + alpha * (x - y)
        out[i] = y
    return out


def _wilder(values: list[float], period: int, start: int) -> list[float]:
    """Wilder's moving average of values[start:], seeded with the plain mean of the first
    `period` of them; NaN before it is defined."""
    n = len(values)
    out = [math.nan] * n
    seed_end = start + period
    if seed_end > n:
        return out
    total = 0.0
    for x in values[start:seed_end]:
        total += x
    avg = total / period
    out[seed_end - 1] = avg
    keep = period - 1
    for i in range(seed_end, n):
        avg = (avg * keep + values[i]) / period
        out[i] = avg
    return out


def _rsi(close: list[float], period: int) -> list[float]:
    gains = [0.0] * len(close)
    losses = [0.0] * len(close)
    for i in range(1, len(close)):
        delta = close[i] - close[i - 1]
        if delta > 0.0:
            gains[i] = delta
        else:
            losses[i] = -delta
    avg_gain = _wilder(gains, period, 1)
    avg_loss = _wilder(losses, period, 1)
    return [
        math.nan if math.isnan(g) else _rsi_value(g, lo)
        for g, lo in zip(avg_gain, avg_loss, strict=True)
    ]


def _true_range(high: float, low: float, prev_close: float | None) -> float:
    if prev_close is None:
        return high - low
    return max(high - low, abs(high - prev_close), abs(low - prev_close))


# --------------------------------------------------------------------------- vectorised path


def _window_mean_before(volume: np.ndarray, period: int) -> np.ndarray:
    """Mean of the `period` values before each index, summed left to right; NaN if short."""
    n = len(volume)
    out = np.full(n, np.nan)
    if n <= period:
        return out
    total = volume[0 : n - period].copy()
    for k in range(1, period):
        total += volume[k : n - period + k]
    out[period:] = total / period
    return out


def _swing_levels(values: np.ndarray, k: int, high: bool) -> np.ndarray:
    """Level of the last swing confirmed at or before each index (NaN before the first)."""
    n = len(values)
    level = np.full(n, np.nan)
    if n < 2 * k + 1:
        return level
    win = np.lib.stride_tricks.sliding_window_view(values, 2 * k + 1)
    centre = win[:, k]
    if high:
        is_swing = (centre > win[:, :k].max(axis=1)) & (centre >= win[:, k + 1 :].max(axis=1))
    else:
        is_swing = (centre < win[:, :k].min(axis=1)) & (centre <= win[:, k + 1 :].min(axis=1))
    confirmed_at = np.flatnonzero(is_swing) + 2 * k
    source = np.full(n, -1, dtype=np.int64)
    source[confirmed_at] = confirmed_at - k
    source = np.maximum.accumulate(source)
    has = source >= 0
    level[has] = values[source[has]]
    return level


def _structure(
    close: np.ndarray, high: np.ndarray, low: np.ndarray, sh: np.ndarray, sl: np.ndarray
):
    prev_close = np.concatenate(([np.nan], close[:-1]))
    with np.errstate(invalid="ignore"):
        bos_long = (close > sh) & (prev_close <= sh)
        bos_short = (close < sl) & (prev_close >= sl)
        sweep_long = (low < sl) & (close > sl)
        sweep_short = (high > sh) & (close < sh)
    return bos_long | sweep_long, bos_short | sweep_short


def _as_float(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float64))


def score_arrays(
    arrays: Mapping[str, np.ndarray], params: SignalParams | None = None
) -> ScoreArrays:
    """Indicators, factors and scores for every candle of `arrays` (keys as in COLUMNS)."""
    p = params or SignalParams()
    high, low, close, volume = (_as_float(arrays, k) for k in ("high", "low", "close", "volume"))
    n = len(close)
    close_list = close.tolist()
    ema_fast = np.array(_ema(close_list, p.ema_fast))
    ema_slow = np.array(_ema(close_list, p.ema_slow))
    rsi = np.array(_rsi(close_list, p.rsi_period), dtype=np.float64)
    prev_close = np.concatenate((close[:1], close[:-1]))
    tr = np.maximum(high - low, np.maximum(np.abs(high - prev_close), np.abs(low - prev_close)))
    if n:
        tr[0] = high[0] - low[0]
    atr = np.array(_wilder(tr.tolist(), p.atr_period, 0), dtype=np.float64)
    volume_mean = _window_mean_before(volume, p.volume_period)
    sh = _swing_levels(high, p.swing_lookback, high=True)
    sl = _swing_levels(low, p.swing_lookback, high=False)
    structure_long, structure_short = _structure(close, high, low, sh, sl)
    valid = np.arange(n) >= p.warmup
    with np.errstate(invalid="ignore"):
        volume_up = volume > volume_mean
        factors_long = {
            "trend": ema_fast > ema_slow,
            "momentum": (rsi > p.rsi_long_min) & (rsi < p.rsi_long_max),
            "volume": volume_up,
            "structure": structure_long,
        }
        factors_short = {
            "trend": ema_fast < ema_slow,
            "momentum": (rsi > p.rsi_short_min) & (rsi < p.rsi_short_max),
            "volume": volume_up,
            "structure": structure_short,
        }
    for factors in (factors_long, factors_short):
        for name in FACTORS:
            factors[name] = factors[name] & valid
    long_score = sum(factors_long[f].astype(np.int8) for f in FACTORS).astype(np.int8)
    short_score = sum(factors_short[f].astype(np.int8) for f in FACTORS).astype(np.int8)
    side = np.sign(long_score.astype(np.int16) - short_score).astype(np.int8)
    score = np.maximum(long_score, short_score).astype(np.int8)
    return ScoreArrays(
        ema_fast, ema_slow, rsi, atr, volume_mean, sh, sl,
        factors_long, factors_short, long_score, short_score, score, side, valid,
    )  # fmt: skip


def _levels(side: int, entry: float, atr: float, p: SignalParams) -> tuple[float, float, float]:
    distance = p.atr_mult * atr
    if side > 0:
        stop, target = entry - distance, entry + p.reward_risk * distance
    else:
        stop, target = entry + distance, entry - p.reward_risk * distance
    return stop, target, abs(target - entry) / abs(entry - stop)


def compute_signals(
    arrays: Mapping[str, np.ndarray], params: SignalParams | None = None
) -> list[Signal]:
    """Signals of a replay: every scored candle whose score reaches `params.min_score`."""
    p = params or SignalParams()
    s = score_arrays(arrays, p)
    close = _as_float(arrays, "close")
    ts = np.asarray(arrays["timestamp_ms"], dtype=np.int64)
    with np.errstate(invalid="ignore"):
        hits = np.flatnonzero((s.score >= p.min_score) & (s.side != 0) & (s.atr > 0))
    signals = []
    for i in hits.tolist():
        side = int(s.side[i])
        factors = s.factors_long if side > 0 else s.factors_short
        entry = float(close[i])
        stop, target, rr = _levels(side, entry, float(s.atr[i]), p)
        signals.append(
            Signal(
                side="buy" if side > 0 else "sell",
                entry=entry,
                stop=stop,
                target=target,
                reward_risk=rr,
                score=int(s.score[i]),
                factors={f: bool(factors[f][i]) for f in FACTORS},
                index=i,
                ts=int(ts[i]),
            )
        )
    return signals


# --------------------------------------------------------------------------- live path


class SignalEngine:
    """Incremental scorer: feed closed candles in order, get the same Signals as the replay.

    Keeps EMA/RSI/ATR state and windows of `volume_period` volumes and `2*swing_lookback+1`
    highs/lows. A candle whose open time is not after the previous one is ignored.
    """

    def __init__(self, params: SignalParams | None = None):
        self.params = p = params or SignalParams()
        self.index = -1
        self.last_ts: int | None = None
        self.skipped = 0
        self._alpha_fast = 2.0 / (p.ema_fast + 1)
        self._alpha_slow = 2.0 / (p.ema_slow + 1)
        self._ema_fast = self._ema_slow = 0.0
        self._prev_close: float | None = None
        self._gain_sum = self._loss_sum = 0.0
        self._avg_gain = self._avg_loss = math.nan
        self._tr_sum = 0.0
        self._atr = math.nan
        self._volumes: deque[float] = deque(maxlen=p.volume_period)
        width = 2 * p.swing_lookback + 1
        self._highs: deque[float] = deque(maxlen=width)
        self._lows: deque[float] = deque(maxlen=width)
        self._swing_high = math.nan
        self._swing_low = math.nan
        self.last_factors: tuple[dict[str, bool], dict[str, bool]] | None = None

    def update(self, candle: Any) -> Signal | None:
        ts, _open, high, low, close, volume = _unpack(candle)
        if self.last_ts is not None and ts <= self.last_ts:
            self.skipped += 1
            return None
        self.last_ts = ts
        self.index += 1
        prev_close = self._prev_close
        rsi = self._step_indicators(high, low, close, prev_close)
        volume_up = self._step_volume(volume)
        self._step_swings(high, low)
        self._prev_close = close
        if self.index < self.params.warmup:
            self.last_factors = None
            return None
        return self._score(ts, high, low, close, prev_close, rsi, volume_up)

    def _step_indicators(
        self, high: float, low: float, close: float, prev_close: float | None
    ) -> float:
        p, i = self.params, self.index
        if i == 0:
            self._ema_fast = self._ema_slow = close
        self._ema_fast = self._ema_fast + self._alpha_fast * (close - self._ema_fast)
        self._ema_slow = self._ema_slow + self._alpha_slow * (close - self._ema_slow)
        tr = _true_range(high, low, prev_close)
        self._atr = self._wilder_step(self._atr, tr, i + 1, p.atr_period, "_tr_sum")
        if prev_close is None:
            return math.nan
        delta = close - prev_close
        gain, loss = (delta, 0.0) if delta > 0.0 else (0.0, -delta)
        self._avg_gain = self._wilder_step(self._avg_gain, gain, i, p.rsi_period, "_gain_sum")
        self._avg_loss = self._wilder_step(self._avg_loss, loss, i, p.rsi_period, "_loss_sum")
        if math.isnan(self._avg_gain):
            return math.nan
        return _rsi_value(self._avg_gain, self._avg_loss)

    def _wilder_step(
        self, avg: float, value: float, count: int, period: int, sum_attr: str
    ) -> float:
        """`count` = how many values (this one included) have been seen."""
        if count < period:
            setattr(self, sum_attr, getattr(self, sum_attr) + value)
            return math.nan
        if count == period:
            return (getattr(self, sum_attr) + value) / period
        return (avg * (period - 1) + value) / period

    def _step_volume(self, volume: float) -> bool:
        window = self._volumes
        up = False
        if len(window) == window.maxlen:
            total = 0.0
            for v in window:
                total += v
            up = volume > total / self.params.volume_period
        window.append(volume)
        return up

    def _step_swings(self, high: float, low: float) -> None:
        self._highs.append(high)
        self._lows.append(low)
        k = self.params.swing_lookback
        if len(self._highs) < 2 * k + 1:
            return
        highs, lows = list(self._highs), list(self._lows)
        centre = highs[k]
        if centre > max(highs[:k]) and centre >= max(highs[k + 1 :]):
            self._swing_high = centre
        centre = lows[k]
        if centre < min(lows[:k]) and centre <= min(lows[k + 1 :]):
            self._swing_low = centre

    def _score(
        self,
        ts: int,
        high: float,
        low: float,
        close: float,
        prev_close: float | None,
        rsi: float,
        volume_up: bool,
    ) -> Signal | None:
        p = self.params
        sh, sl = self._swing_high, self._swing_low
        pc = math.nan if prev_close is None else prev_close
        long_f = {
            "trend": self._ema_fast > self._ema_slow,
            "momentum": p.rsi_long_min < rsi < p.rsi_long_max,
            "volume": volume_up,
            "structure": (close > sh and pc <= sh) or (low < sl and close > sl),
        }
        short_f = {
            "trend": self._ema_fast < self._ema_slow,
            "momentum": p.rsi_short_min < rsi < p.rsi_short_max,
            "volume": volume_up,
            "structure": (close < sl and pc >= sl) or (high > sh and close < sh),
        }
        self.last_factors = (long_f, short_f)
        long_score, short_score = sum(long_f.values()), sum(short_f.values())
        score = max(long_score, short_score)
        if score < p.min_score or long_score == short_score or not self._atr > 0:
            return None
        side = 1 if long_score > short_score else -1
        stop, target, rr = _levels(side, close, self._atr, p)
        return Signal(
            side="buy" if side > 0 else "sell",
            entry=close,
            stop=stop,
            target=target,
            reward_risk=rr,
            score=score,
            factors=long_f if side > 0 else short_f,
            index=self.index,
            ts=int(ts),
        )
