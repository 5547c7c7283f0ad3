import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from alerts import detectors
from alerts.detectors import (
    REGISTRY,
    Candle,
    Detection,
    Detector,
    DetectorConfigError,
    DetectorParams,
    LiveRunner,
    arrays_from_candles,
    candles_from_arrays,
    get_detector,
    load_csv,
    register,
    scan_all,
)

MARKET = Path(__file__).resolve().parents[2] / "data" / "market"
CSV_FILES = sorted(MARKET.glob("*.csv"))
ALL_NAMES = ["breakout", "engulfing", "gap", "volatility", "volume_spike"]


def candles_from_closes(
    closes: list[float], start_ms: int = 0, step_ms: int = 60_000
) -> list[Candle]:
    """Candles whose open equals the previous close, so only the close series matters."""
    out = []
    prev = closes[0]
    for i, c in enumerate(closes):
        out.append(Candle(start_ms + i * step_ms, prev, max(prev, c), min(prev, c), c, 1.0))
        prev = c
    return out


def ohlc(i: int, o: float, c: float, volume: float = 1.0) -> Candle:
    return Candle(i * 60_000, o, max(o, c), min(o, c), c, volume)


def live(detector: Detector, candles: list[Candle]) -> list[Detection]:
    return LiveRunner([detector]).feed_many(candles)


def backtest(detector: Detector, candles: list[Candle]) -> list[Detection]:
    return detector.scan(arrays_from_candles(candles))


def both(detector: Detector, candles: list[Candle]) -> list[Detection]:
    a, b = live(detector, candles), backtest(detector, candles)
    assert_same(a, b)
    return a


def assert_same(a: list[Detection], b: list[Detection]) -> None:
    assert [(d.index, d.ts, d.detector, d.direction) for d in a] == [
        (d.index, d.ts, d.detector, d.direction) for d in b
    ]
    for x, y in zip(a, b, strict=True):
        if x.value is None or y.value is None:
            assert x.value is None and y.value is None
        else:
            assert x.value == pytest.approx(y.value, rel=1e-9, abs=0.0)


# --------------------------------------------------------------------------- volatility


def test_volatility_hand_computed_spike_up_at_first_possible_index():
    window, k = 4, 2.0
    closes = [100.0, 101.0, 100.0, 101.0, 100.0, 110.0, 110.0]
    found = both(get_detector("volatility", window=window, k=k), candles_from_closes(closes))

    returns = [math.log(closes[i] / closes[i - 1]) for i in range(1, len(closes))]
    prior, r = returns[:4], returns[4]
    z = (r - statistics.mean(prior)) / statistics.stdev(prior)
    assert abs(z) > k
    # Candle 5 is the first with 4 earlier returns (returns start at candle 1).
    assert [d.index for d in found] == [5]
    assert found[0].direction == "up"
    assert found[0].ts == 5 * 60_000
    assert found[0].value == pytest.approx(z, rel=1e-12)


def test_volatility_needs_window_earlier_returns():
    # Same spike one candle earlier: only 3 earlier returns, so it cannot alert.
    closes = [100.0, 101.0, 100.0, 101.0, 111.0, 111.0]
    assert both(get_detector("volatility", window=4), candles_from_closes(closes)) == []


def test_volatility_spike_down_direction_and_z():
    closes = [100.0, 101.0, 100.0, 101.0, 100.0, 101.0, 90.0]
    found = both(get_detector("volatility", window=5, k=2.0), candles_from_closes(closes))
    returns = [math.log(closes[i] / closes[i - 1]) for i in range(1, len(closes))]
    z = (returns[5] - statistics.mean(returns[:5])) / statistics.stdev(returns[:5])
    assert z < -2.0
    assert [(d.index, d.direction) for d in found] == [(6, "down")]
    assert found[0].value == pytest.approx(z, rel=1e-12)


