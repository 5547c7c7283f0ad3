"""The daily report: what happened on one UTC day.

``report_build`` reads the day from the database (a fixed number of queries);
``daily_report_run`` renders it as HTML with an equity / drawdown PNG (drawn by
canary.pngchart, no heavy dependency), emails it and keeps it under
``VAR_DIR/reports/<day>.{json,html,png}`` so the desk can list and show past reports.
Uptime comes from a per-minute sample the worker writes to a Redis bitmap
(``uptime_mark``, scheduled by beat): a minute counts as up when the beat scheduled the
sample, the worker ran it and the database answered.
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from email.mime.image import MIMEImage
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import EmailMultiAlternatives
from django.db import connection, transaction
from django.db.models import Count, Min, Q
from django.template.loader import render_to_string
from django.utils import timezone

from alerts.models import Alert, Silence
from audit.services import audit_record
from trading.models import Candle, Deployment, EquitySnapshot, Fill, Order, OrderStatus
from trading.portfolio import Book, apply_trade
from trading.timeframes import timeframe_ms

from .heartbeat import redis_client
from .models import GateEvaluation, Rollback
from .pngchart import equity_chart

log = logging.getLogger(__name__)

ERROR_STATUSES = (OrderStatus.ERROR, OrderStatus.REJECTED, OrderStatus.UNKNOWN)
CHART_CID = "equity-chart"
CHART_POINTS = 400
NOTABLE_VERDICTS = 10
UPTIME_KEY = "desk:uptime:{day}"
UPTIME_TTL_S = 45 * 86400


# --------------------------------------------------------------------------- storage


def reports_dir() -> Path:
    return Path(settings.VAR_DIR) / "reports"


def report_path(day: date, ext: str) -> Path:
    return reports_dir() / f"{day.isoformat()}.{ext}"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def report_load(day: date) -> dict | None:
    path = report_path(day, "json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def report_list(limit: int = 10) -> list[dict]:
    """Stored reports, newest day first: day, headline, when generated and sent."""
    folder = reports_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("????-??-??.json"), reverse=True)[:limit]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        found.append(
            {
                "day": data.get("day", path.stem),
                "has_data": data.get("has_data", False),
                "headline": data.get("headline", {}),
                "generated_at": data.get("generated_at"),
                "emailed_at": data.get("emailed_at"),
                "emailed_to": data.get("emailed_to", []),
                "url": f"/desk/reports/{path.stem}/",
            }
        )
    return found


# --------------------------------------------------------------------------- uptime


def uptime_mark(now: datetime | None = None) -> None:
    """Mark this minute as up (called by the worker each minute, when the database
    answers)."""
    now = (now or timezone.now()).astimezone(UTC)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    key = UPTIME_KEY.format(day=now.date().isoformat())
    pipe = redis_client().pipeline()
    pipe.setbit(key, now.hour * 60 + now.minute, 1)
    pipe.expire(key, UPTIME_TTL_S)
    pipe.execute()


def uptime_for(day: date, now: datetime) -> dict:
    """Minutes marked up out of the minutes of the day that have passed."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    elapsed = int(min(1440, max(0, (now - start).total_seconds() // 60)))
    try:
        up = int(redis_client().bitcount(UPTIME_KEY.format(day=day.isoformat())))
    except redis.RedisError as err:
        return {"recorded": False, "note": f"Redis unreachable ({type(err).__name__})"}
    if up == 0:
        return {
            "recorded": False,
            "minutes": elapsed,
            "note": "no uptime samples: beat and worker were not running the desk sampler",
        }
    up = min(up, elapsed or up)
    return {
        "recorded": True,
        "up_minutes": up,
        "minutes": elapsed,
        "pct": round(100.0 * up / elapsed, 2) if elapsed else None,
    }


# --------------------------------------------------------------------------- trading figures


@dataclass
class _Trades:
    realised: float = 0.0
    fees: float = 0.0
    per_order: dict[int, float] = field(default_factory=lambda: defaultdict(float))


