"""Pre-flight: a GO/NO-GO check of everything the strategy needs before it goes live.

Eight checks, each a small class registered by name whose `run(ctx)` returns a
`Finding` (PASS, WARN or FAIL with a one-line detail). The runner gives each check its own
thread and timeout, turns any exception into a FAIL with the reason (never a traceback),
and measures its duration. GO when no critical check FAILs.

`preflight_run(actor=..., deployment=None, json_path=None) -> PreflightRun` writes the JSON
report (under SAFETY_PREFLIGHT_DIR unless `json_path`) and stores the run, with its audit
record, for gate #1. The management command `preflight` prints the table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from audit.services import audit_record
from trading.exchange import ExchangeAdapter, MarketInfo, OrderRequest, client_order_id
from trading.models import Candle, Deployment

from . import safety_adapters
from .models import PreflightRun

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
GO, NO_GO = "GO", "NO-GO"


@dataclass(frozen=True)
class Finding:
    status: str
    detail: str


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    critical: bool
    detail: str
    duration_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CheckFailed(Exception):
    """Raised inside a check: FAIL with this message as the detail."""


class Context:
    """What the checks share: the deployment, the time, a lazily built exchange adapter."""

    def __init__(self, deployment: Deployment | None, now: datetime, problem: str = ""):
        self.deployment = deployment
        self.now = now
        self.problem = problem
        self._adapter: ExchangeAdapter | None = None
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        if self.deployment is None:
            return "unknown"
        return "paper" if safety_adapters.exchange_kind(self.deployment) == "paper" else "live"

    def need_deployment(self) -> Deployment:
        if self.deployment is None:
            raise CheckFailed(self.problem or "no deployment to check")
        return self.deployment

    def exchange(self) -> ExchangeAdapter:
        with self._lock:
            if self._adapter is None:
                self._adapter = safety_adapters.exchange_for(self.need_deployment())
            return self._adapter


class Check(ABC):
    name: ClassVar[str]
    critical: ClassVar[bool] = True
    timeout_s: ClassVar[float | None] = None  # None: SAFETY_PREFLIGHT_TIMEOUT_S

    @abstractmethod
    def run(self, ctx: Context) -> Finding: ...


REGISTRY: dict[str, type[Check]] = {}


def register(cls: type[Check]) -> type[Check]:
    REGISTRY[cls.name] = cls
    return cls


def _plural(items: Iterable[str]) -> str:
    return ", ".join(items)


# --------------------------------------------------------------------------- env


LIVE_SECRETS = ("TRADING_EXCHANGE_API_KEY", "TRADING_EXCHANGE_API_SECRET")
ALWAYS = ("SECRET_KEY", "REDIS_URL", "CELERY_BROKER_URL", "EMAIL_BACKEND", "DEFAULT_FROM_EMAIL")


@register
class EnvCheck(Check):
    """Required settings present and valid for the mode; names, never values."""

    name = "env"

    def run(self, ctx: Context) -> Finding:
        missing = [n for n in ALWAYS if not getattr(settings, n, None)]
        invalid, warnings = self._settings(ctx)
        deployment = ctx.deployment
        if deployment is None:
            invalid.append(ctx.problem or "no deployment")
        else:
            invalid.extend(_deployment_problems(deployment))
        if ctx.mode == "live":
            missing += [n for n in LIVE_SECRETS if not getattr(settings, n, "")]
        parts = []
        if missing:
            parts.append(f"missing: {_plural(missing)}")
        if invalid:
            parts.append(f"invalid: {'; '.join(invalid)}")
        if parts:
            return Finding(FAIL, " | ".join(parts))
        if warnings:
            return Finding(WARN, "; ".join(warnings))
        return Finding(PASS, f"{ctx.mode} mode: every required setting is present and valid")

    @staticmethod
    def _settings(ctx: Context) -> tuple[list[str], list[str]]:
        invalid: list[str] = []
        warnings: list[str] = []
        if not str(settings.REDIS_URL).startswith(("redis://", "rediss://", "unix://")):
            invalid.append("REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if str(settings.SECRET_KEY).startswith("dev-only") and not settings.DEBUG:
            invalid.append("SECRET_KEY is the development key")
        layer = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
        if ctx.mode == "live":
            if settings.DEBUG:
                invalid.append("DEBUG must be off in live mode")
            if layer.endswith("InMemoryChannelLayer"):
                invalid.append("CHANNEL_LAYERS: the in-memory layer cannot reach other processes")
            if connection.vendor == "sqlite":
                warnings.append("the database is SQLite; PostgreSQL is recommended live")
        backups = Path(settings.SAFETY_BACKUP_DIR)
        with contextlib.suppress(OSError):
            backups.mkdir(parents=True, exist_ok=True)
        if not os.access(backups, os.W_OK):
            invalid.append("SAFETY_BACKUP_DIR is not writable")
        return invalid, warnings


def _deployment_problems(deployment: Deployment) -> list[str]:
    problems = []
    if not deployment.symbols:
        problems.append(f"deployment {deployment.name} has no symbols")
    if deployment.timeframe not in settings.MARKET_TIMEFRAMES:
        problems.append(f"deployment timeframe {deployment.timeframe!r} is not supported")
    if not deployment.full_order_notional or deployment.full_order_notional <= 0:
        problems.append("deployment full_order_notional must be > 0")
    return problems


# --------------------------------------------------------------------------- exchange


@register
class ExchangeRestCheck(Check):
    """Server reachable, clock skew, markets, configured symbols, account readable."""

    name = "exchange_rest"

    def run(self, ctx: Context) -> Finding:
        deployment = ctx.need_deployment()
        adapter = ctx.exchange()
        before = time.time() * 1000
        server_ms = adapter.fetch_time_ms()
        skew_ms = server_ms - (before + time.time() * 1000) / 2
        paper = adapter.name == "paper"
        if not paper and abs(skew_ms) >= settings.SAFETY_MAX_CLOCK_SKEW_MS:
            raise CheckFailed(
                f"clock skew {skew_ms:+.0f} ms (limit {settings.SAFETY_MAX_CLOCK_SKEW_MS:.0f} ms)"
            )
        markets = adapter.load_markets()
        unknown = [s for s in deployment.symbols if s not in markets]
        if unknown:
            raise CheckFailed(f"symbols not listed by the exchange: {_plural(unknown)}")
        balances = adapter.fetch_balance()
        skew = "paper clock" if paper else f"skew {skew_ms:+.0f} ms"
        detail = f"{adapter.name}: {skew}, {len(markets)} markets, account readable ({len(balances)} assets)"
        if adapter.can_withdraw():
            return Finding(WARN, f"{detail}; the API key can WITHDRAW: use a trade-only key")
        return Finding(PASS, detail)


@register
class ExchangeWebsocketCheck(Check):
    """The market stream of every symbol delivers (waits up to SAFETY_STREAM_WAIT_S)."""

    name = "exchange_websocket"

    def run(self, ctx: Context) -> Finding:
        deployment = ctx.need_deployment()
        limit = float(settings.SAFETY_STREAM_SILENT_S)
        deadline = time.monotonic() + float(settings.SAFETY_STREAM_WAIT_S)
        while True:
            gap = safety_adapters.stream_gap_s(deployment, timezone.now())
            if gap <= limit or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        source = "paper source" if ctx.mode == "paper" else "market stream"
        if math.isinf(gap):
            raise CheckFailed(f"{source}: no candle ever received for one of {deployment.symbols}")
        if gap > limit:
            raise CheckFailed(f"{source} silent for {gap:.0f} s (limit {limit:.0f} s)")
        return Finding(PASS, f"{source} delivering: stalest symbol heard {gap:.1f} s ago")


# --------------------------------------------------------------------------- database


@register
class DatabaseCheck(Check):
    """Connection, migrations applied, a write/read round trip (rolled back)."""

    name = "database"

    def run(self, ctx: Context) -> Finding:
        started = time.perf_counter()
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if plan:
            first = plan[0][0]
            raise CheckFailed(
                f"{len(plan)} migration(s) not applied, e.g. {first.app_label}.{first.name}"
            )
        token = uuid.uuid4().hex
        with transaction.atomic():
            now = timezone.now()
            row = PreflightRun.objects.create(
                started_at=now, ended_at=now, decision="PROBE", checks={"token": token}
            )
            read = PreflightRun.objects.get(pk=row.pk).checks.get("token")
            transaction.set_rollback(True)
        if read != token:
            raise CheckFailed("write/read round trip returned a different value")
        ms = (time.perf_counter() - started) * 1000
        return Finding(PASS, f"{connection.vendor}: migrations applied, round trip {ms:.0f} ms")


# --------------------------------------------------------------------------- signals


def _market_exchange(deployment: Deployment) -> str:
    owner = safety_adapters.optional("trading.execution", "market_exchange_of")
    return owner(deployment) if owner is not None else deployment.exchange


@register
class SignalsCheck(Check):
    """Strategy parameters valid; a signal score computed from fresh candles per symbol."""

    name = "signals"

    def run(self, ctx: Context) -> Finding:
        from trading.signals import (
            InvalidSignalParams,
            SignalParams,
            candles_to_arrays,
            score_arrays,
        )
        from trading.timeframes import timeframe_ms

        deployment = ctx.need_deployment()
        try:
            params = SignalParams.from_dict(deployment.params or {})
        except (InvalidSignalParams, TypeError) as exc:
            raise CheckFailed(f"strategy parameters invalid: {exc}") from exc
        exchange = _market_exchange(deployment)
        frame_ms = timeframe_ms(deployment.timeframe)
        scores = []
        for symbol in deployment.symbols:
            candles = list(
                Candle.objects.filter(
                    exchange=exchange, symbol=symbol, timeframe=deployment.timeframe
                ).order_by("-open_time_ms")[: params.warmup + 50]
            )[::-1]
            self._fresh(symbol, candles, params.warmup, frame_ms, ctx.now)
            arrays = candles_to_arrays(
                (c.open_time_ms, c.open, c.high, c.low, c.close, c.volume) for c in candles
            )
            score = score_arrays(arrays, params)
            scores.append(f"{symbol} {int(score.score[-1])}/4")
        return Finding(PASS, f"signals computed from fresh candles: {_plural(scores)}")

    @staticmethod
    def _fresh(
        symbol: str, candles: list[Candle], warmup: int, frame_ms: int, now: datetime
    ) -> None:
        if len(candles) <= warmup:
            raise CheckFailed(f"{symbol}: {len(candles)} candles, {warmup + 1} needed to score")
        age_ms = now.timestamp() * 1000 - candles[-1].close_time_ms
        if age_ms > settings.SAFETY_CANDLES_FRESH_BARS * frame_ms:
            raise CheckFailed(f"{symbol}: latest candle closed {age_ms / 60000:.0f} min ago")


# --------------------------------------------------------------------------- order test


def minimum_qty(market: MarketInfo, price: float) -> float:
    """The smallest quantity that passes the market's min qty, step and min notional."""
    step = Decimal(repr(market.step_size)) if market.step_size > 0 else None
    need = max(market.min_qty, market.step_size)
    if market.min_notional and price > 0:
        need = max(need, market.min_notional / price * 1.001)
    if step is None:
        return float(need)
    steps = (Decimal(repr(need)) / step).to_integral_value(rounding="ROUND_CEILING")
    return float(steps * step)


