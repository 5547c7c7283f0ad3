"""Candle pattern detectors with a live (incremental) path and a backtest (vectorised) path.

Both paths of every detector give identical detections for the same candle stream. Where a
detector does floating-point arithmetic, both paths perform the same IEEE operations in the
same order (sequential window sums, ``math.log`` for returns), so flags never flip on
borderline comparisons. Window statistics depend only on the last ``window`` candles, so a
live runner warmed up with that much history reproduces the backtest exactly.

Prices must be finite and positive and volumes finite and non-negative; ``scan_all`` and
``LiveRunner`` reject other input up front (ValueError) so no detector sees it.

Pure Python + numpy; no Django import.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from trading.numbers import is_finite_number

Direction = Literal["up", "down"]
FloatArray = NDArray[np.float64]
Arrays = Mapping[str, np.ndarray]

PRICE_COLUMNS: tuple[str, ...] = ("open", "high", "low", "close", "volume")
TIME_COLUMN = "open_time_ms"
CSV_TIME_COLUMN = "timestamp_ms"


@dataclass(frozen=True, slots=True)
class Candle:
    open_time_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float


@dataclass(frozen=True, slots=True)
class Detection:
    index: int
    ts: int
    detector: str
    direction: Direction
    value: float | None


class DetectorConfigError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- data helpers


def load_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``timestamp_ms,open,high,low,close,volume`` CSV into column arrays.

    Keys are ``open_time_ms`` (int64) and the ``PRICE_COLUMNS`` (float64).
    """
    path = Path(path)
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    names = [h.strip() for h in header]
    wanted = (CSV_TIME_COLUMN, *PRICE_COLUMNS)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    dtype = [(c, np.int64 if c == CSV_TIME_COLUMN else np.float64) for c in wanted]
    table = np.loadtxt(
        path,
        delimiter=",",
        skiprows=1,
        usecols=[names.index(c) for c in wanted],
        dtype=dtype,
        ndmin=1,
    )
    arrays: dict[str, np.ndarray] = {TIME_COLUMN: np.ascontiguousarray(table[CSV_TIME_COLUMN])}
    for col in PRICE_COLUMNS:
        arrays[col] = np.ascontiguousarray(table[col])
    return arrays


def as_arrays(arrays: Arrays) -> dict[str, np.ndarray]:
    """Validate column names/lengths and coerce to contiguous int64/float64 arrays."""
    missing = [c for c in (TIME_COLUMN, *PRICE_COLUMNS) if c not in arrays]
    if missing:
        raise ValueError(f"candle arrays missing columns {missing}")
    out = {TIME_COLUMN: np.ascontiguousarray(arrays[TIME_COLUMN], dtype=np.int64)}
    for col in PRICE_COLUMNS:
        out[col] = np.ascontiguousarray(arrays[col], dtype=np.float64)
    lengths = {len(a) for a in out.values()}
    if len(lengths) != 1:
        raise ValueError(f"candle arrays have different lengths {sorted(lengths)}")
    return out


def candles_from_arrays(arrays: Arrays) -> list[Candle]:
    a = as_arrays(arrays)
    columns = [a[TIME_COLUMN].tolist()] + [a[c].tolist() for c in PRICE_COLUMNS]
    return [Candle(*row) for row in zip(*columns, strict=True)]


def arrays_from_candles(candles: Iterable[Candle]) -> dict[str, np.ndarray]:
    rows = list(candles)
    out = {TIME_COLUMN: np.array([c.open_time_ms for c in rows], dtype=np.int64)}
    for col in PRICE_COLUMNS:
        out[col] = np.array([getattr(c, col) for c in rows], dtype=np.float64)
    return out


def _detections(
    name: str,
    ts: np.ndarray,
    idx: np.ndarray,
    up: np.ndarray,
    values: np.ndarray | list[float | None] | None,
) -> list[Detection]:
    idx_list = idx.tolist()
    ts_list = ts[idx].tolist()
    dirs = ["up" if u else "down" for u in up.tolist()]
    if values is None:
        vals: list[float | None] = [None] * len(idx_list)
    else:
        vals = values if isinstance(values, list) else values.tolist()
    return [
        Detection(i, t, name, d, v)  # type: ignore[arg-type]
        for i, t, d, v in zip(idx_list, ts_list, dirs, vals, strict=True)
    ]


def _require_positive_prices(name: str, prices: FloatArray) -> None:
    if not np.all((prices > 0.0) & (prices < np.inf)):
        raise ValueError(f"{name} detector needs finite positive prices")


