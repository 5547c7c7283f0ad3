"""``manage.py rehearse``: whole rollouts on real history in a throwaway database, and the
report reconciled with that database (read independently with sqlite3)."""

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from canary.rehearsal import Cadence, RehearsalError, clock_of, load_series, parse_name, ticks
from tests.canary.factories import T0, add_equity, at, fast_passwords  # noqa: F401
from tests.canary.test_monitor import start as start_rollout
from trading.models import EquitySnapshot

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ETH = ROOT / "data" / "market" / "ETH_BTC-5m.csv"
# Rehearsal gates that this strategy's signals (confluence 3 of 4) can pass.
PASSABLE = {"min_orders": 3, "confluence_avg_target": 3.0, "confluence_avg_fail": 2.5}
BREAKER = PASSABLE | {
    "drawdown_pct_target": -0.05,
    "drawdown_pct_fail": -0.08,
    "phase_targets": {"1": {"drawdown_pct": -0.05}},
}
# Its drawdown crosses -0.1 % at a candle with no order, no phase end and no hourly step.
BREAKER_BETWEEN_STEPS = PASSABLE | {
    "drawdown_pct_target": -0.06,
    "drawdown_pct_fail": -0.1,
    "phase_targets": {"1": {"drawdown_pct": -0.06}},
}


