"""Celery tasks of the trading app. Thin: ids or nothing in, one service call."""

from celery import shared_task
from django.utils import timezone

from . import marketdata, portfolio, reconcile, strategy


@shared_task(
    name="trading.process_candles_strategy", acks_late=True, time_limit=300, soft_time_limit=240
)
def process_candles_strategy(candle_ids: list[int]) -> int:
    """Signals and orders for newly ingested candles (queued on commit by candles_ingest)."""
    return strategy.candles_strategy(candle_ids=candle_ids)


@shared_task(name="trading.market_poll", acks_late=True, time_limit=120, soft_time_limit=100)
def market_poll() -> dict[str, int | str]:
    return marketdata.market_poll()


@shared_task(name="trading.reconcile", acks_late=True, time_limit=120, soft_time_limit=100)
def reconcile_deployments() -> int:
    return len(reconcile.reconcile_all())


@shared_task(name="trading.equity_snapshots", acks_late=True, time_limit=60, soft_time_limit=50)
def equity_snapshots() -> int:
    return portfolio.equity_snapshots_tick(now=timezone.now())