def test_volatility_below_threshold_does_not_alert():
    closes = [100.0, 101.0, 100.0, 101.0, 100.0, 101.5]
    returns = [math.log(closes[i] / closes[i - 1]) for i in range(1, len(closes))]
    z = (returns[4] - statistics.mean(returns[:4])) / statistics.stdev(returns[:4])
    assert 1.0 < abs(z) < 2.0
    assert both(get_detector("volatility", window=4, k=2.0), candles_from_closes(closes)) == []
    hits = both(get_detector("volatility", window=4, k=1.0), candles_from_closes(closes))
    assert [d.index for d in hits] == [5]


def test_volatility_zero_variance_never_alerts():
    # Flat window then a jump: sigma == 0 for the jump's window, so no alert there;
    # the next candle has a window with the jump but |z| = 0.5.
    closes = [1.0] * 6 + [2.0, 2.0]
    assert both(get_detector("volatility", window=4), candles_from_closes(closes)) == []


def test_volatility_constant_nonzero_returns_have_zero_sigma():
    # 1.5**i is exact, so every return is the same float; a naive running mean of 5 copies of
    # ln(1.5) is off by an ulp and would give a tiny sigma > 0 and a huge z at the jump.
    closes = [1.5**i for i in range(7)]
    closes.append(closes[-1] * 3.0)
    assert len({math.log(closes[i] / closes[i - 1]) for i in range(1, 7)}) == 1
    assert both(get_detector("volatility", window=5), candles_from_closes(closes)) == []


def test_volatility_ignores_timestamp_gaps():
    closes = [100.0, 101.0, 100.0, 101.0, 100.0, 110.0, 110.0]
    regular = candles_from_closes(closes)
    gapped = [
        Candle(c.open_time_ms + (3_600_000 if i >= 3 else 0), c.open, c.high, c.low, c.close, 1.0)
        for i, c in enumerate(regular)
    ]
    det = get_detector("volatility", window=4)
    assert [d.index for d in both(det, gapped)] == [d.index for d in both(det, regular)] == [5]
    assert both(det, gapped)[0].ts == regular[5].open_time_ms + 3_600_000


def test_volatility_rejects_non_positive_close_in_both_paths():
    det = get_detector("volatility")
    candles = candles_from_closes([1.0, 2.0, 0.0])
    with pytest.raises(ValueError):
        backtest(det, candles)
    with pytest.raises(ValueError):
        live(det, candles)


# --------------------------------------------------------------------------- engulfing


def test_engulfing_bullish():
    candles = [ohlc(0, 10.0, 9.0), ohlc(1, 8.5, 10.5)]
    found = both(get_detector("engulfing"), candles)
    assert found == [Detection(1, 60_000, "engulfing", "up", None)]


def test_engulfing_bearish():
    candles = [ohlc(0, 9.0, 10.0), ohlc(1, 10.5, 8.5)]
    assert both(get_detector("engulfing"), candles) == [
        Detection(1, 60_000, "engulfing", "down", None)
    ]


def test_engulfing_boundary_equalities_count():
    # Bullish with O2 == C1 and a strictly larger body.
    assert [
        d.direction for d in both(get_detector("engulfing"), [ohlc(0, 10, 9), ohlc(1, 9, 10.5)])
    ] == ["up"]
    # Bullish with C2 == O1 and O2 < C1.
    assert [
        d.direction for d in both(get_detector("engulfing"), [ohlc(0, 10, 9), ohlc(1, 8.5, 10)])
    ] == ["up"]
    # Bearish with O2 == C1.
    assert [
        d.direction for d in both(get_detector("engulfing"), [ohlc(0, 9, 10), ohlc(1, 10, 8.5)])
    ] == ["down"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((10, 9), (9, 10)),  # equal bodies: body must be strictly larger
        ((10, 9), (9.5, 10.5)),  # opens above previous close
        ((10, 9), (8.5, 9.8)),  # closes below previous open
        ((9, 10), (8.5, 10.5)),  # both bullish
        ((10, 9), (10.5, 8.5)),  # both bearish
        ((10, 10), (9, 11)),  # previous doji is neither colour
        ((9, 10), (10, 9)),  # bearish with equal bodies
    ],
)
def test_engulfing_non_cases(first, second):
    assert both(get_detector("engulfing"), [ohlc(0, *first), ohlc(1, *second)]) == []


