"""The daily report: figures, the PNG chart, storage, the command, the beat task and a
real email received by a local SMTP server."""

from __future__ import annotations

import email
import json
import re
import socket
import struct
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from email.message import Message

import pytest
from django.core import mail
from django.core.management import CommandError, call_command

from tests.desk.conftest import ARTIFACTS
from tests.desk.factories import (
    REHEARSAL_DAY,
    make_deployment,
    rehearsal_candles,
    seed_rehearsal_day,
)

pytestmark = pytest.mark.django_db


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == b"\x08\x02"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


# --------------------------------------------------------------------------- PNG


def test_png_encoder_writes_the_pixels_it_is_given():
    from canary.pngchart import Canvas, encode_png

    canvas = Canvas(3, 2, background=(0, 0, 0))
    canvas.set(1, 0, (255, 0, 0))
    canvas.set(2, 1, (0, 0, 255))
    width, height, raw = png_info(canvas.png())
    assert (width, height) == (3, 2)
    assert raw == b"\x00" + bytes([0, 0, 0, 255, 0, 0, 0, 0, 0]) + b"\x00" + bytes(
        [0, 0, 0, 0, 0, 0, 0, 0, 255]
    )
    with pytest.raises(ValueError):
        encode_png(2, 2, b"\x00" * 11)


def test_equity_chart_draws_both_series():
    from canary.pngchart import BLUE, RED, equity_chart

    t = [1_700_000_000 + 300 * i for i in range(100)]
    equity = [1 + 0.01 * (i % 20) for i in range(100)]
    peak = [max(equity[: i + 1]) for i in range(100)]
    drawdown = [(e / p - 1) * 100 for e, p in zip(equity, peak, strict=True)]
    width, height, raw = png_info(equity_chart(t, equity, drawdown, quote="BTC"))
    assert (width, height) == (720, 360)
    assert bytes(BLUE) in raw and bytes(RED) in raw
    empty = png_info(equity_chart([], [], []))
    assert bytes(BLUE) in empty[2]  # the title, over an empty frame


# --------------------------------------------------------------------------- figures


def _fill(deployment, ts, side, qty, price, fee=0.0):
    from trading.models import Fill, Order

    order = Order.objects.create(
        deployment=deployment,
        client_order_id=uuid.uuid4().hex,
        symbol="ETH/BTC",
        side=side,
        requested_qty=qty,
        filled_qty=qty,
        avg_fill_price=price,
        fee=fee,
        status="FILLED",
        created_at=ts,
    )
    Fill.objects.create(order=order, qty=qty, price=price, fee=fee, ts=ts)
    return order


def test_win_rate_and_realised_pnl_by_average_cost():
    from canary.reports import day_bounds, trade_stats

    dep = make_deployment()
    start, end = day_bounds(date(2024, 3, 2))
    _fill(dep, start - timedelta(hours=2), "buy", 2.0, 100.0)  # carried in from the day before
    _fill(dep, start + timedelta(hours=1), "buy", 2.0, 110.0)  # avg 105 on 4
    _fill(dep, start + timedelta(hours=2), "sell", 1.0, 115.0, fee=0.5)  # +10 - 0.5: win
    _fill(dep, start + timedelta(hours=3), "sell", 1.0, 104.0, fee=0.5)  # -1 - 0.5: loss
    _fill(dep, start + timedelta(hours=4), "sell", 3.0, 111.0)  # +12 and short 1 @ 111: win
    _fill(dep, end + timedelta(hours=1), "buy", 1.0, 50.0)  # the next day: ignored
    stats = trade_stats(start, end)
    assert stats == {
        "realised_pnl": pytest.approx(10 - 1 + 12 - 1.0),
        "fees": 1.0,
        "closing_orders": 3,
        "wins": 2,
        "win_rate": pytest.approx(2 / 3, abs=1e-4),
    }


def test_entry_fees_are_part_of_the_cost_and_realised_with_the_exit():
    """As the position keeps it: a round trip that made money on price but lost it to the
    two fees is a loss, and an entry's fee counts on the day its position is closed."""
    from canary.reports import day_bounds, trade_stats
    from trading.portfolio import Book, apply_trade

    dep = make_deployment()
    start, end = day_bounds(date(2024, 3, 2))
    _fill(dep, start - timedelta(minutes=1), "buy", 1.0, 100.0, fee=0.1)  # the day before
    _fill(dep, start + timedelta(hours=1), "sell", 1.0, 100.15, fee=0.10015)
    day = trade_stats(start, end)
    assert day["realised_pnl"] == pytest.approx(0.15 - 0.1 - 0.10015)
    assert (day["closing_orders"], day["wins"], day["win_rate"]) == (1, 0, 0.0)
    assert day["fees"] == pytest.approx(0.10015)
    before = trade_stats(start - timedelta(days=1), start)
    assert before["realised_pnl"] == 0 and before["closing_orders"] == 0
    book = apply_trade(apply_trade(Book(0.0, 0.0, 0.0), 1.0, 100.0, 0.1), -1.0, 100.15, 0.10015)
    assert day["realised_pnl"] == pytest.approx(book.realised)  # the desk's figure