def rehearse(tmp_path, *args, thresholds=None, data=(ETH,), name="rehearsal"):
    db, report = tmp_path / f"{name}.sqlite3", tmp_path / f"{name}.json"
    argv = [
        sys.executable,
        "manage.py",
        "rehearse",
        "--data",
        *map(str, data),
        "--db",
        str(db),
        "--json",
        str(report),
    ]
    if thresholds is not None:
        path = tmp_path / f"{name}-thresholds.json"
        path.write_text(json.dumps(thresholds))
        argv += ["--thresholds", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.setdefault("DEBUG", "true")
    done = subprocess.run(
        [*argv, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return done, db, report


def rows(db, sql, *params):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def stamp(value: str) -> str:
    """Report ISO time -> how Django's SQLite backend stores it."""
    return datetime.fromisoformat(value).replace(tzinfo=None).isoformat(" ")


def reconcile(report: dict, db: Path, warm_up: int = 21) -> None:
    rollout = report["rollout"]
    ((state, rehearsal_flag, current),) = rows(
        db, "SELECT state, rehearsal, current_phase FROM canary_rollout WHERE id = ?", rollout["id"]
    )
    assert (state, rehearsal_flag, current) == (rollout["state"], 1, rollout["current_phase"])
    phases = rows(
        db,
        'SELECT id, "index", allocation, extensions, outcome FROM canary_phase WHERE rollout_id = ? ORDER BY "index"',
        rollout["id"],
    )
    assert [p[1] for p in phases] == [p["index"] for p in report["phases"]]
    for (phase_id, _, allocation, extensions, outcome), p in zip(
        phases, report["phases"], strict=True
    ):
        assert (allocation, extensions, outcome) == (p["allocation"], p["extensions"], p["outcome"])
        verdicts = dict(
            rows(
                db,
                "SELECT verdict, COUNT(*) FROM canary_gateevaluation WHERE phase_id = ? GROUP BY verdict",
                phase_id,
            )
        )
        assert verdicts == p["verdicts"]
        ((last_metrics,),) = rows(
            db,
            "SELECT metrics FROM canary_gateevaluation WHERE phase_id = ? ORDER BY evaluated_at DESC, id DESC LIMIT 1",
            phase_id,
        )
        assert json.loads(last_metrics) == p["metrics"]
        end = stamp(p["ended_at"] or rollout["clock_end"])
        ((orders,),) = rows(
            db,
            "SELECT COUNT(*) FROM trading_order WHERE deployment_id = ? AND submitted_at > ? AND submitted_at <= ? AND purpose <> 'flatten'",
            rollout["deployment"],
            stamp(p["started_at"]),
            end,
        )
        assert orders == p["orders"] == p["metrics"]["orders"]
        equity = rows(
            db,
            "SELECT equity FROM trading_equitysnapshot WHERE deployment_id = ? AND ts <= ? ORDER BY ts DESC, id DESC LIMIT 1",
            rollout["deployment"],
            end,
        )
        assert equity[0][0] == pytest.approx(p["equity_end"])
    approvals = rows(
        db,
        "SELECT a.role, u.username, u.first_name FROM canary_approval a JOIN auth_user u ON u.id = a.user_id WHERE a.rollout_id = ? ORDER BY a.id",
        rollout["id"],
    )
    assert approvals == [
        ("alpha", "rehearsal-alpha", "Rehearsal"),
        ("planner", "rehearsal-planner", "Rehearsal"),
    ]
    ((candles,),) = rows(db, "SELECT COUNT(*) FROM trading_candle")
    assert candles == report["speed"]["candles"] + warm_up


def test_rehearsal_runs_to_live_and_reconciles(tmp_path):
    done, db, report_path = rehearse(tmp_path, thresholds=PASSABLE)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["preflight"]["decision"] == "GO"
    assert report["rollout"]["state"] == "LIVE"
    assert [p["outcome"] for p in report["phases"]] == ["PROMOTED", "PROMOTED", "LIVE"]
    assert [p["allocation"] for p in report["phases"]] == [0.1, 0.5, 1.0]
    assert all(
        p["duration_s"] >= spec
        for p, spec in zip(report["phases"], (1800, 7200, 14400), strict=True)
    )
    assert report["rollback"] is None
    assert "LIVE" in done.stdout.split("{", 1)[0]  # the table comes before the JSON
    reconcile(report, db)
    ((kill_switch, allocation),) = rows(
        db, "SELECT kill_switch, allocation FROM trading_deployment"
    )
    assert (kill_switch, allocation) == ("ACTIVE", 1.0)


def test_breaker_trips_and_the_rollback_is_reported(tmp_path):
    done, db, report_path = rehearse(tmp_path, thresholds=BREAKER)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["rollout"]["state"] == "ROLLED_BACK"
    rollback = report["rollback"]
    assert rollback["trigger"] == "gate"
    assert "circuit breaker" in rollback["cause"]
    assert rollback["state"] in ("STAGE1_DONE", "COMPLETED")
    failed = report["phases"][rollback["phase"] - 1]
    assert failed["outcome"] == "ROLLED_BACK"
    assert failed["ended_at"] == rollback["at"]
    assert failed["verdicts"]["FAIL"] == 1
    reconcile(report, db)
    ((cause, state),) = rows(db, "SELECT cause, state FROM canary_rollback")
    assert (cause, state) == (rollback["cause"], rollback["state"])
    ((kill_switch,),) = rows(db, "SELECT kill_switch FROM trading_deployment")
    assert kill_switch == "HALTED"


def outcome(report: dict) -> dict:
    """What a rollout did: its phases and any rollback, without the evaluation trail."""
    keep = ("index", "started_at", "ended_at", "extensions", "outcome", "orders", "pnl")
    rollback = report["rollback"]
    return {
        "state": report["rollout"]["state"],
        "clock_end": report["rollout"]["clock_end"],
        "phases": [{k: p[k] for k in keep} for p in report["phases"]],
        "rollback": rollback and {k: rollback[k] for k in ("at", "phase", "trigger", "cause")},
    }


def every_candle_and_default(tmp_path, **kwargs) -> tuple[dict, dict]:
    runs = []
    for name, args in (("every-candle", ("--monitor-every", "0")), ("default", ())):
        done, db, path = rehearse(tmp_path, *args, name=name, **kwargs)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(path.read_text())
        reconcile(report, db, warm_up=21 * len(kwargs.get("data", (ETH,))))
        runs.append(report)
    return runs[0], runs[1]


def test_the_default_cadence_trips_the_breaker_at_the_same_candle(tmp_path):
    """Fewer monitor steps than one after every candle, the same rollout: phases, orders,
    P&L, and the rollback at the same candle time for the same cause."""
    every, default = every_candle_and_default(tmp_path, thresholds=BREAKER_BETWEEN_STEPS)
    assert every["rollback"]["at"] == "2018-01-10T14:50:00+00:00"
    assert "drawdown_pct" in every["rollback"]["cause"]
    assert "circuit breaker" in every["rollback"]["cause"]
    assert outcome(default) == outcome(every)
    assert default["speed"]["candles"] == every["speed"]["candles"]
    assert default["speed"]["monitor_steps"] < every["speed"]["monitor_steps"]


def test_the_default_cadence_catches_a_silent_stream_at_the_same_candle(tmp_path):
    """LTC/BTC misses one candle two hours into the rollout: its silence trips the breaker
    (stream_gap_s) at that candle time, whatever the cadence."""
    lines = ETH.read_text().splitlines()
    ltc = (ROOT / "data" / "market" / "LTC_BTC-5m.csv").read_text().splitlines()
    eth_path, ltc_path = tmp_path / "ETH_BTC-5m.csv", tmp_path / "LTC_BTC-5m.csv"
    eth_path.write_text("\n".join(lines[:120]) + "\n")
    missing = 21 + 24 + 1  # header, warm-up, two hours of 5m candles
    ltc_path.write_text("\n".join(ltc[:missing] + ltc[missing + 1 : 120]) + "\n")
    every, default = every_candle_and_default(
        tmp_path, thresholds=PASSABLE, data=(eth_path, ltc_path)
    )
    gap_at = datetime.fromtimestamp(int(ltc[missing].split(",")[0]) / 1000 + 300, tz=UTC)
    assert every["rollback"]["at"] == gap_at.isoformat()
    assert "stream_gap_s" in every["rollback"]["cause"]
    assert outcome(default) == outcome(every)
    assert default["speed"]["monitor_steps"] < every["speed"]["monitor_steps"]


def test_bad_arguments_exit_2(tmp_path):
    done, _, _ = rehearse(tmp_path, "--speed", "fast")
    assert done.returncode == 2
    assert "--speed" in done.stderr
    bad = tmp_path / "nonsense.csv"
    bad.write_text("timestamp_ms,open,high,low,close,volume\n")
    done = subprocess.run(
        [sys.executable, "manage.py", "rehearse", "--data", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DEBUG": "true"},
    )
    assert done.returncode == 2
    assert "expected a name like ETH_BTC-5m.csv" in done.stderr


def test_child_refuses_a_database_that_is_not_the_throwaway_one():
    done = subprocess.run(
        [sys.executable, "manage.py", "rehearse", "--in-throwaway-db", "--data", str(ETH)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DEBUG": "true", "CANARY_REHEARSAL_DB": "/nowhere.sqlite3"},
    )
    assert done.returncode == 2
    assert "refusing to rehearse outside the throwaway database" in done.stderr


def test_series_and_candle_clock(settings):
    (series,) = load_series([str(ETH)], "paper")
    assert (series.symbol, series.timeframe, len(series.items)) == ("ETH/BTC", "5m", 5760)
    first = ticks([series])[0]
    assert clock_of(first).timestamp() * 1000 == first[0]["open_time_ms"] + 300_000
    assert parse_name(Path("LTC_BTC-1h.csv")) == ("LTC/BTC", "1h")
    with pytest.raises(RehearsalError):
        load_series([str(ETH), str(ETH)], "paper")


@pytest.mark.django_db
@pytest.mark.usefixtures("fast_passwords")
def test_cadence_steps_at_events_at_the_phase_end_and_on_the_heartbeat(make_user):
    cadence = Cadence(start_rollout(make_user), every_s=20.0)
    cadence.phase_changed()
    cadence.last_step = T0
    quiet = {"decided": False, "silent": False, "marked": False}
    assert cadence.ends_at == at(60)
    assert not cadence.due(at(10), **quiet)
    assert cadence.due(at(10), **{**quiet, "decided": True})
    assert cadence.due(at(10), **{**quiet, "silent": True})
    assert not cadence.due(at(10), **{**quiet, "marked": True})  # far from any drawdown bound
    assert cadence.due(at(20), **quiet)
    cadence.last_step = at(50)
    assert cadence.due(at(60), **quiet)


@pytest.mark.django_db
@pytest.mark.usefixtures("fast_passwords")
def test_cadence_arms_on_marks_near_the_drawdown_target(make_user):
    """Phase 1's drawdown target is -1 %: equity marks within it change no verdict; from
    one at it on, every new mark may."""
    rollout = start_rollout(make_user)  # equity 10.0 marked before the phase started
    cadence = Cadence(rollout, every_s=3600.0)
    cadence.phase_changed()
    cadence.last_step = T0
    dip = EquitySnapshot(ts=at(30), equity=9.95)
    assert cadence.marks([dip], False, at(30)) and not cadence.armed
    deeper = EquitySnapshot(ts=at(35), equity=9.9)
    assert cadence.marks([dip, deeper], False, at(35)) and cadence.armed
    assert cadence.due(at(35), decided=False, silent=False, marked=True)
    assert not cadence.due(at(40), decided=False, silent=False, marked=False)


@pytest.mark.django_db
@pytest.mark.usefixtures("fast_passwords")
def test_cadence_counts_a_fill_mark_at_the_candle_time_it_enters_the_window(make_user):
    rollout = start_rollout(make_user)
    cadence = Cadence(rollout, every_s=3600.0)
    cadence.phase_changed()
    add_equity(rollout.deployment, when=at(40.001), equity=9.99)  # acknowledged after 40
    assert not cadence.marks([], True, at(40))
    assert cadence.marks([], False, at(45))
    assert not cadence.marks([], False, at(50))
