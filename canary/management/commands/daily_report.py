"""python manage.py daily_report [--date YYYY-MM-DD] [--to ADDRESS ...] [--no-email]"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from canary.reports import ReportEmailFailed, daily_report_run


def parse_day(value: str | None, today: date) -> date:
    if value is None:
        return today - timedelta(days=1)
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--date must be YYYY-MM-DD, got {value!r}") from None
    if day > today:
        raise CommandError(f"--date {value} is in the future (today is {today} UTC)")
    return day


class Command(BaseCommand):
    help = (
        "Build the daily report of one UTC day (default: yesterday), keep it under "
        "VAR_DIR/reports/ for the desk and email it as HTML with an equity chart."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--date", help="the UTC day, YYYY-MM-DD (default: yesterday)")
        parser.add_argument(
            "--to",
            action="append",
            metavar="ADDRESS",
            help="recipient (repeatable); default DESK_REPORT_RECIPIENTS, else desk users",
        )
        parser.add_argument("--no-email", action="store_true", help="build and store only")

    def handle(self, *args: Any, **options: Any) -> None:
        day = parse_day(options["date"], timezone.now().date())
        try:
            outcome = daily_report_run(
                day=day, send=not options["no_email"], recipients=options["to"]
            )
        except ReportEmailFailed as err:
            raise CommandError(f"report for {day} stored but the email failed: {err}") from None
        report = outcome.report
        self.stdout.write(f"report for {day}: {report['headline']}")
        if not report["has_data"]:
            self.stdout.write(f"no data for {day}: the report says so")
        for ext, path in sorted(outcome.paths.items()):
            self.stdout.write(f"  {ext}: {path}")
        if outcome.emailed_to:
            self.stdout.write(f"emailed to {', '.join(outcome.emailed_to)}")
        elif not options["no_email"]:
            self.stdout.write("not emailed: no recipients (set DESK_REPORT_RECIPIENTS or --to)")
