"""Pre-flight: GO when everything is in place, each check failing alone, never a traceback,
a timeout per check, the command's exit code and JSON report, live-mode settings."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from canary import preflight, safety_adapters
from canary.backup import backup_create
from canary.heartbeat import KEY_BEAT, mark
from canary.models import Backup, PreflightRun
from canary.preflight import FAIL, GO, NO_GO, PASS, WARN, preflight_run
from tests.safety.helpers import fresh_market, paper_exchange
from trading.exchange import InvalidOrder, TemporaryExchangeError
from trading.models import MarketStream

pytestmark = pytest.mark.django_db(transaction=True)
SYMBOLS = ("ETH/BTC", "LTC/BTC")
CHECKS = [
    "env",
    "exchange_rest",
    "exchange_websocket",
    "database",
    "signals",
    "order_test",
    "backup",
    "monitoring",
]


@pytest.fixture
def green(make_deployment, monkeypatch, settings, redis_url):
    """An environment in which every check passes."""
    settings.SAFETY_STREAM_WAIT_S = 0.2
    deployment = make_deployment(symbols=SYMBOLS, timeframe="5m")
    fresh_market(deployment)
    paper = paper_exchange(SYMBOLS)
    monkeypatch.setattr(safety_adapters, "exchange_for", lambda d: paper)
    monkeypatch.setattr(preflight, "ping_workers", lambda timeout_s: ["worker@test"])
    mark(KEY_BEAT)
    backup = backup_create(actor="test")
    Backup.objects.filter(pk=backup.pk).update(verified_at=timezone.now(), verified_ok=True)
    return deployment, paper


def _by_name(run: PreflightRun) -> dict[str, dict]:
    return {c["name"]: c for c in run.checks}


def test_go_when_every_check_passes(green, tmp_path):
    deployment, _ = green
    run = preflight_run(actor="test", deployment=deployment, json_path=tmp_path / "r.json")
    checks = _by_name(run)
    assert list(checks) == CHECKS
    assert {n: c["status"] for n, c in checks.items()} == dict.fromkeys(CHECKS, PASS), checks
    assert run.decision == GO and run.pk is not None
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["decision"] == GO and report["started_at"] and report["ended_at"]
    assert set(report["checks"][0]) == {"name", "status", "critical", "detail", "duration_ms"}


def _break_env(settings, **_):
    settings.DEFAULT_FROM_EMAIL = ""


def _break_rest(paper, monkeypatch, **_):
    def down():
        raise TemporaryExchangeError("connection refused")

    monkeypatch.setattr(paper, "fetch_time_ms", down)


def _break_stream(deployment, **_):
    MarketStream.objects.filter(symbol="LTC/BTC").update(
        last_received_at=timezone.now() - timedelta(minutes=5)
    )


def _break_database(monkeypatch, **_):
    class Pending:
        def __init__(self, connection):
            from django.db.migrations.executor import MigrationExecutor

            self.real = MigrationExecutor(connection)
            self.loader = self.real.loader

        def migration_plan(self, targets):
            return [(self.loader.get_migration("canary", "0001_initial"), False)]

    monkeypatch.setattr(preflight, "MigrationExecutor", Pending)


def _break_signals(deployment, **_):
    deployment.params = {"ema_fast": 30, "ema_slow": 10}
    deployment.save(update_fields=["params"])


def _break_order_test(paper, monkeypatch, **_):
    def refuse(request):
        raise InvalidOrder("Filter failure: NOTIONAL")

    monkeypatch.setattr(paper, "test_order", refuse)


def _break_backup(**_):
    Backup.objects.update(created_at=timezone.now() - timedelta(days=2))


def _break_monitoring(monkeypatch, **_):
    monkeypatch.setattr(preflight, "ping_workers", lambda timeout_s: [])


BREAKERS = {
    "env": (_break_env, "missing: DEFAULT_FROM_EMAIL"),
    "exchange_rest": (_break_rest, "connection refused"),
    "exchange_websocket": (_break_stream, "silent for"),
    "database": (_break_database, "not applied"),
    "signals": (_break_signals, "ema_slow"),
    "order_test": (_break_order_test, "NOTIONAL"),
    "backup": (_break_backup, "no backup younger than 24"),
    "monitoring": (_break_monitoring, "no Celery worker"),
}


@pytest.mark.parametrize("broken", CHECKS)
def test_each_check_failing_alone_gives_no_go(green, broken, monkeypatch, settings, tmp_path):
    deployment, paper = green
    breaker, reason = BREAKERS[broken]
    breaker(settings=settings, monkeypatch=monkeypatch, paper=paper, deployment=deployment)
    run = preflight_run(actor="test", deployment=deployment, json_path=tmp_path / "r.json")
    statuses = {n: c["status"] for n, c in _by_name(run).items()}
    assert statuses == {n: FAIL if n == broken else PASS for n in CHECKS}, run.checks
    assert reason in _by_name(run)[broken]["detail"]
    assert run.decision == NO_GO
    assert "Traceback" not in (tmp_path / "r.json").read_text()


def test_backup_check_restores_an_unverified_backup(green):
    deployment, _ = green
    Backup.objects.update(verified_at=None, verified_ok=None)
    run = preflight_run(actor="test", deployment=deployment, names=["backup"])
    check = _by_name(run)["backup"]
    assert check["status"] == PASS and "scratch database" in check["detail"], check
    assert Backup.objects.get().verified_ok is True


def test_withdrawal_permission_warns_and_stays_go(green, monkeypatch):
    deployment, paper = green
    monkeypatch.setattr(paper, "can_withdraw", lambda: True)
    run = preflight_run(actor="test", deployment=deployment, names=["exchange_rest"])
    assert _by_name(run)["exchange_rest"]["status"] == WARN
    assert run.decision == GO


def test_a_crashing_check_fails_with_its_reason(green, monkeypatch):
    deployment, paper = green

    def crash():
        raise RuntimeError("socket exploded")

    monkeypatch.setattr(paper, "load_markets", crash)
    run = preflight_run(actor="test", deployment=deployment, names=["exchange_rest", "order_test"])
    for check in run.checks:
        assert check["status"] == FAIL
        assert check["detail"] == "RuntimeError: socket exploded"


def test_a_hanging_check_times_out(green, monkeypatch, settings):
    deployment, paper = green
    settings.SAFETY_PREFLIGHT_TIMEOUT_S = 0.3
    monkeypatch.setattr(paper, "fetch_balance", lambda: time.sleep(3))
    run = preflight_run(actor="test", deployment=deployment, names=["exchange_rest", "env"])
    checks = _by_name(run)
    assert (checks["exchange_rest"]["status"], checks["exchange_rest"]["detail"]) == (
        FAIL,
        "timed out after 0.3 s",
    )
    assert checks["env"]["status"] == PASS


def test_live_mode_names_missing_secrets_without_printing_any(make_deployment, settings):
    settings.SECRET_KEY = "s3cr3t-value-never-printed"
    settings.TRADING_EXCHANGE_API_KEY = ""
    settings.TRADING_EXCHANGE_API_SECRET = "another-secret-value"
    deployment = make_deployment(exchange="binance")
    run = preflight_run(actor="test", deployment=deployment, names=["env"])
    detail = run.checks[0]["detail"]
    assert run.checks[0]["status"] == FAIL
    assert "TRADING_EXCHANGE_API_KEY" in detail
    assert "s3cr3t" not in detail and "another-secret" not in detail


def test_no_deployment_fails_with_the_reason():
    run = preflight_run(actor="test", names=["env", "exchange_rest", "signals"])
    assert all(c["status"] == FAIL for c in run.checks)
    assert "no deployment exists" in run.checks[1]["detail"]


def test_command_exit_codes_table_and_report(green, tmp_path, capsys, monkeypatch):
    deployment, _ = green
    out = tmp_path / "go.json"
    call_command("preflight", "--deployment", deployment.name, "--json", str(out))
    printed = capsys.readouterr().out
    assert "DECISION: GO" in printed and "exchange_websocket" in printed
    assert json.loads(out.read_text())["decision"] == GO
    assert PreflightRun.objects.filter(decision=GO).count() == 1

    monkeypatch.setattr(preflight, "ping_workers", lambda timeout_s: [])
    with pytest.raises(SystemExit) as exit_info:
        call_command("preflight", "--deployment", str(deployment.pk))
    assert exit_info.value.code == 1
    assert "DECISION: NO-GO" in capsys.readouterr().out
    saved = PreflightRun.objects.get(decision=NO_GO)
    assert saved.report_path.startswith(str(tmp_path))