def test_engulfing_first_candle_never_alerts():
    assert both(get_detector("engulfing"), [ohlc(0, 8.5, 10.5)]) == []


# --------------------------------------------------------------------------- other detectors


def test_breakout_up_and_down():
    highs_lows = [(10, 9), (11, 9.5), (10.5, 9.2)]
    candles = [Candle(i, h - 0.5, h, lo, h - 0.2, 1.0) for i, (h, lo) in enumerate(highs_lows)]
    candles.append(Candle(3, 10.0, 11.5, 10.0, 11.2, 1.0))  # close > max high 11
    candles.append(Candle(4, 10.0, 10.0, 8.0, 8.9, 1.0))  # close < min low of 9.5, 9.2, 10
    found = both(get_detector("breakout", window=3), candles)
    assert [(d.index, d.direction, d.value) for d in found] == [(3, "up", 11.0), (4, "down", 9.2)]


def test_volume_spike():
    candles = [ohlc(i, 1.0, 1.1, volume=v) for i, v in enumerate([1.0, 2.0, 3.0, 6.1, 5.9])]
    candles.append(ohlc(5, 1.1, 1.0, volume=100.0))
    found = both(get_detector("volume_spike", window=3, multiplier=3.0), candles)
    # index 3: mean(1,2,3) = 2 -> 6.1 > 6; index 4: mean(2,3,6.1) -> 5.9 < 11.1
    assert [(d.index, d.direction) for d in found] == [(3, "up"), (5, "down")]
    assert found[0].value == pytest.approx(6.1 / 2.0)


def test_volume_spike_zero_mean_has_no_ratio():
    candles = [ohlc(i, 1.0, 1.0, volume=v) for i, v in enumerate([0.0, 0.0, 5.0])]
    found = both(get_detector("volume_spike", window=2), candles)
    assert [(d.index, d.value) for d in found] == [(2, None)]


def test_gap():
    candles = [
        ohlc(0, 100.0, 100.0),
        ohlc(1, 101.5, 101.0),
        ohlc(2, 100.5, 100.0),
        ohlc(3, 98.0, 98.0),
    ]
    found = both(get_detector("gap", percent=1.0), candles)
    assert [(d.index, d.direction) for d in found] == [(1, "up"), (3, "down")]
    assert found[0].value == pytest.approx(1.5)
    assert found[1].value == pytest.approx(-2.0)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module", params=CSV_FILES, ids=lambda p: p.name)
def market(request):
    return load_csv(request.param)


def test_market_files_present():
    assert {p.name for p in CSV_FILES} >= {
        "ETH_BTC-5m.csv",
        "LTC_BTC-5m.csv",
        "ADA_BTC-5m.csv",
        "ETH_BTC-1m.csv",
        "XRP_USDT-5m.csv",
    }


def test_live_and_backtest_identical_on_market_data(market):
    dets = [get_detector(name) for name in ALL_NAMES]
    back = scan_all(market, dets)
    runner = LiveRunner(dets)
    candles = candles_from_arrays(market)
    per_candle = [runner.feed(c) for c in candles]
    flat = [d for batch in per_candle for d in batch]
    assert_same(flat, back)
    assert back == sorted(back, key=lambda d: (d.index, d.detector))
    assert {d.detector for d in back} >= {"volatility", "engulfing", "breakout", "volume_spike"}
    for i, batch in enumerate(per_candle):
        assert all(d.index == i and d.ts == candles[i].open_time_ms for d in batch)


