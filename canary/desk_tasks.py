"""Celery tasks of the desk: the daily report (beat, at DESK_REPORT_HOUR UTC) and the
per-minute uptime sample that the report's uptime figure counts. Thin: each calls a
service in canary.reports. Registered through CELERY_IMPORTS (config/settings.py, Desk)."""

from __future__ import annotations

from datetime import date, timedelta

from celery import shared_task
from django.utils import timezone

from . import reports


@shared_task(
    name="canary.desk_daily_report",
    ignore_result=True,
    acks_late=True,
    time_limit=300,
    soft_time_limit=240,
)
def daily_report(day: str | None = None) -> None:
    """The report of ``day`` (ISO date), by default yesterday (UTC). A retry after the
    email went out sends nothing twice."""
    target = date.fromisoformat(day) if day else timezone.now().date() - timedelta(days=1)
    reports.daily_report_run(day=target, actor="beat", skip_if_sent=True)


@shared_task(
    name="canary.desk_uptime_sample", ignore_result=True, time_limit=20, soft_time_limit=15
)
def uptime_sample() -> None:
    reports.uptime_mark()