def _fills_until(end: datetime) -> list[tuple]:
    """(ts, order_id, deployment_id, symbol, side, qty, price, fee) up to ``end``; an
    order without Fill rows counts as one fill of its filled quantity."""
    fills = list(
        Fill.objects.filter(ts__lt=end).values_list(
            "ts",
            "order_id",
            "order__deployment_id",
            "order__symbol",
            "order__side",
            "qty",
            "price",
            "fee",
        )
    )
    bare = Order.objects.filter(
        filled_qty__gt=0, avg_fill_price__isnull=False, created_at__lt=end, fills__isnull=True
    ).values_list(
        "created_at",
        "acked_at",
        "pk",
        "deployment_id",
        "symbol",
        "side",
        "filled_qty",
        "avg_fill_price",
        "fee",
    )
    fills += [(acked or created, *rest) for created, acked, *rest in bare]
    fills.sort(key=lambda f: (f[0], f[1]))
    return fills


def trade_stats(start: datetime, end: datetime) -> dict:
    """Realised P&L (after fees) of the day and the win rate of the orders that reduced a
    position on that day (positions carried in from earlier days are replayed). The books
    are kept as the positions keep them (``trading.portfolio.apply_trade``): an entry's fee
    is part of its cost and is realised with the exit, so that a round trip that made money
    on price but lost it to fees is a loss, on the day it was closed."""
    books: dict[tuple[int, str], Book] = defaultdict(lambda: Book(0.0, 0.0, 0.0))
    day = _Trades()
    for ts, order_id, dep, symbol, side, qty, price, fee in _fills_until(end):
        signed = qty if side.lower() == "buy" else -qty
        before = books[(dep, symbol)]
        after = books[(dep, symbol)] = apply_trade(before, signed, price, fee or 0.0)
        if ts < start:
            continue
        day.fees += fee or 0.0
        if before.qty != 0 and (before.qty > 0) != (signed > 0):  # reduced the position
            pnl = after.realised - before.realised
            day.realised += pnl
            day.per_order[order_id] += pnl
    closing = list(day.per_order.values())
    wins = sum(1 for pnl in closing if pnl > 0)
    return {
        "realised_pnl": round(day.realised, 10),
        "fees": round(day.fees, 10),
        "closing_orders": len(closing),
        "wins": wins,
        "win_rate": round(wins / len(closing), 4) if closing else None,
    }


def order_stats(start: datetime, end: datetime) -> dict:
    qs = Order.objects.filter(created_at__gte=start, created_at__lt=end)
    counts = qs.aggregate(
        orders=Count("id"),
        filled=Count("id", filter=Q(status=OrderStatus.FILLED)),
        errors=Count("id", filter=Q(status__in=ERROR_STATUSES)),
        critical=Count("id", filter=Q(critical=True)),
    )
    top = (
        qs.filter(status__in=ERROR_STATUSES)
        .values("error")
        .annotate(n=Count("id"))
        .order_by("-n", "error")[:5]
    )
    counts["error_rate"] = (
        round(counts["errors"] / counts["orders"], 4) if counts["orders"] else None
    )
    counts["top_errors"] = [{"error": r["error"] or "(no message)", "count": r["n"]} for r in top]
    return counts


def _equity_deployment(start: datetime, end: datetime) -> Deployment | None:
    row = (
        EquitySnapshot.objects.filter(ts__gte=start, ts__lt=end)
        .values("deployment")
        .annotate(n=Count("id"))
        .order_by("-n", "deployment")
        .first()
    )
    return Deployment.objects.filter(pk=row["deployment"]).first() if row else None


def _thin(rows: list[tuple], points: int) -> list[tuple]:
    if len(rows) <= points:
        return rows
    step = len(rows) / points
    picked = [rows[int(i * step)] for i in range(points)] + [rows[-1]]
    worst = min(rows, key=lambda r: r[2])
    return sorted(set(picked) | {worst}, key=lambda r: r[0])


