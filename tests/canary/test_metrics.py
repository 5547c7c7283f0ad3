"""Phase-window metrics computed in SQL (SQLite here, PostgreSQL in CI: same tests)."""

import math
import random

import numpy as np
import pytest

from canary.engine import Metrics
from canary.metrics import phase_metrics
from trading.models import OrderStatus

from .factories import (
    T0,
    add_equity,
    add_orders,
    add_signal,
    at,
    healthy_orders,
    make_deployment,
    order,
    touch_stream,
)

pytestmark = pytest.mark.django_db


def metrics_of(deployment, since=T0, now=None):
    return phase_metrics(deployment=deployment, since=since, now=now or at(3600))


def test_empty_window_has_counts_and_no_rates():
    deployment = make_deployment(symbols=())
    assert metrics_of(deployment) == Metrics(
        orders=0,
        latency_p95_ms=None,
        fill_rate=None,
        slippage_bps=None,
        confluence_avg=None,
        drawdown_pct=None,
        error_rate=None,
        critical_errors=0,
        stream_gap_s=None,
        db_ok=True,
    )


def test_counts_rates_and_means():
    deployment = make_deployment()
    add_orders(
        deployment,
        [
            order(deployment, when=at(10), requested=2.0, slippage_bps=4.0),
            order(deployment, when=at(20), status=OrderStatus.PARTIAL, requested=2.0, filled=1.0),
            order(deployment, when=at(30), status=OrderStatus.CANCELED, requested=1.0, filled=0.0),
            order(deployment, when=at(40), status=OrderStatus.ERROR, slippage_bps=None),
            order(deployment, when=at(50), status=OrderStatus.REJECTED, critical=True),
            order(deployment, when=at(60), status=OrderStatus.PENDING, latency_ms=None),
            order(deployment, when=at(70), status=OrderStatus.UNKNOWN, slippage_bps=-6.0),
        ],
    )
    m = metrics_of(deployment)
    assert m.orders == 7
    assert m.error_rate == pytest.approx(3 / 7)
    # filled / requested over orders with a known outcome: FILLED, PARTIAL, CANCELED
    assert m.fill_rate == pytest.approx((2.0 + 1.0 + 0.0) / (2.0 + 2.0 + 1.0))
    assert m.slippage_bps == pytest.approx((4.0 + 2.0 + 2.0 + 2.0 + 2.0 - 6.0) / 6)
    assert m.critical_errors == 1


def test_window_excludes_flatten_other_deployments_and_outside_times():
    deployment = make_deployment()
    other = make_deployment(name="other")
    add_orders(
        deployment,
        [
            order(deployment, when=at(-1)),
            order(deployment, when=at(0)),  # the phase's start: the previous phase's
            order(deployment, when=at(0.001)),
            order(deployment, when=at(100), purpose="flatten", status=OrderStatus.ERROR),
            order(deployment, when=at(3600)),
            order(deployment, when=at(3601)),
            order(other, when=at(50), status=OrderStatus.ERROR),
        ],
    )
    m = metrics_of(deployment, now=at(3600))
    assert m.orders == 2
    assert m.error_rate == 0


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101])
def test_latency_p95_is_percentile_cont(n):
    deployment = make_deployment()
    rng = random.Random(n)
    latencies = [round(rng.uniform(5, 900), 3) for _ in range(n)]
    add_orders(
        deployment,
        [order(deployment, when=at(i + 1), latency_ms=v) for i, v in enumerate(latencies)],
    )
    expected = float(np.percentile(latencies, 95))
    assert metrics_of(deployment).latency_p95_ms == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 20, 21, 101])
