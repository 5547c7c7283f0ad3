"""`manage.py alerts_backtest`: every detection, suppressed ones included, in event time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from alerts.detectors import get_detector, load_csv, scan_all

from .helpers import MARKET

CSV = MARKET / "ETH_BTC-5m.csv"
ROOT = MARKET.parents[1]
KEYS = {"ts", "symbol", "timeframe", "detector", "direction", "value", "suppressed", "reason"}


def _run(*args: str) -> str:
    out = StringIO()
    call_command(
        "alerts_backtest", str(CSV), "--symbol", "ETH/BTC", "--timeframe", "5m", *args, stdout=out
    )
    return out.getvalue()


def _check_rate_limit(rows: list[dict], limit_s: float) -> None:
    """Replays the rule independently: per key, an alert passes iff the previous passed
    alert of the key is at least limit_s of event time earlier."""
    last: dict[tuple, int] = {}
    for row in rows:
        key = (row["symbol"], row["timeframe"], row["detector"], row["direction"])
        prev = last.get(key)
        should_suppress = prev is not None and row["ts"] - prev < limit_s * 1000
        assert row["suppressed"] == should_suppress, row
        if not should_suppress:
            last[key] = row["ts"]
            assert row["reason"] == "deliver"
        else:
            assert row["reason"].startswith("rate limit:")


@pytest.mark.parametrize("limit_s", [None, 3600.0])
def test_jsonl_lines_parse_and_match_scan_all(db, limit_s):
    args = ["--format", "jsonl"] + ([] if limit_s is None else ["--rate-limit", str(limit_s)])
    lines = _run(*args).splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows and all(set(row) >= KEYS for row in rows)
    expected = scan_all(load_csv(CSV), [get_detector("volatility"), get_detector("engulfing")])
    assert [(r["ts"], r["detector"], r["direction"]) for r in rows] == [
        (d.ts, d.detector, d.direction) for d in expected
    ]
    assert Counter(r["detector"] for r in rows) == Counter(d.detector for d in expected)
    for row, det in zip(rows, expected, strict=True):
        if det.detector == "volatility":
            assert row["value"] == pytest.approx(det.value)
        else:
            assert row["value"] is None
    _check_rate_limit(rows, 60.0 if limit_s is None else limit_s)
    suppressed = sum(r["suppressed"] for r in rows)
    assert (suppressed == 0) if limit_s is None else (0 < suppressed < len(rows))


def test_table_ends_with_counts_per_detector(db):
    text = _run("--format", "table", "--rate-limit", "3600")
    expected = Counter(
        d.detector
        for d in scan_all(load_csv(CSV), [get_detector("volatility"), get_detector("engulfing")])
    )
    tail = text.strip().splitlines()[-3:]
    counts = {line.split()[0]: int(line.split()[1]) for line in tail}
    assert counts == {
        "engulfing": expected["engulfing"],
        "volatility": expected["volatility"],
        "total": sum(expected.values()),
    }
    assert "suppressed: rate limit" in text


def test_stored_rules_are_read_and_nothing_is_written(db):
    from alerts.models import Alert, AlertRule
    from trading.models import Candle

    AlertRule.objects.create(detector="engulfing", enabled=False)
    AlertRule.objects.create(detector="gap", params={"percent": 0.5}, severity="critical")
    rows = [json.loads(line) for line in _run().splitlines()]
    by_detector = defaultdict(set)
    for row in rows:
        by_detector[row["detector"]].add(row["severity"])
    assert set(by_detector) <= {"gap", "volatility"} and "gap" in by_detector
    assert by_detector["gap"] == {"critical"}
    assert not Alert.objects.exists() and not Candle.objects.exists()
    default_rows = [json.loads(line) for line in _run("--defaults").splitlines()]
    assert {r["detector"] for r in default_rows} == {"engulfing", "volatility"}


def test_without_a_database_the_defaults_apply(stored_rule_free_port):
    """A real unreachable database (nothing listens on the port): defaults, no error."""
    env = dict(os.environ, DATABASE_URL=f"postgres://postgres@127.0.0.1:{stored_rule_free_port}/x")
    done = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "alerts_backtest",
            str(CSV),
            "--symbol",
            "ETH/BTC",
            "--timeframe",
            "5m",
            "--format",
            "table",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "rules: defaults (database unavailable)" in done.stdout
    assert done.stdout.strip().splitlines()[-1].split()[0] == "total"


@pytest.fixture
def stored_rule_free_port() -> int:
    from stack import free_port

    return free_port()


def test_bad_file_and_bad_options_are_errors(tmp_path):
    with pytest.raises(CommandError, match="cannot read"):
        call_command(
            "alerts_backtest", str(tmp_path / "missing.csv"), "--symbol", "X", "--timeframe", "5m"
        )
    with pytest.raises(CommandError, match="rate-limit"):
        _run("--rate-limit", "-1", "--defaults")