def test_alerts_by_detector_with_acknowledged_and_silenced(desk_users):
    from alerts.models import Alert
    from canary.reports import alert_stats, day_bounds

    start, end = day_bounds(date(2024, 3, 2))
    base = int(start.timestamp() * 1000)
    rows = [
        ("volatility", "deliver", True),
        ("volatility", "deliver", False),
        ("volatility", "silenced", False),
        ("engulfing", "rate_limited", False),
    ]
    for i, (detector, decision, acked) in enumerate(rows):
        Alert.objects.create(
            detector=detector,
            dedupe_key=uuid.uuid4().hex,
            event_ms=base + i * 60_000,
            detected_at=start,
            decision=decision,
            suppressed=decision != "deliver",
            acknowledged_at=start if acked else None,
            acknowledged_by=desk_users["Ops"] if acked else None,
        )
    Alert.objects.create(
        detector="gap", dedupe_key="other-day", event_ms=base - 1, detected_at=start
    )
    stats = alert_stats(start, end)
    assert (stats["total"], stats["acknowledged"], stats["silenced"]) == (4, 1, 1)
    assert stats["by_detector"][0] == {
        "detector": "volatility",
        "total": 3,
        "delivered": 2,
        "acknowledged": 1,
        "silenced": 1,
        "rate_limited": 0,
    }


def test_a_day_without_data_says_so(reports_in_tmp):
    from canary.reports import daily_report_run, report_list

    outcome = daily_report_run(day=date(2024, 3, 2), send=False)
    report = outcome.report
    assert report["has_data"] is False
    html = outcome.paths["html"].read_text()
    assert "No data for 2024-03-02." in html
    assert "no equity snapshots" in html
    assert png_info(outcome.paths["png"].read_bytes())[:2] == (720, 360)
    assert report_list()[0]["day"] == "2024-03-02" and report_list()[0]["has_data"] is False


def test_uptime_counts_marked_minutes(redis_url):
    from canary.heartbeat import redis_client
    from canary.reports import UPTIME_KEY, uptime_for, uptime_mark

    day = date(2024, 3, 3)
    redis_client.cache_clear()
    redis_client().delete(UPTIME_KEY.format(day=day))
    start = datetime(2024, 3, 3, tzinfo=UTC)
    for minute in (0, 1, 2, 5):
        uptime_mark(start + timedelta(minutes=minute, seconds=30))
    uptime_mark(start + timedelta(minutes=5, seconds=50))  # same minute again
    assert uptime_for(day, start + timedelta(minutes=10)) == {
        "recorded": True,
        "up_minutes": 4,
        "minutes": 10,
        "pct": 40.0,
    }
    redis_client().delete(UPTIME_KEY.format(day=day))
    assert uptime_for(day, start + timedelta(days=2))["recorded"] is False


# --------------------------------------------------------------------------- command, task


def test_command_rejects_bad_dates():
    with pytest.raises(CommandError, match="YYYY-MM-DD"):
        call_command("daily_report", "--date", "16/01/2018", "--no-email")
    with pytest.raises(CommandError, match="in the future"):
        call_command("daily_report", "--date", "2999-01-01", "--no-email")


def test_command_defaults_to_yesterday(reports_in_tmp, capsys):
    from django.utils import timezone

    call_command("daily_report", "--no-email")
    yesterday = timezone.now().date() - timedelta(days=1)
    assert f"report for {yesterday}" in capsys.readouterr().out
    assert (reports_in_tmp / "reports" / f"{yesterday}.json").exists()


def test_beat_task_sends_once(settings, desk_users, reports_in_tmp):
    from canary import desk_tasks

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    desk_tasks.daily_report.delay("2024-03-02")
    desk_tasks.daily_report.delay("2024-03-02")  # a retry after the email went out
    assert len(mail.outbox) == 1
    assert sorted(mail.outbox[0].to) == sorted(
        f"{u.username}@example.test" for u in desk_users.values()
    )
    stored = json.loads((reports_in_tmp / "reports" / "2024-03-02.json").read_text())
    assert stored["emailed_to"] == mail.outbox[0].to


