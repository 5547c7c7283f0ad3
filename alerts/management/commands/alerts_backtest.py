"""Run the configured detectors and rules over a CSV, writing nothing.

    python manage.py alerts_backtest data/market/ETH_BTC-5m.csv --symbol ETH/BTC \
        --timeframe 5m [--format jsonl|table] [--rate-limit SECONDS] [--defaults]

Rules are read from the database when it is reachable (read only), otherwise the
defaults apply. Every detection is printed, suppressed ones included.
"""

from __future__ import annotations

import json
import math
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from alerts.backtest import BacktestRow, counts, run_backtest
from alerts.detectors import DetectorConfigError, load_csv
from alerts.rules import RuleSpec


def _stored_rules() -> tuple[list[RuleSpec], str]:
    try:
        from alerts.selectors import rule_specs

        return rule_specs(), "database"
    except DatabaseError:
        return [], "defaults (database unavailable)"


def _value(value: float | None) -> Any:
    if value is None or not math.isfinite(value):
        return None
    return value


class Command(BaseCommand):
    help = "Backtest the configured alert detectors and rules over a candle CSV."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file")
        parser.add_argument("--symbol", required=True)
        parser.add_argument("--timeframe", required=True)
        parser.add_argument("--format", choices=["jsonl", "table"], default="jsonl")
        parser.add_argument("--rate-limit", type=float, default=None, help="default seconds")
        parser.add_argument("--defaults", action="store_true", help="ignore stored rules")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            arrays = load_csv(opts["file"])
        except (OSError, ValueError) as err:
            raise CommandError(f"cannot read {opts['file']}: {err}") from None
        rules, origin = ([], "defaults") if opts["defaults"] else _stored_rules()
        limit = settings.ALERTS_RATE_LIMIT_S if opts["rate_limit"] is None else opts["rate_limit"]
        if limit < 0:
            raise CommandError("--rate-limit must be >= 0")
        try:
            rows = run_backtest(
                arrays,
                symbol=opts["symbol"],
                timeframe=opts["timeframe"],
                rules=rules,
                default_rate_limit_s=limit,
            )
        except (DetectorConfigError, ValueError) as err:
            raise CommandError(str(err)) from None
        if opts["format"] == "jsonl":
            self._jsonl(rows)
        else:
            self._table(rows, origin, len(arrays["close"]))

    def _jsonl(self, rows: list[BacktestRow]) -> None:
        for row in rows:
            data = row.as_dict()
            data["value"] = _value(row.value)
            self.stdout.write(json.dumps(data, separators=(",", ":")))

    def _table(self, rows: list[BacktestRow], origin: str, n: int) -> None:
        self.stdout.write(f"{n} candles, rules: {origin}")
        header = f"{'time':<26} {'detector':<13} {'dir':<5} {'value':>12} {'sev':<8} decision"
        self.stdout.write(header)
        for row in rows:
            value = "" if _value(row.value) is None else f"{row.value:.6g}"
            decision = f"suppressed: {row.reason}" if row.suppressed else "deliver"
            self.stdout.write(
                f"{row.as_dict()['time']:<26} {row.detector:<13} {row.direction:<5} "
                f"{value:>12} {row.severity:<8} {decision}"
            )
        self.stdout.write("")
        self.stdout.write(
            f"{'detector':<13} {'detections':>10} {'suppressed':>10} {'delivered':>10}"
        )
        for name, c in counts(rows).items():
            self.stdout.write(
                f"{name:<13} {c['detections']:>10} {c['suppressed']:>10} {c['delivered']:>10}"
            )
        self.stdout.write(f"{'total':<13} {len(rows):>10}")
