"""Thin links from the safety code (pre-flight, rollback, watchdogs) to other apps.

Each link prefers the owning module when it exists and falls back to a minimal local
version otherwise, so the safety code works while those modules are being written:

- exchange_for: trading.execution.get_exchange(deployment); fallback: build_exchange
  from the deployment and EXCHANGE_* settings. SAFETY_EXCHANGE_OVERRIDE wins over both
  (tests point a real worker at the Binance stub with it).
- stream_gap_s: trading.marketdata.max_stream_gap_s(deployment, now); fallback: the
  oldest MarketStream.last_received_at of the deployment's symbols.
- raise_alert: alerts.services.alert_raise; fallback: a CRITICAL log record.

Tests replace `exchange_for` with monkeypatch (callers look it up on this module).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from datetime import datetime
from typing import Any

from django.conf import settings

from trading.exchange import ExchangeAdapter, ExchangeConfig, build_exchange

log = logging.getLogger("canary.safety")


def optional(module: str, name: str) -> Any | None:
    """`module.name` when the module exists (other engineers' work in progress), else None."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def exchange_kind(deployment: Any) -> str:
    return "paper" if (deployment.exchange or "paper") == "paper" else "ccxt"


def _secret(name: str) -> str:
    return str(getattr(settings, name, "") or os.environ.get(name, ""))


def _override_config(deployment: Any) -> ExchangeConfig | None:
    override = dict(getattr(settings, "SAFETY_EXCHANGE_OVERRIDE", {}) or {})
    if not override:
        return None
    override.setdefault("symbols", tuple(deployment.symbols))
    return ExchangeConfig(**override)


def exchange_for(deployment: Any) -> ExchangeAdapter:
    """The exchange adapter of `deployment` (a Deployment, possibly unsaved: the rollback
    builds one from its Redis snapshot when the database is down)."""
    config = _override_config(deployment)
    if config is not None:
        return build_exchange(config)
    get_exchange = optional("trading.execution", "get_exchange")
    if get_exchange is not None:
        return get_exchange(deployment)
    kind = exchange_kind(deployment)
    return build_exchange(
        ExchangeConfig(
            kind=kind,
            symbols=tuple(deployment.symbols),
            exchange_id=deployment.exchange if kind == "ccxt" else "binance",
            api_key=_secret("TRADING_EXCHANGE_API_KEY"),
            api_secret=_secret("TRADING_EXCHANGE_API_SECRET"),
        )
    )


def stream_gap_s(deployment: Any, now: datetime) -> float:
    """Seconds since the stalest market stream of the deployment delivered (inf: never)."""
    owner = optional("trading.marketdata", "max_stream_gap_s")
    if owner is not None:
        return float(owner(deployment, now))
    from trading.models import MarketStream

    streams = {
        s.symbol: s
        for s in MarketStream.objects.filter(
            exchange=deployment.exchange,
            symbol__in=list(deployment.symbols),
            timeframe=deployment.timeframe,
        )
    }
    gaps = []
    for symbol in deployment.symbols:
        stream = streams.get(symbol)
        if stream is None or stream.last_received_at is None:
            return math.inf
        gaps.append((now - stream.last_received_at).total_seconds())
    return max(gaps) if gaps else math.inf


def raise_alert(
    *, key: str, message: str, payload: dict | None = None, severity: str = "critical"
) -> Any:
    """A critical canary alert through the alert rules and every channel (joins the caller's
    transaction). Falls back to a CRITICAL log record when the alerts app cannot."""
    alert_raise = optional("alerts.services", "alert_raise")
    if alert_raise is None:
        log.critical("ALERT %s: %s %s", key, message, payload or {})
        return None
    return alert_raise(
        source="canary", key=key, severity=severity, message=message, payload=payload or {}
    )