def test_beat_schedule_and_task_registration(settings):
    from celery.schedules import crontab

    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["desk-daily-report"]
    assert entry["task"] == "canary.desk_daily_report"
    assert entry["schedule"] == crontab(
        hour=settings.DESK_REPORT_HOUR, minute=settings.DESK_REPORT_MINUTE
    )
    app.loader.import_default_modules()
    assert {"canary.desk_daily_report", "canary.desk_uptime_sample"} <= set(app.tasks)


# --------------------------------------------------------------------------- a real email


class Sink:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd hook
        self.messages.append((list(envelope.rcpt_tos), email.message_from_bytes(envelope.content)))
        return "250 OK"


@contextmanager
def smtp_server() -> Iterator[tuple[Sink, int]]:
    from aiosmtpd.controller import Controller

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


@pytest.fixture
def rehearsal_day(django_capture_on_commit_callbacks, desk_users, settings):
    """The 16 January 2018 sell-off, replayed: real candles through the real ingestion and
    detectors (an engulfing silence in force), trades, equity, verdicts and a rollback on
    the candle clock."""
    from alerts.services import alert_acknowledge, silence_create
    from trading.services import candles_ingest

    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    deployment = make_deployment(name="rehearsal-ethbtc")
    silence_create(
        actor=desk_users["Ops"],
        detector="engulfing",
        reason="rehearsal: engulfing too chatty",
        duration_s=3600,
    )
    candles = rehearsal_candles()
    with django_capture_on_commit_callbacks(execute=True):
        candles_ingest(items=candles, actor="rehearsal")
    from alerts.models import Alert

    for alert in Alert.objects.filter(suppressed=False).order_by("event_ms")[:3]:
        alert_acknowledge(alert_id=alert.pk, actor=desk_users["Ops"])
    seed_rehearsal_day(deployment, candles)
    mail.outbox.clear()
    return deployment


def test_rehearsal_day_report_arrives_by_smtp(rehearsal_day, settings, reports_in_tmp):
    from alerts.models import Alert

    artifacts = ARTIFACTS / "reports"
    with smtp_server() as (sink, port):
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
        settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
        settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
        call_command(
            "daily_report", "--date", REHEARSAL_DAY.isoformat(), "--to", "finance@example.test"
        )
    (rcpts, msg), *more = sink.messages
    assert not more and rcpts == ["finance@example.test"]
    assert msg["Subject"].startswith("Desk daily report 2018-01-16: ")
    assert msg.get_content_type() == "multipart/related"
    parts = {p.get_content_type(): p for p in msg.walk()}
    html = parts["text/html"].get_payload(decode=True).decode()
    text = parts["text/plain"].get_payload(decode=True).decode()
    image = parts["image/png"]
    assert image["Content-ID"] == "<equity-chart>" and 'src="cid:equity-chart"' in html
    width, height, _ = png_info(image.get_payload(decode=True))
    assert (width, height) == (720, 360)

    report = json.loads((reports_in_tmp / "reports" / "2018-01-16.json").read_text())
    assert report["has_data"] and report["emailed_to"] == ["finance@example.test"]
    trades, orders = report["trades"], report["orders"]
    assert trades["closing_orders"] == 12 and 0 <= trades["wins"] <= 12
    assert orders["orders"] == 26 and orders["errors"] == 2
    assert orders["top_errors"] == [{"error": "insufficient balance", "count": 2}]
    assert report["verdicts"]["counts"]["FAIL"] == 1
    assert report["rollbacks"][0]["trigger"] == "gate"
    assert report["rollbacks"][0]["stage1_s"] == pytest.approx(11.4)
    alerts = report["alerts"]
    assert alerts["total"] == Alert.objects.count() > 0
    assert alerts["acknowledged"] == 3
    assert alerts["silenced"] == Alert.objects.filter(decision="silenced").count() > 0
    assert report["market"] == [
        {"stream": "binance:ETH/BTC:5m", "candles": 288, "expected": 288, "coverage_pct": 100.0}
    ]
    assert report["equity"]["worst_drawdown_pct"] < 0

    win_rate = f"{trades['win_rate'] * 100:.1f} % ({trades['wins']} of 12 closing orders)"
    for body in (html, text):
        assert win_rate in body
        assert re.search(r"\b26(</strong>)? placed", body)
    assert "Alerts by detector" in html and "volatility" in html
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "daily_report.eml").write_bytes(msg.as_bytes())
    (artifacts / "daily_report.html").write_text(html.replace("cid:equity-chart", "chart.png"))
    (artifacts / "chart.png").write_bytes(image.get_payload(decode=True))