@register
class OrderTestCheck(Check):
    """A minimum-size order per symbol validated by the exchange without executing."""

    name = "order_test"

    def run(self, ctx: Context) -> Finding:
        deployment = ctx.need_deployment()
        adapter = ctx.exchange()
        markets = adapter.load_markets()
        errors, done = [], []
        stamp = int(time.time() * 1000)
        for symbol in deployment.symbols:
            market = markets.get(symbol)
            if market is None:
                errors.append(f"{symbol}: not listed")
                continue
            price = adapter.fetch_ticker(symbol).last
            qty = minimum_qty(market, price)
            request = OrderRequest(
                symbol=symbol,
                side="buy",
                type="market",
                amount=qty,
                price=price,
                client_order_id=client_order_id("preflight", stamp, symbol),
            )
            try:
                adapter.test_order(request)
                done.append(f"{symbol} {qty:g}")
            except Exception as exc:  # noqa: BLE001 - the exchange's reason is the detail
                errors.append(f"{symbol}: {type(exc).__name__}: {str(exc)[:160]}")
        if errors:
            raise CheckFailed("test order refused: " + "; ".join(errors))
        return Finding(PASS, f"test orders accepted: {_plural(done)}")


# --------------------------------------------------------------------------- backup


@register
class BackupCheck(Check):
    """A backup < SAFETY_BACKUP_MAX_AGE_H exists, its checksum matches, and it restores
    into a scratch database that passes the integrity check (a restore verified within the
    last SAFETY_BACKUP_VERIFIED_TTL_H of an unchanged file is not repeated)."""

    name = "backup"
    timeout_s = 120.0

    def run(self, ctx: Context) -> Finding:
        from .backup import backup_check, latest_backup
        from .models import Backup

        max_age = timedelta(hours=settings.SAFETY_BACKUP_MAX_AGE_H)
        backup = latest_backup(max_age)
        if backup is None:
            newest = latest_backup()
            seen = f"newest is {_age(newest.created_at, ctx.now)} old" if newest else "none exists"
            raise CheckFailed(f"no backup younger than {_age_td(max_age)} ({seen})")
        ttl = timedelta(hours=settings.SAFETY_BACKUP_VERIFIED_TTL_H)
        recent = bool(
            backup.verified_ok and backup.verified_at and ctx.now - backup.verified_at < ttl
        )
        result = backup_check(backup=backup, restore_check=not recent)
        if not result.ok:
            raise CheckFailed(f"backup {backup.pk}: {result.reason}")
        if not recent:
            Backup.objects.filter(pk=backup.pk).update(verified_at=timezone.now(), verified_ok=True)
        how = "restore verified earlier, checksum matches" if recent else result.reason
        return Finding(PASS, f"backup {backup.pk} ({_age(backup.created_at, ctx.now)} old): {how}")