def test_volatility_matches_independent_reference(market):
    """Flags agree with a numpy-std reference except where |z| is within 1e-9 of k."""
    window, k = 20, 2.0
    close = market["close"]
    r = np.log(close[1:] / close[:-1])
    prior = sliding_window_view(r, window)[:-1]
    mu = prior.mean(axis=1)
    sigma = prior.std(axis=1, ddof=1)
    target = r[window:]
    with np.errstate(divide="ignore", invalid="ignore"):
        z_ref = np.where(sigma > 1e-15, (target - mu) / sigma, 0.0)
    found = {d.index: d for d in get_detector("volatility").scan(market)}
    for t, z in enumerate(z_ref.tolist()):
        idx = t + window + 1
        if abs(abs(z) - k) < 1e-9:
            continue
        assert (idx in found) == (abs(z) > k), idx
        if idx in found:
            assert found[idx].value == pytest.approx(z, rel=1e-9)
            assert found[idx].direction == ("up" if z > 0 else "down")


def test_ada_gaps_are_not_filled():
    ada = load_csv(MARKET / "ADA_BTC-5m.csv")
    steps = np.diff(ada["open_time_ms"]) // 300_000
    assert int((steps - 1).sum()) == 40
    det = get_detector("volatility")
    found = det.scan(ada)
    assert_same(found, live(det, candles_from_arrays(ada)))
    # Same closes with regular timestamps give the same detections by position.
    regular = dict(ada, open_time_ms=ada["open_time_ms"][0] + 300_000 * np.arange(len(steps) + 1))
    assert [(d.index, d.direction, d.value) for d in det.scan(regular)] == [
        (d.index, d.direction, d.value) for d in found
    ]


def test_eth_1m_zero_variance_windows_and_flat_candles():
    eth = load_csv(MARKET / "ETH_BTC-1m.csv")
    candles = candles_from_arrays(eth)
    close = eth["close"]
    assert eth["open"][0] == eth["high"][0] == eth["low"][0] == close[0]

    # The longest run of unchanged closes is 18 returns, so use a window that fits inside it.
    window = 10
    r = np.log(close[1:] / close[:-1])
    zero_var = np.array([np.all(w == 0.0) for w in sliding_window_view(r, window)[:-1]])
    zero_var_indexes = set((np.flatnonzero(zero_var) + window + 1).tolist())
    assert zero_var_indexes
    det = get_detector("volatility", window=window)
    found = det.scan(eth)
    assert_same(found, live(det, candles))
    assert found
    assert not zero_var_indexes & {d.index for d in found}

    # A candle with open == close (every flat candle) is neither colour, so never engulfs.
    doji = set(np.flatnonzero(eth["open"] == close).tolist())
    engulfing = {d.index for d in both(get_detector("engulfing"), candles)}
    assert engulfing
    assert not engulfing & doji
    assert not {i + 1 for i in doji} & engulfing


# --------------------------------------------------------------------------- config + registry


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("volatility", {"window": 1}, "window"),
        ("volatility", {"window": 2.5}, "window"),
        ("volatility", {"window": True}, "window"),
        ("volatility", {"k": 0}, "k"),
        ("volatility", {"k": -1.0}, "k"),
        ("volatility", {"k": math.nan}, "k"),
        ("volatility", {"k": "2"}, "k"),
        ("volatility", {"n": 20}, "n"),
        ("breakout", {"window": 0}, "window"),
        ("volume_spike", {"multiplier": 0.0}, "multiplier"),
        ("volume_spike", {"window": 0}, "window"),
        ("gap", {"percent": -1.0}, "percent"),
        ("engulfing", {"window": 3}, "window"),
        ("nope", {}, "name"),
    ],
)
def test_param_validation_names_field(name, params, field):
    with pytest.raises(DetectorConfigError) as exc:
        get_detector(name, **params)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")


