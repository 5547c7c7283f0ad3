"""WebSocket klines through ccxt.pro: the only module that imports ccxt.pro, and only
inside ``pro_client``.

``watch_ohlcv`` returns the recent candles of a stream, the last one still forming. A
candle is closed once a newer one has been seen; ``KlineCloser`` turns those snapshots into
closed candles, each exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .exchange import Candle as Bar
from .exchange_ccxt import rebase_urls


def pro_client(exchange_id: str, *, ws_url: str | None = None) -> Any:
    """A public (keyless) ccxt.pro client for ``exchange_id``; spot."""
    import ccxt.pro as ccxtpro

    klass = getattr(ccxtpro, exchange_id, None)
    if klass is None:
        raise ValueError(f"ccxt.pro has no exchange {exchange_id!r}")
    client = klass({"enableRateLimit": True, "options": {"defaultType": "spot"}})
    if ws_url:
        client.urls["api"]["ws"] = rebase_urls(client.urls["api"]["ws"], ws_url)
    return client


@dataclass
class KlineCloser:
    """Closed candles out of successive watch_ohlcv snapshots. Pure."""

    last_closed_ms: int = -1

    def feed(self, rows: Sequence[Sequence[float]]) -> list[Bar]:
        ordered = sorted(rows, key=lambda r: r[0])
        closed = [
            Bar(int(r[0]), float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]))
            for r in ordered[:-1]
            if int(r[0]) > self.last_closed_ms
        ]
        if closed:
            self.last_closed_ms = closed[-1].open_time_ms
        return closed


OnClosed = Callable[[str, list[Bar]], Awaitable[None]]
OnMessage = Callable[[str, KlineCloser], Awaitable[None]]


async def watch_closed(
    client: Any,
    symbols: Sequence[str],
    timeframe: str,
    on_closed: OnClosed,
    on_message: OnMessage,
    closers: dict[str, KlineCloser],
) -> None:
    """Watch every symbol until one of them raises (the caller reconnects)."""

    async def one(symbol: str) -> None:
        closer = closers.setdefault(symbol, KlineCloser())
        while True:
            rows = await client.watch_ohlcv(symbol, timeframe)
            closed = closer.feed(rows)
            if closed:
                await on_closed(symbol, closed)
            await on_message(symbol, closer)

    await asyncio.gather(*(one(s) for s in symbols))
