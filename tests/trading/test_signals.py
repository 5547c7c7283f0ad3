"""Confluence scorer: hand-checkable factor cases, params validation, live == replay."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trading.exchange import Candle
from trading.signals import (
    FACTORS,
    InvalidSignalParams,
    SignalEngine,
    SignalParams,
    candles_to_arrays,
    compute_signals,
    load_csv,
    score_arrays,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "market"
CSVS = sorted(DATA.glob("*.csv"))
# Small windows so a handful of candles is enough: warm-up index 2.
TINY = SignalParams(
    ema_fast=2,
    ema_slow=3,
    rsi_period=2,
    volume_period=2,
    atr_period=2,
    swing_lookback=1,
    min_score=1,
)


def make_arrays(close, high=None, low=None, volume=None, start_ms=0, step_ms=60_000):
    close = np.asarray(close, dtype=float)
    high = close + 1.0 if high is None else np.asarray(high, dtype=float)
    low = close - 1.0 if low is None else np.asarray(low, dtype=float)
    volume = np.ones_like(close) if volume is None else np.asarray(volume, dtype=float)
    ts = start_ms + step_ms * np.arange(len(close), dtype=np.int64)
    return {
        "timestamp_ms": ts,
        "open": close.copy(),
        "high": high,
        "low": low,
        "close": close,
        "volume": volume,
    }


def rows(arrays):
    cols = ("timestamp_ms", "open", "high", "low", "close", "volume")
    return list(zip(*(arrays[c].tolist() for c in cols), strict=True))


def replay_live(arrays, params):
    engine = SignalEngine(params)
    signals, factors = [], []
    for row in rows(arrays):
        signal = engine.update(row)
        if signal is not None:
            signals.append(signal)
        factors.append(engine.last_factors)
    return signals, factors


# --------------------------------------------------------------------------- factors


def test_rising_series_is_a_long_trend_with_overbought_rsi():
    s = score_arrays(make_arrays(np.arange(1.0, 61.0)), SignalParams())
    warm = SignalParams().warmup
    assert s.factors_long["trend"][warm:].all()
    assert not s.factors_short["trend"].any()
    assert np.all(s.rsi[14:] == 100.0)  # no losses at all
    assert not s.factors_long["momentum"].any()  # RSI 100 is not inside (50, 70)
    assert not s.factors_long["trend"][:warm].any()  # nothing is scored in the warm-up


def test_falling_series_is_a_short_trend():
    s = score_arrays(make_arrays(np.arange(60.0, 0.0, -1.0)), SignalParams())
    warm = SignalParams().warmup
    assert s.factors_short["trend"][warm:].all()
    assert np.all(s.rsi[14:] == 0.0)


def test_rsi_by_hand():
    # deltas +2, -1, +2: seed (period 2) gain 1, loss 0.5 -> RSI 100 - 100/3 at index 2;
    # next: gain (1*1 + 2)/2 = 1.5, loss (0.5*1 + 0)/2 = 0.25 -> RSI 100 - 100/7.
    s = score_arrays(make_arrays([10.0, 12.0, 11.0, 13.0]), TINY)
    assert math.isnan(s.rsi[1])
    assert s.rsi[2] == pytest.approx(100 - 100 / 3)
    assert s.rsi[3] == pytest.approx(100 - 100 / 7)
    assert s.factors_long["momentum"].tolist() == [False, False, True, False]  # 66.7 in (50,70)


def test_ema_by_hand():
    s = score_arrays(make_arrays([1.0, 2.0, 4.0]), TINY)
    # alpha 2/3 for period 2, 1/2 for period 3, seeded with the first close
    assert s.ema_fast.tolist() == pytest.approx([1.0, 1 + 2 / 3, (1 + 2 / 3) + 2 / 3 * (4 - 5 / 3)])
    assert s.ema_slow.tolist() == pytest.approx([1.0, 1.5, 2.75])


def test_volume_above_mean_of_previous_candles():
    s = score_arrays(make_arrays([5.0] * 6, volume=[1, 1, 1, 1, 3, 1]), TINY)
    assert s.volume_mean[4] == 1.0
    assert s.factors_long["volume"].tolist() == [False, False, False, False, True, False]
    assert s.factors_short["volume"].tolist() == s.factors_long["volume"].tolist()


def test_break_of_structure_long_uses_only_confirmed_swings():
    close = [9.5, 11.0, 10.5, 11.0, 12.5]
    high = [10.0, 12.0, 11.0, 11.5, 13.0]
    low = [8.5, 10.0, 9.5, 10.0, 11.5]
    s = score_arrays(make_arrays(close, high, low), TINY)
    assert math.isnan(s.swing_high[1])  # the swing at 1 is only known one candle later
    assert s.swing_high[2:].tolist() == [12.0, 12.0, 12.0]
    assert s.swing_low[3] == 9.5
    assert s.factors_long["structure"].tolist() == [False, False, False, False, True]
    assert not s.factors_short["structure"].any()


def test_liquidity_sweep_long_and_short():
    close = [9.5, 11.0, 10.5, 11.0, 10.2]
    high = [10.0, 12.0, 11.0, 11.5, 10.8]
    low = [8.5, 10.0, 9.5, 10.0, 9.0]  # wick under the 9.5 swing low, close back above
    s = score_arrays(make_arrays(close, high, low), TINY)
    assert s.factors_long["structure"].tolist() == [False, False, False, False, True]
    # mirror: wick above the 12.0 swing high, close back below it
    close = [9.5, 11.0, 10.5, 11.0, 11.8]
    high = [10.0, 12.0, 11.0, 11.5, 12.4]
    low = [8.5, 10.0, 9.5, 10.0, 11.0]
    s = score_arrays(make_arrays(close, high, low), TINY)
    assert s.factors_short["structure"].tolist() == [False, False, False, False, True]
    assert not s.factors_long["structure"].any()


def test_stop_and_target_from_atr():
    # every candle spans exactly 2.0 and closes inside the previous range: ATR = 2
    close = np.arange(100.0, 130.0)
    arrays = make_arrays(close, high=close + 1.0, low=close - 1.0)
    signals = compute_signals(arrays, TINY)
    assert signals, "the rising trend alone gives score 1 >= min_score 1"
    sig = signals[-1]
    assert sig.side == "buy"
    assert sig.factors["trend"] is True
    assert sig.entry == close[sig.index]
    assert sig.stop == pytest.approx(sig.entry - 1.5 * 2.0)
    assert sig.target == pytest.approx(sig.entry + 2.0 * 1.5 * 2.0)
    assert sig.reward_risk == pytest.approx(2.0)
    assert sig.ts == arrays["timestamp_ms"][sig.index]


def test_signals_respect_min_score_and_explain_themselves():
    arrays = load_csv(DATA / "ETH_BTC-5m.csv")
    params = SignalParams(min_score=4)
    signals = compute_signals(arrays, params)
    s = score_arrays(arrays, params)
    assert len(signals) == int(((s.score >= 4) & (s.side != 0)).sum()) > 0
    for sig in signals:
        assert sig.score == 4 == sum(sig.factors.values())
        assert set(sig.factors) == set(FACTORS)
        assert (
            (sig.stop < sig.entry < sig.target)
            if sig.side == "buy"
            else (sig.target < sig.entry < sig.stop)
        )


def test_tie_gives_no_side():
    arrays = load_csv(DATA / "ETH_BTC-5m.csv")
    s = score_arrays(arrays, SignalParams())
    tie = s.long_score == s.short_score
    assert (s.side[tie] == 0).all()
    assert (s.side[~tie] == np.sign(s.long_score[~tie].astype(int) - s.short_score[~tie])).all()


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ema_fast": 0}, "ema_fast"),
        ({"ema_fast": 21, "ema_slow": 21}, "ema_slow"),
        ({"rsi_period": 0}, "rsi_period"),
        ({"rsi_period": 14.0}, "rsi_period"),
        ({"volume_period": True}, "volume_period"),
        ({"swing_lookback": 0}, "swing_lookback"),
        ({"atr_mult": 0}, "atr_mult"),
        ({"atr_mult": float("nan")}, "atr_mult"),
        ({"atr_mult": 10**400}, "atr_mult"),
        ({"reward_risk": -1.0}, "reward_risk"),
        ({"rsi_long_min": 70.0, "rsi_long_max": 60.0}, "rsi_long_max"),
        ({"rsi_short_max": 101.0}, "rsi_short_max"),
        ({"min_score": 0}, "min_score"),
        ({"min_score": 5}, "min_score"),
    ],
)
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidSignalParams) as err:
        SignalParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


def test_params_from_dict_rejects_unknown_keys():
    assert SignalParams.from_dict({"min_score": 2}).min_score == 2
    with pytest.raises(InvalidSignalParams) as err:
        SignalParams.from_dict({"ema_fats": 5})
    assert err.value.field == "ema_fats"


# --------------------------------------------------------------------------- live == replay


@pytest.mark.parametrize("path", CSVS, ids=lambda p: p.stem)
def test_live_engine_matches_vectorised_on_real_candles(path):
    arrays = load_csv(path)
    params = SignalParams()
    signals, factors = replay_live(arrays, params)
    assert signals == compute_signals(arrays, params)
    s = score_arrays(arrays, params)
    for i in range(params.warmup, len(arrays["close"])):
        live_long, live_short = factors[i]
        assert live_long == {f: bool(s.factors_long[f][i]) for f in FACTORS}, i
        assert live_short == {f: bool(s.factors_short[f][i]) for f in FACTORS}, i


def test_live_matches_vectorised_with_other_params():
    arrays = load_csv(DATA / "LTC_BTC-5m.csv")
    params = SignalParams(
        ema_fast=5, ema_slow=34, rsi_period=7, swing_lookback=4, volume_period=10, min_score=2
    )
    assert replay_live(arrays, params)[0] == compute_signals(arrays, params)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-0.03, 0.03, allow_nan=False), min_size=1, max_size=120),
    st.integers(1, 3),
    st.integers(1, 4),
)
def test_live_matches_vectorised_on_random_walks(returns, lookback, min_score):
    close = 100.0 * np.cumprod(1.0 + np.asarray(returns))
    rng = np.random.default_rng(len(returns))
    high = close * (1 + rng.uniform(0, 0.01, len(close)))
    low = close * (1 - rng.uniform(0, 0.01, len(close)))
    volume = rng.uniform(1, 10, len(close))
    arrays = make_arrays(close, high, low, volume)
    params = SignalParams(
        ema_fast=3,
        ema_slow=8,
        rsi_period=5,
        volume_period=4,
        atr_period=5,
        swing_lookback=lookback,
        min_score=min_score,
    )
    assert replay_live(arrays, params)[0] == compute_signals(arrays, params)


def test_engine_accepts_candle_shapes_and_skips_repeats():
    arrays = load_csv(DATA / "ETH_BTC-5m.csv")
    expected = compute_signals(arrays, SignalParams())
    engine = SignalEngine()
    got = []
    for n, row in enumerate(rows(arrays)):
        candle = Candle(int(row[0]), *row[1:])
        if n % 3 == 1:
            candle = dict(
                zip(("open_time_ms", "open", "high", "low", "close", "volume"), candle, strict=True)
            )
        signal = engine.update(candle)
        assert engine.update(candle) is None  # the same candle again is ignored
        if signal:
            got.append(signal)
    assert got == expected
    assert engine.skipped == len(arrays["close"])


def test_candles_to_arrays_round_trip():
    arrays = load_csv(DATA / "XRP_USDT-5m.csv")
    again = candles_to_arrays(rows(arrays))
    for key, value in arrays.items():
        assert np.array_equal(value, again[key])
    assert again["timestamp_ms"].dtype == np.int64