def equity_stats(start: datetime, end: datetime) -> dict:
    deployment = _equity_deployment(start, end)
    if deployment is None:
        return {"deployment": None, "points": 0, "series": {"t": [], "equity": [], "drawdown": []}}
    rows = list(
        EquitySnapshot.objects.filter(deployment=deployment, ts__gte=start, ts__lt=end)
        .order_by("ts")
        .values_list("ts", "equity", "drawdown_pct")
    )
    first, last = rows[0][1], rows[-1][1]
    thin = _thin(rows, CHART_POINTS)
    return {
        "deployment": deployment.name,
        "quote": deployment.quote_currency,
        "points": len(rows),
        "start": first,
        "end": last,
        "change": last - first,
        "change_pct": round((last / first - 1) * 100, 4) if first else None,
        "high": max(r[1] for r in rows),
        "low": min(r[1] for r in rows),
        "worst_drawdown_pct": min(r[2] for r in rows),
        "series": {
            "t": [r[0].timestamp() for r in thin],
            "equity": [r[1] for r in thin],
            "drawdown": [r[2] for r in thin],
        },
    }


def _reason_texts(reasons: Any) -> list[str]:
    items = reasons if isinstance(reasons, list) else []
    return [str(r.get("message", r)) if isinstance(r, dict) else str(r) for r in items]


def verdict_stats(start: datetime, end: datetime) -> dict:
    qs = GateEvaluation.objects.filter(evaluated_at__gte=start, evaluated_at__lt=end)
    counts = {r["verdict"]: r["n"] for r in qs.values("verdict").annotate(n=Count("id"))}
    notable = (
        qs.exclude(verdict="PASS").select_related("phase", "rollout").order_by("-evaluated_at")
    )[:NOTABLE_VERDICTS]
    return {
        "total": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "notable": [
            {
                "at": e.evaluated_at.isoformat(),
                "rollout": e.rollout.name,
                "phase": e.phase.index if e.phase else None,
                "verdict": e.verdict,
                "action": e.action,
                "reasons": _reason_texts(e.reasons),
            }
            for e in notable
        ],
    }


def rollback_rows(start: datetime, end: datetime) -> list[dict]:
    rows = Rollback.objects.filter(started_at__gte=start, started_at__lt=end).select_related(
        "deployment"
    )
    return [
        {
            "id": r.pk,
            "deployment": r.deployment.name,
            "started_at": r.started_at.isoformat(),
            "trigger": r.trigger,
            "cause": r.cause,
            "requested_by": r.requested_by,
            "state": r.state,
            "stage1_s": (r.stage1_ended_at - r.started_at).total_seconds()
            if r.stage1_ended_at
            else None,
        }
        for r in rows.order_by("started_at")
    ]


def alert_stats(start: datetime, end: datetime) -> dict:
    """By event time (the candle's open time), so a rehearsal replay counts on its day."""
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    qs = Alert.objects.filter(event_ms__gte=start_ms, event_ms__lt=end_ms)
    by_detector = list(
        qs.values("detector")
        .annotate(
            total=Count("id"),
            delivered=Count("id", filter=Q(suppressed=False)),
            acknowledged=Count("id", filter=Q(acknowledged_at__isnull=False)),
            silenced=Count("id", filter=Q(decision="silenced")),
            rate_limited=Count("id", filter=Q(decision="rate_limited")),
        )
        .order_by("-total", "detector")
    )
    totals = {
        k: sum(r[k] for r in by_detector)
        for k in ("total", "delivered", "acknowledged", "silenced", "rate_limited")
    }
    silences = Silence.objects.filter(created_at__gte=start, created_at__lt=end).count()
    return {**totals, "silences_created": silences, "by_detector": by_detector}


def market_stats(start: datetime, end: datetime) -> list[dict]:
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    rows = (
        Candle.objects.filter(open_time_ms__gte=start_ms, open_time_ms__lt=end_ms)
        .values("exchange", "symbol", "timeframe")
        .annotate(n=Count("id"), first=Min("open_time_ms"))
        .order_by("exchange", "symbol", "timeframe")
    )
    found = []
    for r in rows:
        try:
            expected = (end_ms - start_ms) // timeframe_ms(r["timeframe"])
        except ValueError:
            expected = 0
        found.append(
            {
                "stream": f"{r['exchange']}:{r['symbol']}:{r['timeframe']}",
                "candles": r["n"],
                "expected": expected,
                "coverage_pct": round(100.0 * r["n"] / expected, 1) if expected else None,
            }
        )
    return found