def _require_sane_arrays(a: Mapping[str, np.ndarray]) -> None:
    for col in ("open", "high", "low", "close"):
        _require_positive_prices(col, a[col])
    vol = a["volume"]
    if not np.all((vol >= 0.0) & (vol < np.inf)):
        raise ValueError("volumes must be finite and non-negative")


def _require_sane_candle(c: Candle) -> None:
    if not (
        0.0 < c.open < math.inf
        and 0.0 < c.high < math.inf
        and 0.0 < c.low < math.inf
        and 0.0 < c.close < math.inf
        and 0.0 <= c.volume < math.inf
    ):
        raise ValueError(f"candle needs finite positive prices and volume >= 0: {c!r}")


def _check_price(name: str, price: float) -> None:
    if not 0.0 < price < math.inf:
        raise ValueError(f"{name} detector needs finite positive prices, got {price!r}")


def _window_sums(x: FloatArray, window: int) -> FloatArray:
    """Sum of ``x[t : t + window]`` for every t with a following element, left to right.

    The live path sums its ring buffer oldest-first starting from 0.0, which is exactly this.
    """
    m = len(x) - window
    total = np.zeros(m)
    for j in range(window):
        total += x[j : j + m]
    return total


def _ring_sum(values: Iterable[float]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


# --------------------------------------------------------------------------- params + base

P = TypeVar("P", bound="DetectorParams")
S = TypeVar("S")


# A window is the candles a detector keeps per stream and reads back at every pass: about
# five weeks of 5-minute candles at most.
MAX_WINDOW = 10_000


def _check_int(field: str, value: object, minimum: int, maximum: int = MAX_WINDOW) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DetectorConfigError(field, f"must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise DetectorConfigError(field, f"must be in {minimum}..{maximum}, got {_shown(value)}")


def _check_positive(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DetectorConfigError(field, f"must be a number, got {value!r}")
    if not is_finite_number(value) or value <= 0:
        raise DetectorConfigError(field, f"must be a finite number > 0, got {_shown(value)}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


@dataclass(frozen=True)
class DetectorParams:
    def validate(self) -> None:
        """Raise DetectorConfigError naming the offending field."""


class Detector(ABC, Generic[P, S]):
    """One detector: subclass, set ``name`` and ``params_type``, decorate with ``@register``."""

    name: ClassVar[str]
    params_type: ClassVar[type[DetectorParams]] = DetectorParams

    def __init__(self, params: P | None = None, **kwargs: Any) -> None:
        if params is not None and kwargs:
            raise TypeError("pass either a params object or keyword params, not both")
        resolved = self._params_from_kwargs(kwargs) if params is None else params
        resolved.validate()
        self.params: P = resolved  # type: ignore[assignment]
        self.setup()

    @classmethod
    def _params_from_kwargs(cls, kwargs: Mapping[str, Any]) -> DetectorParams:
        known = {f.name for f in dataclasses.fields(cls.params_type)}
        for key in kwargs:
            if key not in known:
                raise DetectorConfigError(key, f"unknown parameter for detector {cls.name!r}")
        return cls.params_type(**kwargs)

    def setup(self) -> None:
        """Cache derived values from validated params (hook for subclasses)."""

    @property
    def lookback(self) -> int:
        """Previous candles a live runner needs to decide on the next candle exactly as
        ``scan`` does over the whole series."""
        return 1

    @abstractmethod
    def make_state(self) -> S: ...

    @abstractmethod
    def update(self, state: S, candle: Candle) -> Detection | None: ...

    @abstractmethod
    def scan(self, arrays: Arrays) -> list[Detection]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


REGISTRY: dict[str, type[Detector[Any, Any]]] = {}

D = TypeVar("D", bound=type[Detector[Any, Any]])


def register(cls: D) -> D:
    name = cls.name
    existing = REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"detector name {name!r} already registered by {existing.__name__}")
    REGISTRY[name] = cls
    return cls


def get_detector(name: str, **params: Any) -> Detector[Any, Any]:
    try:
        cls = REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise DetectorConfigError("name", f"unknown detector {name!r} (known: {known})") from None
    return cls(**params)


@dataclass(slots=True)
class _StreamState:
    count: int = 0


# --------------------------------------------------------------------------- volatility


@dataclass(frozen=True)
class VolatilityParams(DetectorParams):
    window: int = 20
    k: float = 2.0

    def validate(self) -> None:
        _check_int("window", self.window, 2)
        _check_positive("k", self.k)


@dataclass(slots=True)
class VolatilityState(_StreamState):
    prev_close: float | None = None
    returns: deque[float] = dataclasses.field(default_factory=deque)


@register
class VolatilityDetector(Detector[VolatilityParams, VolatilityState]):
    """Log return more than k sample standard deviations from the mean of the previous N."""

    name = "volatility"
    params_type = VolatilityParams

    def setup(self) -> None:
        self._n = self.params.window
        self._k = float(self.params.k)

    @property
    def lookback(self) -> int:
        return self._n + 1

    def make_state(self) -> VolatilityState:
        return VolatilityState(returns=deque(maxlen=self._n))

    def update(self, state: VolatilityState, candle: Candle) -> Detection | None:
        close = candle.close
        _check_price(self.name, close)
        index = state.count
        state.count = index + 1
        prev = state.prev_close
        state.prev_close = close
        if prev is None:
            return None
        r = math.log(close / prev)
        buf = state.returns
        hit = None
        n = self._n
        if len(buf) == n:
            shift = buf[0]
            s = 0.0
            for x in buf:
                s += x - shift
            mu = s / n
            ss = 0.0
            for x in buf:
                d = (x - shift) - mu
                ss += d * d
            sigma = math.sqrt(ss / (n - 1))
            dev = (r - shift) - mu
            if sigma > 0.0 and abs(dev) > self._k * sigma:
                z = dev / sigma
                hit = Detection(index, candle.open_time_ms, self.name, "up" if z > 0 else "down", z)
        buf.append(r)
        return hit

    def scan(self, arrays: Arrays) -> list[Detection]:
        a = as_arrays(arrays)
        close = a["close"]
        _require_positive_prices(self.name, close)
        n = self._n
        if len(close) < n + 2:
            return []
        ratio = close[1:] / close[:-1]
        # np.log may differ from libm by an ulp; math.log keeps both paths bit-identical.
        r = np.fromiter(map(math.log, ratio.tolist()), dtype=np.float64, count=len(ratio))
        m = len(r) - n
        # Statistics of the window shifted by its first value: a window of identical returns
        # then gives exactly sigma == 0, which the unshifted mean does not guarantee.
        shift = r[:m]
        s = np.zeros(m)
        for j in range(n):
            s += r[j : j + m] - shift
        mu = s / n
        ss = np.zeros(m)
        for j in range(n):
            d = (r[j : j + m] - shift) - mu
            ss += d * d
        sigma = np.sqrt(ss / (n - 1))
        dev = (r[n:] - shift) - mu
        hit = (sigma > 0.0) & (np.abs(dev) > self._k * sigma)
        t = np.flatnonzero(hit)
        z = dev[t] / sigma[t]
        # r[j] is the return into candle j + 1, and the tested return is r[t + n].
        return _detections(self.name, a[TIME_COLUMN], t + n + 1, z > 0, z)


# --------------------------------------------------------------------------- engulfing


@dataclass(slots=True)
class EngulfingState(_StreamState):
    prev_open: float | None = None
    prev_close: float = 0.0


def _engulfing(o1: Any, c1: Any, o2: Any, c2: Any) -> tuple[Any, Any]:
    """Shared predicate; works on floats and on numpy arrays alike."""
    bull = (o1 > c1) & (c2 > o2) & (o2 <= c1) & (c2 >= o1) & ((c2 - o2) > (o1 - c1))
    bear = (c1 > o1) & (o2 > c2) & (o2 >= c1) & (c2 <= o1) & ((o2 - c2) > (c1 - o1))
    return bull, bear


@register
class EngulfingDetector(Detector[DetectorParams, EngulfingState]):
    """Body of the current candle engulfs the opposite-coloured body of the previous one."""

    name = "engulfing"

    def make_state(self) -> EngulfingState:
        return EngulfingState()

    def update(self, state: EngulfingState, candle: Candle) -> Detection | None:
        index = state.count
        state.count = index + 1
        o1, c1 = state.prev_open, state.prev_close
        o2, c2 = candle.open, candle.close
        state.prev_open, state.prev_close = o2, c2
        if o1 is None:
            return None
        bull, bear = _engulfing(o1, c1, o2, c2)
        if bull:
            return Detection(index, candle.open_time_ms, self.name, "up", None)
        if bear:
            return Detection(index, candle.open_time_ms, self.name, "down", None)
        return None

    def scan(self, arrays: Arrays) -> list[Detection]:
        a = as_arrays(arrays)
        o, c = a["open"], a["close"]
        bull, bear = _engulfing(o[:-1], c[:-1], o[1:], c[1:])
        t = np.flatnonzero(bull | bear)
        return _detections(self.name, a[TIME_COLUMN], t + 1, bull[t], None)


# --------------------------------------------------------------------------- breakout


@dataclass(frozen=True)
class WindowParams(DetectorParams):
    window: int = 20

    def validate(self) -> None:
        _check_int("window", self.window, 1)


@dataclass(slots=True)
class BreakoutState(_StreamState):
    highs: deque[float] = dataclasses.field(default_factory=deque)
    lows: deque[float] = dataclasses.field(default_factory=deque)


@register
class BreakoutDetector(Detector[WindowParams, BreakoutState]):
    """Close above the highest high ("up") or below the lowest low ("down") of the previous N.

    value is the level that was broken.
    """

    name = "breakout"
    params_type = WindowParams

    @property
    def lookback(self) -> int:
        return self.params.window

    def make_state(self) -> BreakoutState:
        n = self.params.window
        return BreakoutState(highs=deque(maxlen=n), lows=deque(maxlen=n))

    def update(self, state: BreakoutState, candle: Candle) -> Detection | None:
        index = state.count
        state.count = index + 1
        highs, lows = state.highs, state.lows
        hit = None
        if len(highs) == self.params.window:
            top, bottom = max(highs), min(lows)
            if candle.close > top:
                hit = Detection(index, candle.open_time_ms, self.name, "up", top)
            elif candle.close < bottom:
                hit = Detection(index, candle.open_time_ms, self.name, "down", bottom)
        highs.append(candle.high)
        lows.append(candle.low)
        return hit

    def scan(self, arrays: Arrays) -> list[Detection]:
        a = as_arrays(arrays)
        n = self.params.window
        high, low, close = a["high"], a["low"], a["close"]
        if len(close) <= n:
            return []
        top = sliding_window_view(high[:-1], n).max(axis=1)
        bottom = sliding_window_view(low[:-1], n).min(axis=1)
        up = close[n:] > top
        down = ~up & (close[n:] < bottom)
        t = np.flatnonzero(up | down)
        level = np.where(up[t], top[t], bottom[t])
        return _detections(self.name, a[TIME_COLUMN], t + n, up[t], level)


# --------------------------------------------------------------------------- volume spike


@dataclass(frozen=True)
class VolumeSpikeParams(DetectorParams):
    window: int = 20
    multiplier: float = 3.0

    def validate(self) -> None:
        _check_int("window", self.window, 1)
        _check_positive("multiplier", self.multiplier)


@dataclass(slots=True)
class VolumeSpikeState(_StreamState):
    volumes: deque[float] = dataclasses.field(default_factory=deque)


@register
class VolumeSpikeDetector(Detector[VolumeSpikeParams, VolumeSpikeState]):
    """Volume above ``multiplier`` times the mean volume of the previous N candles.

    direction is the candle's colour (close >= open is "up"); value is volume / mean, or None
    when the mean is zero.
    """

    name = "volume_spike"
    params_type = VolumeSpikeParams

    def setup(self) -> None:
        self._n = self.params.window
        self._m = float(self.params.multiplier)

    @property
    def lookback(self) -> int:
        return self._n

    def make_state(self) -> VolumeSpikeState:
        return VolumeSpikeState(volumes=deque(maxlen=self._n))

    def update(self, state: VolumeSpikeState, candle: Candle) -> Detection | None:
        index = state.count
        state.count = index + 1
        buf = state.volumes
        hit = None
        if len(buf) == self._n:
            mean = _ring_sum(buf) / self._n
            vol = candle.volume
            if vol > self._m * mean:
                ratio = vol / mean if mean > 0.0 else None
                direction: Direction = "up" if candle.close >= candle.open else "down"
                hit = Detection(index, candle.open_time_ms, self.name, direction, ratio)
        buf.append(candle.volume)
        return hit

    def scan(self, arrays: Arrays) -> list[Detection]:
        a = as_arrays(arrays)
        n = self._n
        vol = a["volume"]
        if len(vol) <= n:
            return []
        mean = _window_sums(vol, n) / n
        t = np.flatnonzero(vol[n:] > self._m * mean)
        idx = t + n
        up = a["close"][idx] >= a["open"][idx]
        ratios: list[float | None] = [
            v / mu if mu > 0.0 else None
            for v, mu in zip(vol[idx].tolist(), mean[t].tolist(), strict=True)
        ]
        return _detections(self.name, a[TIME_COLUMN], idx, up, ratios)


# --------------------------------------------------------------------------- gap


@dataclass(frozen=True)
class GapParams(DetectorParams):
    percent: float = 1.0

    def validate(self) -> None:
        _check_positive("percent", self.percent)


@dataclass(slots=True)
class GapState(_StreamState):
    prev_close: float | None = None


@register
class GapDetector(Detector[GapParams, GapState]):
    """Open differs from the previous close by more than ``percent`` %; value is the signed %."""

    name = "gap"
    params_type = GapParams

    def setup(self) -> None:
        self._p = float(self.params.percent)

    def make_state(self) -> GapState:
        return GapState()

    def update(self, state: GapState, candle: Candle) -> Detection | None:
        _check_price(self.name, candle.close)
        index = state.count
        state.count = index + 1
        prev = state.prev_close
        state.prev_close = candle.close
        if prev is None:
            return None
        pct = (candle.open - prev) / prev * 100.0
        if abs(pct) > self._p:
            return Detection(
                index, candle.open_time_ms, self.name, "up" if pct > 0 else "down", pct
            )
        return None

    def scan(self, arrays: Arrays) -> list[Detection]:
        a = as_arrays(arrays)
        close = a["close"]
        _require_positive_prices(self.name, close)
        prev = close[:-1]
        pct = (a["open"][1:] - prev) / prev * 100.0
        t = np.flatnonzero(np.abs(pct) > self._p)
        return _detections(self.name, a[TIME_COLUMN], t + 1, pct[t] > 0, pct[t])


# --------------------------------------------------------------------------- running many


def _sort_key(d: Detection) -> tuple[int, str]:
    return d.index, d.detector


def scan_all(arrays: Arrays, detectors: Iterable[Detector[Any, Any]]) -> list[Detection]:
    """Backtest: every detection of every detector, sorted by (index, detector name)."""
    a = as_arrays(arrays)
    _require_sane_arrays(a)
    found: list[Detection] = []
    for det in detectors:
        found.extend(det.scan(a))
    found.sort(key=_sort_key)
    return found


class LiveRunner:
    """Per-stream live state for a set of detectors; feed candles in order as they close.

    Candles must arrive with strictly increasing ``open_time_ms``; a repeated or older candle
    raises ValueError before any state changes (deduplicate upstream).
    """

    def __init__(self, detectors: Iterable[Detector[Any, Any]]) -> None:
        self.detectors: list[Detector[Any, Any]] = sorted(detectors, key=lambda d: d.name)
        self._steps: list[Callable[[Candle], Detection | None]] = [
            _bind(det) for det in self.detectors
        ]
        self.last_open_time_ms: int | None = None
        self.count = 0

    def feed(self, candle: Candle) -> list[Detection]:
        last = self.last_open_time_ms
        if last is not None and candle.open_time_ms <= last:
            raise ValueError(f"candle open_time_ms {candle.open_time_ms} not after previous {last}")
        _require_sane_candle(candle)
        found = [d for d in (step(candle) for step in self._steps) if d is not None]
        self.last_open_time_ms = candle.open_time_ms
        self.count += 1
        return found

    def feed_many(self, candles: Iterable[Candle]) -> list[Detection]:
        found: list[Detection] = []
        for candle in candles:
            found.extend(self.feed(candle))
        return found


def _bind(det: Detector[Any, S]) -> Callable[[Candle], Detection | None]:
    state = det.make_state()
    update = det.update

    def step(candle: Candle) -> Detection | None:
        return update(state, candle)

    return step


__all__ = [
    "REGISTRY",
    "BreakoutDetector",
    "Candle",
    "Detection",
    "Detector",
    "DetectorConfigError",
    "DetectorParams",
    "EngulfingDetector",
    "GapDetector",
    "GapParams",
    "LiveRunner",
    "VolatilityDetector",
    "VolatilityParams",
    "VolumeSpikeDetector",
    "VolumeSpikeParams",
    "WindowParams",
    "arrays_from_candles",
    "as_arrays",
    "candles_from_arrays",
    "get_detector",
    "load_csv",
    "register",
    "scan_all",
]
