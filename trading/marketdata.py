"""Market data: REST polling of closed candles with gap backfill, and stream freshness.

Polling (``market_poll``, a beat task when MARKET_POLL_ENABLED): for each configured
stream, fetch from the candle after the last stored one (or MARKET_POLL_BACKFILL candles
back for a new stream), page until caught up, keep closed candles only (open time + one
timeframe + MARKET_POLL_CLOSE_GRACE_MS <= now) and ingest them through
``trading.services.candles_ingest`` (validated, idempotent, processed on commit).

Freshness: ``MarketStream.last_received_at`` is the wall time the stream was last heard
of: a candle arrived (ingestion), or a poll/stream message confirmed it is up to date with
the newest candle that can be closed. A 5-minute stream polled every 10 s thus stays
fresh; a stuck feed or an unreachable exchange does not.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from .exchange import Candle as Bar
from .exchange import ExchangeAdapter, ExchangeConfig, ExchangeError, build_exchange
from .models import Deployment, MarketStream
from .services import CandleBatchInvalid, CandleConflict, candles_ingest
from .timeframes import timeframe_ms

log = logging.getLogger(__name__)

PAGE_LIMIT = 1000
MAX_PAGES = 50
ACTOR = "market-poll"


# --------------------------------------------------------------------------- freshness


def stream_gaps(deployment: Deployment, now: datetime) -> dict[str, float]:
    """symbol -> seconds since the deployment's stream (its timeframe, any exchange) was
    last heard of; ``math.inf`` for a stream never heard of."""
    symbols = [s for s in (deployment.symbols or []) if isinstance(s, str)]
    rows = (
        MarketStream.objects.filter(symbol__in=symbols, timeframe=deployment.timeframe)
        .values("symbol")
        .annotate(last=Max("last_received_at"))
    )
    last = {r["symbol"]: r["last"] for r in rows}
    return {
        s: max(0.0, (now - last[s]).total_seconds()) if last.get(s) else math.inf for s in symbols
    }


def max_stream_gap_s(deployment: Deployment, now: datetime) -> float:
    """The longest current silence among the deployment's streams (``math.inf`` when one
    was never heard of, or the deployment has no symbols: fail closed)."""
    gaps = stream_gaps(deployment, now)
    return max(gaps.values()) if gaps else math.inf


def stream_touch(*, exchange: str, symbol: str, timeframe: str, now: datetime) -> int:
    """Mark a stream as heard of at ``now`` (it exists: ingestion created it)."""
    return MarketStream.objects.filter(
        exchange=exchange, symbol=symbol, timeframe=timeframe
    ).update(last_received_at=now)


# --------------------------------------------------------------------------- polling


@dataclass(frozen=True)
class StreamSpec:
    exchange: str
    symbol: str
    timeframe: str

    @property
    def label(self) -> str:
        return f"{self.exchange}:{self.symbol}:{self.timeframe}"


def configured_streams(exchange: str | None = None) -> list[StreamSpec]:
    """MARKET_POLL_SYMBOLS x MARKET_POLL_TIMEFRAMES, or when unset the symbols and
    timeframes of the deployments with signals enabled."""
    name = exchange or settings.MARKET_POLL_EXCHANGE
    symbols, timeframes = settings.MARKET_POLL_SYMBOLS, settings.MARKET_POLL_TIMEFRAMES
    pairs: set[tuple[str, str]] = set()
    if symbols:
        for tf in timeframes or ["5m"]:
            pairs.update((s, tf) for s in symbols)
    else:
        for dep in Deployment.objects.filter(signals_enabled=True):
            if not timeframes or dep.timeframe in timeframes:
                pairs.update((s, dep.timeframe) for s in dep.symbols or [])
    return [StreamSpec(name, s, tf) for s, tf in sorted(pairs)]


_poll_adapter: ExchangeAdapter | None = None
_poll_lock = threading.Lock()


def poll_exchange() -> ExchangeAdapter:
    """A public (keyless) ccxt adapter for MARKET_POLL_EXCHANGE, one per process."""
    global _poll_adapter
    with _poll_lock:
        if _poll_adapter is None:
            _poll_adapter = build_exchange(
                ExchangeConfig(
                    kind="ccxt",
                    exchange_id=settings.MARKET_POLL_EXCHANGE,
                    base_url=settings.MARKET_POLL_BASE_URL or None,
                    symbols=(),
                )
            )
        return _poll_adapter


def closed_bars(bars: Iterable[Bar], tf_ms: int, now_ms: int, after_ms: int) -> list[Bar]:
    """The bars after ``after_ms`` that are closed at ``now_ms`` (grace included), in
    open-time order, without duplicates. Pure."""
    grace = settings.MARKET_POLL_CLOSE_GRACE_MS
    seen: dict[int, Bar] = {}
    for bar in bars:
        if bar.open_time_ms > after_ms and bar.open_time_ms + tf_ms + grace <= now_ms:
            seen[bar.open_time_ms] = bar
    return [seen[t] for t in sorted(seen)]


def _items(spec: StreamSpec, bars: Sequence[Bar]) -> list[dict]:
    return [
        {
            "exchange": spec.exchange,
            "symbol": spec.symbol,
            "timeframe": spec.timeframe,
            "open_time_ms": int(b.open_time_ms),
            "open": float(b.open),
            "high": float(b.high),
            "low": float(b.low),
            "close": float(b.close),
            "volume": float(b.volume),
        }
        for b in bars
    ]


def last_open_ms(spec: StreamSpec) -> int | None:
    return (
        MarketStream.objects.filter(
            exchange=spec.exchange, symbol=spec.symbol, timeframe=spec.timeframe
        )
        .values_list("last_open_time_ms", flat=True)
        .first()
    )


def latest_closable_open_ms(tf_ms: int, now_ms: int) -> int:
    """Open time of the newest candle that is closed (grace included) at ``now_ms``."""
    grace = settings.MARKET_POLL_CLOSE_GRACE_MS
    return ((now_ms - grace) // tf_ms) * tf_ms - tf_ms


def stream_poll(
    *, adapter: ExchangeAdapter, spec: StreamSpec, now: datetime, source: str = "poll"
) -> int:
    """Fetch and ingest the closed candles missing from one stream. Returns how many were
    stored. Raises ExchangeError when the exchange cannot be read (nothing is touched)."""
    tf_ms = timeframe_ms(spec.timeframe)
    now_ms = int(now.timestamp() * 1000)
    last = last_open_ms(spec)
    after = last if last else now_ms - (settings.MARKET_POLL_BACKFILL + 1) * tf_ms
    target = latest_closable_open_ms(tf_ms, now_ms)
    stored = 0
    for _ in range(MAX_PAGES):
        if after >= target:
            break
        page = adapter.fetch_ohlcv(spec.symbol, spec.timeframe, after + 1, PAGE_LIMIT)
        bars = closed_bars(page, tf_ms, now_ms, after)
        if not bars:
            break
        stored += ingest_bars(spec, bars, source)
        after = bars[-1].open_time_ms
    if after >= target:
        stream_touch(exchange=spec.exchange, symbol=spec.symbol, timeframe=spec.timeframe, now=now)
    return stored


def ingest_bars(spec: StreamSpec, bars: Sequence[Bar], source: str) -> int:
    stored = 0
    step = settings.MAX_CANDLES_PER_BATCH
    for start in range(0, len(bars), step):
        chunk = _items(spec, bars[start : start + step])
        try:
            stored += len(candles_ingest(items=chunk, actor=ACTOR, source=source).created_ids)
        except (CandleBatchInvalid, CandleConflict) as exc:
            log.warning("%s: candles refused: %s", spec.label, exc)
    return stored


def market_poll(
    *,
    now: datetime | None = None,
    adapter: ExchangeAdapter | None = None,
    streams: Sequence[StreamSpec] | None = None,
) -> dict[str, int | str]:
    """Poll every configured stream once. Returns stream label -> candles stored, or the
    error text for a stream whose exchange could not be read (the others go on)."""
    now = now or timezone.now()
    specs = list(streams) if streams is not None else configured_streams()
    out: dict[str, int | str] = {}
    if not specs:
        return out
    adapter = adapter or poll_exchange()
    for spec in specs:
        try:
            out[spec.label] = stream_poll(adapter=adapter, spec=spec, now=now)
        except ExchangeError as exc:
            log.warning("%s: poll failed: %s", spec.label, exc)
            out[spec.label] = f"error: {exc}"
    return out