def _age(then: datetime, now: datetime) -> str:
    return _age_td(now - then)


def _age_td(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------- monitoring


def ping_workers(timeout_s: float) -> list[str]:
    """Names of the Celery workers that answered a ping (returns on the first answer)."""
    from config.celery import app

    replies = app.control.ping(timeout=timeout_s, limit=1) or []
    return sorted(name for reply in replies for name in reply)


@register
class MonitoringCheck(Check):
    """A worker answers a ping, the beat heartbeat is fresh, the channel layer round-trips,
    the gate thresholds and the alert rules are valid."""

    name = "monitoring"

    def run(self, ctx: Context) -> Finding:
        from .health import CHECKS
        from .heartbeat import KEY_BEAT, last_seen

        workers = ping_workers(1.0)
        if not workers:
            raise CheckFailed("no Celery worker answered a ping within 1 s")
        seen = last_seen(KEY_BEAT)
        if seen is None or time.time() - seen > settings.HEARTBEAT_STALE_S:
            age = "never" if seen is None else f"{time.time() - seen:.0f} s ago"
            raise CheckFailed(
                f"beat heartbeat stale (last {age}, limit {settings.HEARTBEAT_STALE_S:.0f} s)"
            )
        layer = CHECKS["channel_layer"]()
        if not layer.get("ok"):
            raise CheckFailed(f"channel layer round trip failed: {layer}")
        thresholds = _thresholds_problem(ctx.deployment) or _alert_rules_problem()
        if thresholds:
            raise CheckFailed(thresholds)
        return Finding(
            PASS, f"{len(workers)} worker(s), beat fresh, channel layer ok, thresholds valid"
        )


def _thresholds_problem(deployment: Deployment | None) -> str:
    from .engine import ThresholdError, Thresholds
    from .models import Rollout

    rollout = (
        Rollout.objects.filter(deployment=deployment).order_by("-created_at").first()
        if deployment is not None
        else None
    )
    try:
        Thresholds.from_dict(rollout.thresholds if rollout else {})
    except ThresholdError as exc:
        return f"gate thresholds invalid: {exc}"
    return ""


def _alert_rules_problem() -> str:
    from alerts.models import AlertRule

    try:
        from alerts.rules import validate_rule
    except ImportError:
        return ""
    for rule in AlertRule.objects.filter(enabled=True):
        try:
            validate_rule(rule.as_spec())
        except Exception as exc:  # noqa: BLE001 - a broken rule is the finding
            return f"alert rule {rule} invalid: {exc}"
    return ""


# --------------------------------------------------------------------------- runner


def _collect(
    check: Check, thread: threading.Thread, box: dict[str, Finding], started: float, timeout: float
) -> CheckResult:
    thread.join(max(0.0, started + timeout - time.perf_counter()))
    finding = box.get("finding") or Finding(FAIL, f"timed out after {timeout:g} s")
    duration = round((time.perf_counter() - started) * 1000, 1)
    return CheckResult(check.name, finding.status, check.critical, finding.detail, duration)


def run_checks(ctx: Context, names: Iterable[str] | None = None) -> list[CheckResult]:
    """Every registered check (or `names`) in parallel, each with its own timeout."""
    checks = [REGISTRY[n]() for n in (names or REGISTRY)]
    timeouts = {c.name: c.timeout_s or float(settings.SAFETY_PREFLIGHT_TIMEOUT_S) for c in checks}
    started = time.perf_counter()
    boxes: list[tuple[Check, threading.Thread, dict[str, Finding]]] = []
    for check in checks:
        box: dict[str, Finding] = {}
        thread = threading.Thread(
            target=_guarded, args=(check, ctx, box), name=f"preflight-{check.name}", daemon=True
        )
        thread.start()
        boxes.append((check, thread, box))
    return [_collect(c, t, b, started, timeouts[c.name]) for c, t, b in boxes]


def _guarded(check: Check, ctx: Context, box: dict[str, Finding]) -> None:
    try:
        box["finding"] = check.run(ctx)
    except CheckFailed as exc:
        box["finding"] = Finding(FAIL, str(exc))
    except Exception as exc:  # noqa: BLE001 - a check that cannot reach its target FAILs
        box["finding"] = Finding(FAIL, f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        with contextlib.suppress(Exception):
            connections.close_all()


def decide(results: Iterable[CheckResult]) -> str:
    return NO_GO if any(r.critical and r.status == FAIL for r in results) else GO


def _default_deployment() -> tuple[Deployment | None, str]:
    try:
        candidates = list(Deployment.objects.order_by("pk")[:2])
    except DatabaseError as exc:
        return None, f"deployment unreadable: {type(exc).__name__}: {str(exc)[:200]}"
    if len(candidates) == 1:
        return candidates[0], ""
    if not candidates:
        return None, "no deployment exists"
    return None, "several deployments exist: name one (--deployment)"


def preflight_run(
    *,
    actor: Any,
    deployment: Deployment | None = None,
    json_path: str | Path | None = None,
    names: Iterable[str] | None = None,
) -> PreflightRun:
    """Run the checks, write the JSON report, store the PreflightRun with its audit record.
    With the database down the run is returned unsaved (pk None); the report is written."""
    started = timezone.now()
    problem = ""
    if deployment is None:
        deployment, problem = _default_deployment()
    ctx = Context(deployment, started, problem)
    results = run_checks(ctx, names)
    ended = timezone.now()
    decision = decide(results)
    report = {
        "decision": decision,
        "deployment": deployment.name if deployment else None,
        "mode": ctx.mode,
        "started_at": started.isoformat(),
        "ended_at": ended.isoformat(),
        "duration_ms": round((ended - started).total_seconds() * 1000, 1),
        "checks": [r.as_dict() for r in results],
    }
    path = Path(json_path) if json_path else _default_path(started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    run = PreflightRun(
        started_at=started,
        ended_at=ended,
        decision=decision,
        checks=report["checks"],
        report_path=str(path)[:300],
        actor=_actor_name(actor)[:150],
    )
    _store(run, actor, report)
    return run


def _default_path(started: datetime) -> Path:
    name = f"preflight-{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}.json"
    return Path(settings.SAFETY_PREFLIGHT_DIR) / name


def _actor_name(actor: Any) -> str:
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()
    return str(actor or "system")


def _store(run: PreflightRun, actor: Any, report: dict[str, Any]) -> None:
    failed = [c["name"] for c in report["checks"] if c["status"] == FAIL]
    try:
        with transaction.atomic():
            run.save()
            audit_record(
                action="preflight.run",
                actor=actor,
                target=run,
                payload={
                    "decision": run.decision,
                    "deployment": report["deployment"],
                    "failed": failed,
                    "report": Path(run.report_path).name,
                },
            )
    except DatabaseError:
        run.pk = None