def test_defaults_and_registry():
    assert sorted(REGISTRY) == ALL_NAMES
    vol = get_detector("volatility")
    assert (vol.params.window, vol.params.k) == (20, 2.0)
    spike = get_detector("volume_spike")
    assert (spike.params.window, spike.params.multiplier) == (20, 3.0)
    assert get_detector("breakout").params.window == 20
    assert get_detector("gap").params.percent == 1.0


def test_register_plugs_in_new_detector(monkeypatch):
    monkeypatch.setattr(detectors, "REGISTRY", dict(REGISTRY))

    @register
    class Bullish(Detector[DetectorParams, list]):
        name = "bullish"

        def make_state(self) -> list:
            return [0]

        def update(self, state: list, candle: Candle) -> Detection | None:
            i = state[0]
            state[0] += 1
            return (
                Detection(i, candle.open_time_ms, self.name, "up", None)
                if candle.close > candle.open
                else None
            )

        def scan(self, arrays) -> list[Detection]:
            idx = np.flatnonzero(arrays["close"] > arrays["open"])
            return [
                Detection(i, int(arrays["open_time_ms"][i]), self.name, "up", None)
                for i in idx.tolist()
            ]

    assert detectors.REGISTRY["bullish"] is Bullish
    candles = [ohlc(0, 1, 2), ohlc(1, 2, 1), ohlc(2, 1, 3)]
    det = detectors.get_detector("bullish")
    assert [d.index for d in both(det, candles)] == [0, 2]
    with pytest.raises(ValueError):

        @register
        class Clash(Bullish):
            pass


def test_live_runner_rejects_out_of_order_and_bad_candles():
    runner = LiveRunner([get_detector("engulfing")])
    runner.feed(ohlc(1, 1.0, 2.0))
    with pytest.raises(ValueError):
        runner.feed(ohlc(1, 1.0, 2.0))
    with pytest.raises(ValueError):
        runner.feed(Candle(120_000, math.nan, 1.0, 1.0, 1.0, 1.0))
    assert runner.count == 1


def test_load_csv_round_trip():
    arrays = load_csv(MARKET / "ETH_BTC-5m.csv")
    assert arrays["open_time_ms"].dtype == np.int64
    assert len(arrays["close"]) == 5760
    candles = candles_from_arrays(arrays)
    assert isinstance(candles[0].open_time_ms, int)
    assert candles[0] == Candle(
        1515560100000, 0.0984, 0.0994766, 0.09828605, 0.0994766, 1820.54447418
    )
    back = arrays_from_candles(candles)
    for key, col in arrays.items():
        np.testing.assert_array_equal(back[key], col)


# --------------------------------------------------------------------------- property


price_series = st.lists(
    st.one_of(
        st.floats(min_value=0.5, max_value=2.0),
        st.sampled_from([1.0, 1.0, 1.0, 1.01]),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    factors=price_series,
    start=st.floats(min_value=1e-6, max_value=1e6),
    window=st.integers(min_value=2, max_value=6),
    k=st.floats(min_value=0.1, max_value=3.0),
    opens=st.lists(st.floats(min_value=0.9, max_value=1.1), min_size=80, max_size=80),
    volumes=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=80, max_size=80),
)
def test_live_and_backtest_agree_on_random_series(factors, start, window, k, opens, volumes):
    candles = []
    close = start
    for i, f in enumerate(factors):
        o = close * opens[i]
        close = close * f
        candles.append(
            Candle(i * 60_000, o, max(o, close) * 1.001, min(o, close) * 0.999, close, volumes[i])
        )
    dets = [
        get_detector("volatility", window=window, k=k),
        get_detector("engulfing"),
        get_detector("breakout", window=window),
        get_detector("volume_spike", window=window, multiplier=1.5),
        get_detector("gap", percent=5.0),
    ]
    back = scan_all(arrays_from_candles(candles), dets)
    assert_same(LiveRunner(dets).feed_many(candles), back)