def test_latency_p95_interpolates_the_neighbours_of_its_rank_exactly(n):
    """The value the metric has always had on SQLite (bit for bit), computed as
    percentile_cont is on PostgreSQL: the rank's two neighbours interpolated."""
    from django.db import connection

    deployment = make_deployment()
    rng = random.Random(1000 + n)
    latencies = [rng.uniform(0.01, 900.0) for _ in range(n)]
    add_orders(
        deployment,
        [order(deployment, when=at(i + 1), latency_ms=v) for i, v in enumerate(latencies)]
        + [order(deployment, when=at(n + 2), latency_ms=None, status=OrderStatus.PENDING)],
    )
    got = metrics_of(deployment).latency_p95_ms
    if connection.vendor != "sqlite":
        assert got == pytest.approx(float(np.percentile(latencies, 95)), abs=1e-9)
        return
    values = sorted(latencies)
    rank = 0.95 * (n - 1)
    k = math.floor(rank)
    expected = values[k] if k + 1 >= n else values[k] + (values[k + 1] - values[k]) * (rank - k)
    assert got == expected


def test_latency_falls_back_to_ack_minus_submit():
    deployment = make_deployment()
    add_orders(
        deployment,
        [
            order(deployment, when=at(i + 1), latency_ms=None, acked_after_ms=v)
            for i, v in enumerate([100, 200, 300, 400])
        ]
        + [order(deployment, when=at(9), latency_ms=None, status=OrderStatus.PENDING)],
    )
    expected = float(np.percentile([100, 200, 300, 400], 95))
    assert metrics_of(deployment).latency_p95_ms == pytest.approx(expected, abs=0.05)


def test_confluence_is_the_mean_score_of_distinct_signals_behind_orders():
    deployment = make_deployment()
    strong, weak, unused = (add_signal(deployment, score=s) for s in (4, 2, 0))
    add_orders(
        deployment,
        [
            order(deployment, when=at(1), signal=strong),
            order(deployment, when=at(2), signal=strong),
            order(deployment, when=at(3), signal=weak),
            order(deployment, when=at(4)),
        ],
    )
    assert unused.score == 0
    assert metrics_of(deployment).confluence_avg == pytest.approx(3.0)


def test_drawdown_is_worst_peak_to_trough_inside_the_window():
    deployment = make_deployment()
    add_equity(deployment, when=at(-600), equity=200.0)  # older peak: not this phase's
    add_equity(deployment, when=at(-60), equity=100.0)  # the phase starts from here
    for seconds, equity in [(60, 104.0), (120, 98.8), (180, 110.0), (240, 107.8), (7200, 50.0)]:
        add_equity(deployment, when=at(seconds), equity=equity)
    m = metrics_of(deployment, now=at(3600))
    assert m.drawdown_pct == pytest.approx((98.8 / 104.0 - 1) * 100)


def test_drawdown_is_zero_while_equity_only_rises_and_none_without_marks():
    deployment = make_deployment()
    assert metrics_of(deployment).drawdown_pct is None
    for seconds, equity in [(0, 100.0), (60, 101.0), (120, 102.0)]:
        add_equity(deployment, when=at(seconds), equity=equity)
    assert metrics_of(deployment).drawdown_pct == 0.0


def test_stream_gap_is_the_longest_silence_of_the_traded_streams():
    deployment = make_deployment(symbols=("ETH/BTC", "LTC/BTC", "ADA/BTC"))
    touch_stream("ETH/BTC", when=at(3590))
    touch_stream("LTC/BTC", when=at(3555))
    touch_stream("ADA/BTC", when=at(10), timeframe="1m")  # not the deployment's timeframe
    m = metrics_of(deployment, since=at(3000), now=at(3600))
    assert m.stream_gap_s == pytest.approx(600.0)  # ADA/BTC 5m never heard of: since phase start
    touch_stream("ADA/BTC", when=at(3599))
    assert metrics_of(deployment, since=at(3000), now=at(3600)).stream_gap_s == pytest.approx(45.0)


def test_query_count_does_not_grow_with_orders(django_assert_max_num_queries):
    deployment = make_deployment()
    healthy_orders(deployment, 500, start=at(1))
    add_equity(deployment, when=at(5), equity=10.0)
    touch_stream(when=at(3599))
    with django_assert_max_num_queries(6):
        m = metrics_of(deployment)
    assert m.orders == 500
    assert m.fill_rate == 1.0
    assert m.confluence_avg == 4.0
