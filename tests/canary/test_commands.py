"""``manage.py canary``: status, actions as a named person, export, evaluate."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from audit.models import AuditEvent
from canary import services
from canary.models import Rollout, RolloutState

from .factories import (
    T0,
    approve_both,
    at,
    fast_passwords,  # noqa: F401
    go_preflight,
    healthy_orders,
    make_deployment,
    new_rollout,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]
ROOT = Path(__file__).resolve().parents[2]

GOOD = {
    "orders": 40,
    "latency_p95_ms": 210.5,
    "fill_rate": 0.98,
    "slippage_bps": 4.2,
    "confluence_avg": 3.5,
    "drawdown_pct": -0.4,
    "error_rate": 0.002,
    "critical_errors": 0,
    "stream_gap_s": 2.0,
    "db_ok": True,
}


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command("canary", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def rollout(make_user):
    rollout = new_rollout(make_deployment())
    approve_both(rollout, make_user("alice", "Alpha"), make_user("paul", "Planner"))
    make_user("olga", "Ops")
    make_user("vic", "Viewer")
    return rollout


def test_start_promote_pause_resume_rollback_as_a_person(rollout):
    from django.utils import timezone

    go_preflight(timezone.now())
    out, _ = run("start", str(rollout.pk), "--user", "olga")
    assert "RUNNING, phase 1" in out
    run("promote", "--user", "olga", "--reason", "clean phase")  # the one open rollout
    run("pause", "canary v1", "--user", "olga", "--reason", "news")
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.PAUSED
    run("resume", "canary v1", "--user", "olga", "--reason", "done")
    out, _ = run("rollback", str(rollout.pk), "--user", "olga", "--reason", "desk call")
    assert out.startswith("rollback ")
    rollout.refresh_from_db()
    assert (rollout.state, rollout.current_phase) == (RolloutState.ROLLING_BACK, 2)
    actors = set(
        AuditEvent.objects.filter(action__startswith="rollout.", target_id=str(rollout.pk))
        .exclude(action="rollout.create")
        .values_list("actor", flat=True)
    )
    assert actors == {"olga"}


def test_refused_action_exits_with_its_reason(rollout):
    with pytest.raises(CommandError, match="start refused: gate #1 not passed") as refused:
        run("start", str(rollout.pk), "--user", "olga")
    assert refused.value.returncode == 1
    with pytest.raises(CommandError, match="promote_rollout"):
        run("promote", str(rollout.pk), "--user", "vic", "--reason", "x")
    with pytest.raises(CommandError, match="no user 'nobody'"):
        run("pause", str(rollout.pk), "--user", "nobody")
    with pytest.raises(CommandError, match="no rollout '999'"):
        run("pause", "999", "--user", "olga")


def test_status_shows_phase_metrics_verdicts_and_alerts(rollout):
    from canary.monitor import monitor_step

    go_preflight(at(-5))
    services.rollout_start(rollout=rollout, actor="tests", now=T0)
    healthy_orders(rollout.deployment, 5, start=at(1))
    monitor_step(rollout_id=rollout.pk, now=at(10))
    out, _ = run("status", str(rollout.pk))
    assert "[RUNNING]" in out
    assert "phase 1/3 at 10%" in out
    assert "orders                       5  >= 20" in out
    assert "latency_p95_ms" in out and "< 500.0" in out and "> 1500.0" in out
    assert "INCONCLUSIVE" in out
    assert "started: phase 1 at 10%" in out
    status = json.loads(run("status", str(rollout.pk), "--json")[0])
    assert status[0]["rollout"]["id"] == rollout.pk
    assert status[0]["last_verdicts"][0]["verdict"] == "INCONCLUSIVE"


def test_status_of_a_pending_rollout_shows_the_gate(rollout):
    out, _ = run("status")
    assert "gate #1: no GO pre-flight report younger than 60 min" in out


def test_export_writes_one_json_document(rollout, tmp_path):
    target = tmp_path / "export.json"
    _, err = run("export", str(rollout.pk), "--output", str(target))
    doc = json.loads(target.read_text())
    assert doc["rollout"]["id"] == rollout.pk
    assert len(doc["approvals"]) == 2
    assert "exported" in err
    assert json.loads(run("export", str(rollout.pk))[0]) == doc


def write_lines(tmp_path, lines):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_evaluate_one_line_out_per_line_in_and_bad_lines_do_not_stop_it(tmp_path):
    path = write_lines(
        tmp_path,
        [
            json.dumps(GOOD),
            "{not json",
            json.dumps(GOOD | {"fill_rate": "high"}),
            "",
            json.dumps(GOOD | {"error_rate": 1.5}),
            json.dumps(GOOD | {"drawdown_pct": -3.0}),
            json.dumps(GOOD | {"drawdown_pct": -1.5, "phase": 2}),
            json.dumps(GOOD | {"drawdown_pct": -1.5}),
        ],
    )
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("canary", "evaluate", path, stdout=out)
    assert exited.value.code == 1
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[0] == {"verdict": "PASS", "reasons": []}
    assert records[1]["field"] is None and records[1]["line"] == 2
    assert records[2] == {"error": "must be a number in 0..1", "field": "fill_rate", "line": 3}
    assert (records[3]["field"], records[3]["line"]) == ("error_rate", 5)
    assert records[4]["verdict"] == "FAIL"
    assert records[4]["reasons"][0]["metric"] == "drawdown_pct"
    assert records[5] == {"verdict": "PASS", "reasons": []}  # phase 2 target is -2.0
    assert records[6]["verdict"] == "WARNING"  # phase 1 target is -1.0
    assert len(records) == 7


def test_evaluate_with_the_phase_option_and_a_rollout_s_thresholds(rollout, tmp_path):
    line = json.dumps(GOOD | {"orders": 10, "drawdown_pct": -1.5})
    path = write_lines(tmp_path, [line])
    out, _ = run("evaluate", "--phase", "2", path)
    assert json.loads(out)["verdict"] == "INCONCLUSIVE"  # min_orders 20 by default
    services.rollout_configure(rollout=rollout, actor="tests", thresholds={"min_orders": 5})
    out, _ = run("evaluate", "--phase", "2", "--rollout", str(rollout.pk), path)
    assert json.loads(out) == {"verdict": "PASS", "reasons": []}


def test_evaluate_bad_arguments_exit_2(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD)])
    with pytest.raises(SystemExit) as exited:
        run("evaluate", "--phase", "0", path)
    assert exited.value.code == 2
    bad = tmp_path / "t.json"
    bad.write_text('{"fill_rate_fail": 7}')
    with pytest.raises(SystemExit) as exited:
        run("evaluate", "--thresholds", str(bad), path)
    assert exited.value.code == 2


def test_evaluate_reads_stdin_in_a_real_process(tmp_path):
    lines = "\n".join([json.dumps(GOOD), "[]", json.dumps(GOOD | {"db_ok": False})]) + "\n"
    done = subprocess.run(
        [sys.executable, "manage.py", "canary", "evaluate", "-"],
        input=lines,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "DJANGO_SETTINGS_MODULE": "config.settings_test"},
        timeout=60,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr
    assert records[0]["verdict"] == "PASS"
    assert records[1] == {"error": "line is not a JSON object", "field": None, "line": 2}
    assert records[2]["verdict"] == "FAIL"
    assert records[2]["reasons"][0]["metric"] == "db_ok"
