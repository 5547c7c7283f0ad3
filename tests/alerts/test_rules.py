"""The pure rule layer: rule resolution, validation, decisions, filters, throttling."""

from __future__ import annotations

import pytest

from alerts.detectors import DetectorConfigError
from alerts.rules import (
    DEFAULT_RULES,
    Filters,
    RateLimiter,
    RuleSpec,
    SilenceSpec,
    TokenBucket,
    decide,
    parse_filters,
    percentile,
    queue_has_room,
    rate_limited,
    resolve_rules,
    validate_rule,
)


def test_defaults_apply_to_every_stream():
    rules = resolve_rules([], "ETH/BTC", "5m")
    assert [(r.detector, dict(r.params)) for r in rules] == [
        ("engulfing", {}),
        ("volatility", {"window": 20, "k": 2.0}),
    ]
    assert rules == sorted(DEFAULT_RULES, key=lambda r: r.detector)


def test_most_specific_rule_wins_and_disabled_rules_remove_the_detector():
    stored = [
        RuleSpec("volatility", {"window": 30, "k": 3.0}),
        RuleSpec("volatility", {"window": 10, "k": 2.5}, symbol="ETH/BTC"),
        RuleSpec("volatility", {"window": 5, "k": 2.0}, symbol="ETH/BTC", timeframe="1m"),
        RuleSpec("engulfing", enabled=False, timeframe="1m"),
        RuleSpec("gap", {"percent": 0.5}, symbol="LTC/BTC"),
    ]
    eth_5m = {r.detector: r.params for r in resolve_rules(stored, "ETH/BTC", "5m")}
    assert eth_5m == {"engulfing": {}, "volatility": {"window": 10, "k": 2.5}}
    eth_1m = {r.detector: r.params for r in resolve_rules(stored, "ETH/BTC", "1m")}
    assert eth_1m == {"volatility": {"window": 5, "k": 2.0}}
    ltc = {r.detector for r in resolve_rules(stored, "LTC/BTC", "5m")}
    assert ltc == {"engulfing", "gap", "volatility"}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (RuleSpec("volatility", {"window": 1}), "params.window"),
        (RuleSpec("volatility", {"k": 0}), "params.k"),
        (RuleSpec("volatility", {"k": -1.5}), "params.k"),
        (RuleSpec("volatility", {"window": "20"}), "params.window"),
        (RuleSpec("engulfing", {"window": 3}), "params.window"),
        (RuleSpec("nope"), "detector"),
        (RuleSpec("engulfing", severity="loud"), "severity"),
        (RuleSpec("engulfing", rate_limit_s=-1), "rate_limit_s"),
    ],
)
def test_impossible_rules_are_refused_with_the_field_named(spec, field):
    with pytest.raises(DetectorConfigError) as refused:
        validate_rule(spec)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")


def test_rate_limit_is_in_event_time_per_key():
    assert not rate_limited(None, 1_000, 60)
    assert rate_limited(0, 59_999, 60)
    assert not rate_limited(0, 60_000, 60)
    assert not rate_limited(0, 1, 0)
    limiter = RateLimiter()
    limiter.passed("k", 5)
    assert limiter.last("k") == 5 and limiter.last("other") is None


def test_silence_beats_rate_limit_and_expires_in_wall_time():
    silence = SilenceSpec(7, "ETH/BTC", "", expires_ms=10_000, author="ops", reason="news")
    common = {"symbol": "ETH/BTC", "detector": "volatility", "event_ms": 100, "limit_s": 60}
    silenced = decide(**common, last_passed_ms=90, silences=[silence], now_ms=9_999)
    assert (silenced.suppressed, silenced.code, silenced.silence_id) == (True, "silenced", 7)
    assert "news" in silenced.reason and "ops" in silenced.reason
    limited = decide(**common, last_passed_ms=90, silences=[silence], now_ms=10_000)
    assert (limited.suppressed, limited.code) == (True, "rate_limited")
    assert "limit 60s" in limited.reason
    passed = decide(**common, last_passed_ms=None, silences=[], now_ms=0)
    assert (passed.suppressed, passed.code, passed.reason) == (False, "deliver", "")
    other = SilenceSpec(8, "LTC/BTC", "volatility", expires_ms=10_000)
    assert not other.covers("ETH/BTC", "volatility", 0)


def test_filters_match_symbol_detector_and_minimum_severity():
    f = parse_filters({"symbols": ["ETH/BTC"], "min_severity": "warning"})
    assert f.matches(symbol="ETH/BTC", detector="engulfing", severity="critical")
    assert not f.matches(symbol="ETH/BTC", detector="engulfing", severity="info")
    assert not f.matches(symbol="LTC/BTC", detector="engulfing", severity="critical")
    assert Filters().matches(symbol="x", detector="y", severity="info")
    assert parse_filters({"detectors": "gap"}).detectors == ("gap",)
    for bad, field in (
        ({"symbols": [1]}, "symbols"),
        ({"detectors": {}}, "detectors"),
        ({"min_severity": "x"}, "min_severity"),
    ):
        with pytest.raises(ValueError, match=field):
            parse_filters(bad)


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)


def test_queue_bound_and_percentiles():
    assert queue_has_room(99, 100) and not queue_has_room(100, 100)
    assert percentile([], 50) is None
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