# --------------------------------------------------------------------------- the report


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _has_data(report: dict) -> bool:
    return bool(
        report["orders"]["orders"]
        or report["equity"]["points"]
        or report["verdicts"]["total"]
        or report["rollbacks"]
        or report["alerts"]["total"]
        or report["market"]
    )


def _headline(report: dict) -> dict:
    return {
        "orders": report["orders"]["orders"],
        "errors": report["orders"]["errors"],
        "realised_pnl": report["trades"]["realised_pnl"],
        "win_rate": report["trades"]["win_rate"],
        "worst_drawdown_pct": report["equity"].get("worst_drawdown_pct"),
        "verdicts": report["verdicts"]["counts"],
        "rollbacks": len(report["rollbacks"]),
        "alerts": report["alerts"]["total"],
        "uptime_pct": report["uptime"].get("pct"),
    }


def report_build(*, day: date, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    start, end = day_bounds(day)
    report: dict[str, Any] = {
        "day": day.isoformat(),
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "generated_at": now.isoformat(),
        "partial": now < end,
        "orders": order_stats(start, end),
        "trades": trade_stats(start, end),
        "equity": equity_stats(start, end),
        "verdicts": verdict_stats(start, end),
        "rollbacks": rollback_rows(start, end),
        "alerts": alert_stats(start, end),
        "market": market_stats(start, end),
        "uptime": uptime_for(day, now),
    }
    report["has_data"] = _has_data(report)
    report["headline"] = _headline(report)
    return report


def report_chart(report: dict) -> bytes:
    series = report["equity"]["series"]
    return equity_chart(
        series["t"], series["equity"], series["drawdown"], quote=report["equity"].get("quote", "")
    )


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} %"


def _money(value: float | None, quote: str) -> str:
    return "-" if value is None else f"{value:+.8g} {quote}".strip()


def _uptime_text(uptime: dict) -> str:
    if not uptime.get("recorded"):
        return f"not recorded ({uptime.get('note', 'no samples')})"
    return f"{uptime['pct']:.2f} % ({uptime['up_minutes']} of {uptime['minutes']} minutes up)"


def report_display(report: dict) -> dict[str, str]:
    """The figures as the email and the desk word them."""
    trades, orders, equity = report["trades"], report["orders"], report["equity"]
    quote = equity.get("quote") or ""
    win = trades["win_rate"]
    return {
        "win_rate": (
            f"{win * 100:.1f} % ({trades['wins']} of {trades['closing_orders']} closing orders)"
            if win is not None
            else "no position was reduced or closed"
        ),
        "realised_pnl": _money(trades["realised_pnl"], quote),
        "fees": f"{trades['fees']:.8g} {quote}".strip(),
        "generated": report["generated_at"][:19].replace("T", " "),
        "worst_drawdown": _pct(equity.get("worst_drawdown_pct"))
        if equity["points"]
        else "no equity snapshots",
        "equity": (
            f"{equity['start']:.8g} -> {equity['end']:.8g} {quote} "
            f"({_pct(equity['change_pct'], 3)})"
            if equity["points"]
            else "no equity snapshots"
        ),
        "error_rate": _pct(
            orders["error_rate"] * 100 if orders["error_rate"] is not None else None
        ),
        "uptime": _uptime_text(report["uptime"]),
    }


def report_render(report: dict, *, chart_src: str) -> tuple[str, str]:
    """(HTML, plain text). ``chart_src`` is ``cid:...`` in the email, a URL on the desk."""
    context = {
        "r": report,
        "d": report_display(report),
        "chart_src": chart_src,
        "desk_url": settings.DESK_URL,
    }
    return (
        render_to_string("reports/daily_report.html", context),
        render_to_string("reports/daily_report.txt", context),
    )


