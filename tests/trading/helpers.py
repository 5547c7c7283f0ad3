"""Candle builders shared by the ingestion tests."""

from __future__ import annotations

STEP_MS = 60_000
START_MS = 1_600_000_000_000


def minute_candle(i: int) -> dict:
    """Candle i of one binance ETH/BTC 1m stream (i may be negative)."""
    return {
        "exchange": "binance",
        "symbol": "ETH/BTC",
        "timeframe": "1m",
        "open_time_ms": START_MS + i * STEP_MS,
        "open": 1.0,
        "high": 1.1,
        "low": 0.9,
        "close": 1.05,
        "volume": 3.0,
    }
