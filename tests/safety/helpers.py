"""Set-ups shared by the safety tests and benches: fresh candles and streams, a paper
exchange with holdings, positions that match it."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import datetime

from django.utils import timezone

from trading.exchange import OrderRequest, PaperSettings
from trading.exchange_paper import PaperExchange
from trading.models import Candle, Deployment, MarketStream, Position
from trading.timeframes import timeframe_ms


def market_exchange(deployment: Deployment) -> str:
    from canary.preflight import _market_exchange

    return _market_exchange(deployment)


def fresh_market(deployment: Deployment, now: datetime | None = None, bars: int = 60) -> None:
    """`bars` closed candles per symbol ending at the current bar, and streams heard now."""
    now = now or timezone.now()
    frame = timeframe_ms(deployment.timeframe)
    current_open = int(now.timestamp() * 1000) // frame * frame
    exchange = market_exchange(deployment)
    rows = []
    for s, symbol in enumerate(deployment.symbols):
        base = 0.01 * (s + 1)
        for i in range(bars):
            opened = current_open - (bars - i) * frame
            close = base * (1 + 0.01 * math.sin(i / 3) + 0.0005 * i)
            rows.append(
                Candle(
                    exchange=exchange,
                    symbol=symbol,
                    timeframe=deployment.timeframe,
                    open_time_ms=opened,
                    close_time_ms=opened + frame - 1,
                    open=close * 0.999,
                    high=close * 1.002,
                    low=close * 0.997,
                    close=close,
                    volume=10 + (i % 7),
                    ingested_at=now,
                )
            )
        MarketStream.objects.update_or_create(
            exchange=exchange,
            symbol=symbol,
            timeframe=deployment.timeframe,
            defaults={"last_open_time_ms": current_open - frame, "last_received_at": now},
        )
    Candle.objects.bulk_create(rows)


def paper_exchange(
    symbols: Sequence[str], balance: float = 100.0, fee_bps: float = 10.0
) -> PaperExchange:
    paper = PaperExchange(
        list(symbols),
        PaperSettings(starting_balances={"BTC": balance}, fee_bps=fee_bps, slippage_bps=2.0),
        clock_ms=lambda: int(time.time() * 1000),
    )
    for n, symbol in enumerate(symbols):
        paper.set_price(symbol, 0.01 * (n + 1), int(time.time() * 1000))
    return paper


def open_positions(
    deployment: Deployment,
    paper: PaperExchange,
    lots: Sequence[tuple[str, float]],
    resting: Sequence[str] = (),
) -> None:
    """Buy `lots` (symbol, qty) on the paper exchange, record the matching Position rows
    (average entry) and cash, and leave a resting limit sell on each `resting` symbol."""
    cost: dict[str, float] = {}
    for n, (symbol, qty) in enumerate(lots):
        cid = f"entry-{deployment.pk}-{n}"
        result = paper.create_order(OrderRequest(symbol, "buy", "market", qty, client_order_id=cid))
        cost[symbol] = cost.get(symbol, 0.0) + result.filled * (result.average or 0.0)
    for symbol, held in paper.positions().items():
        avg = cost[symbol] / held
        Position.objects.update_or_create(
            deployment=deployment,
            symbol=symbol,
            defaults={"qty": held, "avg_entry": avg, "last_price": avg},
        )
    Deployment.objects.filter(pk=deployment.pk).update(cash=paper.fetch_balance()["BTC"].free)
    for n, symbol in enumerate(resting):
        qty = round(paper.positions()[symbol] / 4, 4)
        cid = f"rest-{deployment.pk}-{n}"
        paper.create_order(
            OrderRequest(symbol, "sell", "limit", qty, price=1.0, client_order_id=cid)
        )