def report_recipients() -> list[str]:
    """DESK_REPORT_RECIPIENTS, else every active user with an email who may view the desk."""
    if settings.DESK_REPORT_RECIPIENTS:
        return list(settings.DESK_REPORT_RECIPIENTS)
    perm = {"content_type__app_label": "audit", "codename": "view_desk"}
    allowed = (
        Q(is_superuser=True)
        | Q(**{f"groups__permissions__{k}": v for k, v in perm.items()})
        | Q(**{f"user_permissions__{k}": v for k, v in perm.items()})
    )
    users = User.objects.filter(allowed, is_active=True).exclude(email="").distinct()
    return sorted({u.email for u in users})


def _subject(report: dict) -> str:
    h = report["headline"]
    if not report["has_data"]:
        return f"Desk daily report {report['day']}: no data"
    pnl = h["realised_pnl"]
    return (
        f"Desk daily report {report['day']}: {h['orders']} orders, {h['errors']} errors, "
        f"realised P&L {pnl:+.6g}, {h['rollbacks']} rollbacks"
    )


def report_email(report: dict, png: bytes, recipients: list[str]) -> EmailMultiAlternatives:
    html, text = report_render(report, chart_src=f"cid:{CHART_CID}")
    msg = EmailMultiAlternatives(
        subject=_subject(report), body=text, from_email=settings.DEFAULT_FROM_EMAIL, to=recipients
    )
    msg.attach_alternative(html, "text/html")
    msg.mixed_subtype = "related"
    image = MIMEImage(png, "png")
    image.add_header("Content-ID", f"<{CHART_CID}>")
    image.add_header("Content-Disposition", "inline", filename=f"equity-{report['day']}.png")
    msg.attach(image)
    return msg


class ReportEmailFailed(Exception):
    pass


@dataclass
class ReportOutcome:
    report: dict
    paths: dict[str, Path]
    emailed_to: list[str]
    skipped: bool = False


def _store(report: dict, png: bytes) -> dict[str, Path]:
    html, _ = report_render(report, chart_src="chart.png")
    paths = {ext: report_path(date.fromisoformat(report["day"]), ext) for ext in ("png", "html")}
    _write(paths["png"], png)
    _write(paths["html"], html.encode())
    paths["json"] = _save_json(report)
    return paths


def _save_json(report: dict) -> Path:
    path = report_path(date.fromisoformat(report["day"]), "json")
    _write(path, json.dumps(report, indent=1, default=str).encode())
    return path


def _send(report: dict, png: bytes, recipients: list[str]) -> None:
    try:
        report_email(report, png, recipients).send(fail_silently=False)
    except (smtplib.SMTPException, OSError) as err:
        report["email_error"] = f"{type(err).__name__}: {err}"[:300]
        _save_json(report)
        with transaction.atomic():
            audit_record(
                action="report.email_failed",
                actor="daily_report",
                target_type="report",
                target_id=report["day"],
                payload={"recipients": recipients, "error": report["email_error"]},
            )
        raise ReportEmailFailed(report["email_error"]) from err
    report["emailed_at"] = timezone.now().isoformat()
    report["emailed_to"] = recipients
    _save_json(report)


def daily_report_run(
    *,
    day: date,
    actor: str = "daily_report",
    send: bool = True,
    recipients: list[str] | None = None,
    skip_if_sent: bool = False,
    now: datetime | None = None,
) -> ReportOutcome:
    """Build, store and (unless ``send`` is False) email the report of ``day``.

    ``skip_if_sent`` makes a retried beat task a no-op once the day's email has gone."""
    previous = report_load(day)
    if skip_if_sent and previous and previous.get("emailed_at"):
        return ReportOutcome(previous, {}, previous.get("emailed_to", []), skipped=True)
    report = report_build(day=day, now=now)
    png = report_chart(report)
    paths = _store(report, png)
    to = recipients if recipients is not None else report_recipients()
    with transaction.atomic():
        audit_record(
            action="report.daily",
            actor=actor,
            target_type="report",
            target_id=report["day"],
            payload={"has_data": report["has_data"], "recipients": to if send else []},
        )
    if send and to:
        _send(report, png, to)
    elif send:
        log.warning("daily report %s: no recipients; stored only", report["day"])
    return ReportOutcome(report, paths, to if send else [])
