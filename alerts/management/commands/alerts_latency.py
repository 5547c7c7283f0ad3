"""Candle-to-delivery latency per channel: ``python manage.py alerts_latency [--since ISO]
[--channel email]``. Spans: ingest/close/detection to sent, in ms (p50, p95, p99)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_datetime

from alerts.selectors import latency_stats


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


class Command(BaseCommand):
    help = "Print p50/p95/p99 alert delivery latency per channel."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", default="")
        parser.add_argument("--channel", default="")

    def handle(self, *args: Any, **opts: Any) -> None:
        since = parse_datetime(opts["since"]) if opts["since"] else None
        if opts["since"] and since is None:
            raise CommandError("--since must be an ISO date-time")
        stats = latency_stats(since=since, channel=opts["channel"] or None)
        if not stats:
            self.stdout.write("no sent deliveries")
            return
        self.stdout.write(
            f"{'channel':<10} {'span':<15} {'count':>7} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10}"
        )
        for channel, spans in stats.items():
            for span, s in spans.items():
                self.stdout.write(
                    f"{channel:<10} {span:<15} {s['count']:>7} {_ms(s['p50']):>10} "
                    f"{_ms(s['p95']):>10} {_ms(s['p99']):>10}"
                )
