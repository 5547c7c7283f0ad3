"""Candle builders shared by the alerts tests."""

from __future__ import annotations

from pathlib import Path

MARKET = Path(__file__).resolve().parents[2] / "data" / "market"
STEP_MS = 300_000
START_MS = 1_700_000_000_000 - (1_700_000_000_000 % STEP_MS)


def candle(i: int, o: float, c: float, *, symbol: str = "ETH/BTC", volume: float = 10.0) -> dict:
    return {
        "exchange": "binance",
        "symbol": symbol,
        "timeframe": "5m",
        "open_time_ms": START_MS + i * STEP_MS,
        "open": o,
        "high": max(o, c) * 1.0001,
        "low": min(o, c) * 0.9999,
        "close": c,
        "volume": volume,
    }


def quiet_then_spike(n_quiet: int = 21, symbol: str = "ETH/BTC") -> list[dict]:
    """Green candles rising by slightly varying small steps (no engulfing: same colour),
    then a +5 % candle: one volatility alert (up) on the last candle."""
    out, price = [], 100.0
    for i in range(n_quiet):
        nxt = price + (0.010 if i % 2 == 0 else 0.012)
        out.append(candle(i, price, nxt, symbol=symbol))
        price = nxt
    out.append(candle(n_quiet, price, price * 1.05, symbol=symbol))
    return out


def engulfing_pair(start: int, price: float, symbol: str = "ETH/BTC") -> list[dict]:
    """A red candle then a green one whose body engulfs it: one engulfing alert (up)."""
    return [
        candle(start, price, price * 0.999, symbol=symbol),
        candle(start + 1, price * 0.9985, price * 1.0015, symbol=symbol),
    ]
