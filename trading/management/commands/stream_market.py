"""Optional low-latency market data: ccxt.pro WebSocket klines, closed candles only.

On start and after every reconnect the REST poller backfills the gap first, so candles
missed while disconnected are stored (in order) before live ones. REST polling
(MARKET_POLL_ENABLED) remains the fallback; running both is harmless (idempotent storage).
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from trading import marketdata
from trading.exchange import ExchangeError
from trading.exchange_stream import KlineCloser, pro_client, watch_closed
from trading.timeframes import timeframe_ms

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 60.0


class Command(BaseCommand):
    help = "Stream closed candles over WebSocket (ccxt.pro) into the candle pipeline."

    def add_arguments(self, parser):
        parser.add_argument("--exchange", default=settings.MARKET_POLL_EXCHANGE)
        parser.add_argument("--symbols", default="", help="comma-separated; default: polled")
        parser.add_argument("--timeframe", default="")

    def handle(self, *args, exchange, symbols, timeframe, **options):
        specs = self._specs(exchange, symbols, timeframe)
        if not specs:
            raise CommandError("no streams: give --symbols and --timeframe, or create deployments")
        timeframes = {s.timeframe for s in specs}
        if len(timeframes) != 1:
            raise CommandError("one timeframe per stream_market process")
        self.stdout.write("streaming " + ", ".join(s.label for s in specs))
        try:
            asyncio.run(self._run(exchange, specs, timeframes.pop()))
        except KeyboardInterrupt:
            self.stdout.write("stopped")

    def _specs(self, exchange: str, symbols: str, timeframe: str) -> list[marketdata.StreamSpec]:
        if symbols:
            tf = timeframe or "1m"
            return [
                marketdata.StreamSpec(exchange, s.strip(), tf)
                for s in symbols.split(",")
                if s.strip()
            ]
        specs = marketdata.configured_streams(exchange)
        return [s for s in specs if not timeframe or s.timeframe == timeframe]

    async def _run(self, exchange: str, specs: list[marketdata.StreamSpec], timeframe: str):
        by_symbol = {s.symbol: s for s in specs}
        tf_ms = timeframe_ms(timeframe)
        backoff = 1.0
        while True:
            closers: dict[str, KlineCloser] = {}
            client = pro_client(exchange)
            try:
                await asyncio.to_thread(self._backfill, specs, closers)

                async def on_closed(symbol: str, bars: list) -> None:
                    spec = by_symbol[symbol]
                    await asyncio.to_thread(marketdata.ingest_bars, spec, bars, "stream")

                async def on_message(symbol: str, closer: KlineCloser) -> None:
                    now = timezone.now()
                    now_ms = int(now.timestamp() * 1000)
                    if closer.last_closed_ms >= marketdata.latest_closable_open_ms(tf_ms, now_ms):
                        spec = by_symbol[symbol]
                        await asyncio.to_thread(
                            marketdata.stream_touch,
                            exchange=spec.exchange,
                            symbol=symbol,
                            timeframe=spec.timeframe,
                            now=now,
                        )

                await watch_closed(
                    client, list(by_symbol), timeframe, on_closed, on_message, closers
                )
                backoff = 1.0
            except Exception as exc:  # network errors of any kind: reconnect
                log.warning("stream error, reconnecting in %.0f s: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            finally:
                await client.close()

    def _backfill(
        self, specs: list[marketdata.StreamSpec], closers: dict[str, KlineCloser]
    ) -> None:
        adapter = marketdata.poll_exchange()
        for spec in specs:
            try:
                marketdata.stream_poll(adapter=adapter, spec=spec, now=timezone.now())
            except ExchangeError as exc:
                log.warning("%s: backfill failed: %s", spec.label, exc)
            last = marketdata.last_open_ms(spec)
            closers[spec.symbol] = KlineCloser(last if last else -1)
