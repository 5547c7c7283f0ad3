"""The monitor step: metrics -> verdict -> decision -> services, with time passed in."""

import pytest
from django.conf import settings
from django.db import connection

from alerts.models import Alert
from audit.models import AuditEvent
from canary import services
from canary.models import GateEvaluation, Phase, Rollback, Rollout
from canary.monitor import DB_FAILURE_KEY, monitor_all, monitor_step
from trading.models import Deployment, KillSwitch, MarketStream

from .factories import (
    SHORT_PLAN,
    T0,
    add_equity,
    approve_both,
    at,
    fast_passwords,  # noqa: F401
    go_preflight,
    healthy_orders,
    make_deployment,
    new_rollout,
    touch_stream,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]


def start(make_user, plan=SHORT_PLAN, thresholds=None, name="eth-canary"):
    deployment = make_deployment(name=name)
    rollout = new_rollout(deployment, plan=plan, thresholds=thresholds or {})
    approve_both(rollout, make_user(f"a-{name}", "Alpha"), make_user(f"p-{name}", "Planner"))
    go_preflight(at(-10))
    services.rollout_start(rollout=rollout, actor="tests", now=T0)
    add_equity(deployment, when=at(-1), equity=10.0)
    return rollout


@pytest.fixture
def rollout(make_user):
    return start(make_user)


def step(rollout, seconds, *, fresh=True):
    if fresh:
        touch_stream(when=at(seconds))
    return monitor_step(rollout_id=rollout.pk, now=at(seconds))


def reload(rollout):
    return Rollout.objects.get(pk=rollout.pk)


def canary_alerts(rollout, kind=None):
    alerts = Alert.objects.filter(source="canary", payload__rollout=rollout.pk).order_by("id")
    return [a for a in alerts if kind is None or a.payload.get("kind") == kind]


def test_pass_before_the_end_waits_and_records_the_evaluation(rollout):
    healthy_orders(rollout.deployment, 25, start=at(1))
    result = step(rollout, 30)
    assert (result.verdict, result.action) == ("PASS", "NONE")
    evaluation = GateEvaluation.objects.get(pk=result.evaluation_id)
    assert evaluation.metrics["orders"] == 25
    assert evaluation.evaluated_at == at(30)
    assert reload(rollout).current_phase == 1


def test_pass_at_the_end_promotes_automatically(rollout):
    healthy_orders(rollout.deployment, 25, start=at(1))
    result = step(rollout, 60)
    assert (result.verdict, result.action, result.state) == ("PASS", "PROMOTE", "RUNNING")
    assert reload(rollout).current_phase == 2
    assert Deployment.objects.get(pk=rollout.deployment_id).allocation == 0.5
    promote = AuditEvent.objects.get(action="rollout.promote")
    assert promote.actor == services.SYSTEM_ACTOR
    assert promote.payload["automatic"] is True
    assert "promoted to phase 2" in canary_alerts(rollout, "state")[-1].message


def test_phase_two_window_starts_at_its_own_start(rollout):
    healthy_orders(rollout.deployment, 25, start=at(1))
    step(rollout, 60)
    result = step(rollout, 90)
    assert (result.phase, result.verdict) == (2, "INCONCLUSIVE")
    assert GateEvaluation.objects.get(pk=result.evaluation_id).metrics["orders"] == 0


def test_fail_at_any_moment_rolls_back_with_its_reasons(rollout):
    healthy_orders(rollout.deployment, 25, start=at(1))
    add_equity(rollout.deployment, when=at(10), equity=9.6)  # -4 %: breaker
    result = step(rollout, 11)
    assert (result.verdict, result.action, result.state) == ("FAIL", "ROLLBACK", "ROLLING_BACK")
    assert result.reasons == ["drawdown_pct -4.0 <= -3.0 (circuit breaker)"]
    rollback = Rollback.objects.get(rollout=rollout)
    assert rollback.trigger == "gate"
    assert rollback.reasons == result.reasons
    (breaker,) = canary_alerts(rollout, "breaker")
    assert breaker.severity == "critical"
    assert "circuit breaker tripped" in breaker.message
    assert canary_alerts(rollout, "state")[-1].severity == "critical"


def test_too_many_target_misses_fail_without_the_breaker(rollout):
    from .factories import add_orders, order

    add_orders(
        rollout.deployment,
        [
            order(rollout.deployment, when=at(i + 1), latency_ms=900, slippage_bps=20)
            for i in range(25)
        ],
    )
    touch_stream(when=at(20))
    add_equity(rollout.deployment, when=at(5), equity=9.85)  # -1.5 %: outside phase 1 target
    result = step(rollout, 20)
    assert (result.verdict, result.action) == ("FAIL", "ROLLBACK")
    assert [
        a.payload["kind"]
        for a in canary_alerts(rollout)
        if a.payload.get("kind") in ("fail", "breaker")
    ] == ["fail"]


def test_warning_extends_then_second_warning_in_a_row_pauses(
    rollout, django_capture_on_commit_callbacks
):
    from .factories import add_orders, order

    add_orders(
        rollout.deployment,
        [order(rollout.deployment, when=at(i + 1), slippage_bps=20) for i in range(25)],
    )
    assert step(rollout, 40).verdict == "WARNING"  # mid-phase: nothing but the alert
    assert step(rollout, 50).action == "NONE"
    assert len(canary_alerts(rollout, "warning")) == 1  # once per run of WARNINGs
    first = step(rollout, 60)
    assert (first.verdict, first.action) == ("WARNING", "EXTEND")
    phase = Phase.objects.get(rollout=rollout, index=1)
    assert (phase.ends_at, phase.extensions, phase.consecutive_warnings) == (at(90), 1, 1)
    assert step(rollout, 75).action == "NONE"
    with django_capture_on_commit_callbacks(execute=True):
        second = step(rollout, 90)
    assert (second.action, second.state) == ("PAUSE", "PAUSED")
    assert "second WARNING in a row" in reload(rollout).state_reason
    assert Deployment.objects.get(pk=rollout.deployment_id).kill_switch == KillSwitch.REDUCING
    paused = step(rollout, 200)
    assert (paused.verdict, paused.action, paused.state) == ("WARNING", "NONE", "PAUSED")


def test_inconclusive_extends_and_breaks_a_warning_run(rollout):
    from .factories import add_orders, order

    first = step(rollout, 60)
    assert (first.verdict, first.action) == ("INCONCLUSIVE", "EXTEND")
    add_orders(
        rollout.deployment,
        [order(rollout.deployment, when=at(61 + i), slippage_bps=20) for i in range(25)],
    )
    assert step(rollout, 90).action == "EXTEND"  # first WARNING
    assert Phase.objects.get(rollout=rollout, index=1).consecutive_warnings == 1
    Rollout.objects.filter(pk=rollout.pk).update(
        thresholds=services.parse_thresholds({"min_orders": 100}).to_dict()
    )
    assert step(rollout, 120).verdict == "INCONCLUSIVE"
    Rollout.objects.filter(pk=rollout.pk).update(thresholds=services.parse_thresholds({}).to_dict())
    result = step(rollout, 150)
    assert (result.verdict, result.action) == ("WARNING", "EXTEND")  # not two in a row


def test_manual_promote_phase_waits_for_a_person(make_user):
    plan = [dict(p) for p in SHORT_PLAN]
    plan[0]["needs_manual_promote"] = True
    rollout = start(make_user, plan=plan)
    healthy_orders(rollout.deployment, 25, start=at(1))
    assert step(rollout, 60).action == "AWAIT_PROMOTE"
    assert step(rollout, 70).action == "AWAIT_PROMOTE"
    assert AuditEvent.objects.filter(action="rollout.await_promote").count() == 1
    assert len(canary_alerts(rollout, "await_promote")) == 1
    assert reload(rollout).current_phase == 1
    services.rollout_promote(
        rollout=reload(rollout), actor=make_user("ops", "Ops"), reason="checked", now=at(80)
    )
    assert reload(rollout).current_phase == 2


def test_last_phase_passing_marks_live_and_breaker_stays_armed(rollout):
    healthy_orders(rollout.deployment, 25, start=at(1))
    step(rollout, 60)  # -> phase 2
    healthy_orders(rollout.deployment, 25, start=at(61))
    step(rollout, 180)  # -> phase 3
    healthy_orders(rollout.deployment, 25, start=at(181))
    assert step(rollout, 300).action == "NONE"
    live = step(rollout, 360)
    assert (live.action, live.state) == ("MARK_LIVE", "LIVE")
    assert Deployment.objects.get(pk=rollout.deployment_id).allocation == 1.0
    assert step(rollout, 400).action == "NONE"
    add_equity(rollout.deployment, when=at(401), equity=9.0)
    tripped = step(rollout, 402)
    assert (tripped.verdict, tripped.action, tripped.state) == ("FAIL", "ROLLBACK", "ROLLING_BACK")
    assert [p.outcome for p in Phase.objects.filter(rollout=rollout)] == [
        "PROMOTED",
        "PROMOTED",
        "ROLLED_BACK",
    ]


def test_stale_market_stream_trips_the_breaker(rollout):
    touch_stream(when=at(0))
    result = step(rollout, 31, fresh=False)
    assert result.verdict == "FAIL"
    assert result.reasons == ["stream_gap_s 31.0 > 30.0 (fail bound)"]


def test_rolling_back_settles_once_flat(rollout):
    add_equity(rollout.deployment, when=at(1), equity=5.0)
    step(rollout, 2)
    rollback = Rollback.objects.get(rollout=rollout)
    assert step(rollout, 3).state == "ROLLING_BACK"
    Rollback.objects.filter(pk=rollback.pk).update(state="COMPLETED", stage1_ended_at=at(20))
    assert step(rollout, 30).state == "ROLLED_BACK"
    assert reload(rollout).ended_at == at(20)


def test_rollback_started_elsewhere_is_joined(rollout):
    Rollback.objects.create(
        deployment=rollout.deployment,
        trigger="watchdog",
        cause="db",
        requested_by="watchdog",
        started_at=at(1),
    )
    result = step(rollout, 2)
    assert result.state == "ROLLING_BACK"
    assert not GateEvaluation.objects.filter(rollout=rollout).exists()


def test_one_broken_rollout_does_not_stop_the_others(make_user):
    good = start(make_user, name="good")
    bad = start(make_user, name="bad")
    Rollout.objects.filter(pk=bad.pk).update(thresholds={"min_orders": "many"})
    touch_stream(when=at(5))
    results = {r.rollout_id: r for r in monitor_all(now=at(5))}
    assert "min_orders" in results[bad.pk].error
    assert results[good.pk].error is None
    assert results[good.pk].verdict == "INCONCLUSIVE"


def test_remembered_database_loss_fails_the_next_step(rollout, redis_url):
    from canary.heartbeat import redis_client

    redis_client().set(DB_FAILURE_KEY.format(deployment_id=rollout.deployment_id), "1")
    result = step(rollout, 5)
    assert result.verdict == "FAIL"
    assert result.reasons == ["db_ok is False (database check failed)"]
    assert step(rollout, 6).state == "ROLLING_BACK"


def test_remembered_database_loss_is_taken_once_and_only_when_acted_on(rollout, redis_url):
    from canary.heartbeat import redis_client
    from canary.monitor import _db_failure_asked

    key = DB_FAILURE_KEY.format(deployment_id=rollout.deployment_id)
    client = redis_client()
    client.delete(key)
    with _db_failure_asked(rollout.deployment_id) as failed:
        client.set(key, "1")  # set after the question: the next step finds it
        assert failed() is False
    assert client.get(key) == b"1"
    with pytest.raises(RuntimeError), _db_failure_asked(rollout.deployment_id):
        raise RuntimeError("the step failed before it read the answer: the flag stays")
    assert client.get(key) == b"1"
    assert client.ping()  # the unread reply did not stay on a pooled connection
    with _db_failure_asked(rollout.deployment_id) as failed:
        assert failed() is True
    assert client.get(key) is None
    result = step(rollout, 30)
    assert result.reasons != ["db_ok is False (database check failed)"]


def test_remembered_database_loss_without_redis_is_none(rollout, monkeypatch):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from canary import heartbeat
    from canary.monitor import _db_failure_asked

    unreachable = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    monkeypatch.setattr(heartbeat, "redis_client", lambda: unreachable)
    with _db_failure_asked(rollout.deployment_id) as failed:
        assert failed() is False


def test_remembered_database_loss_is_asked_again_when_the_early_question_fails(
    rollout, redis_url, monkeypatch
):
    import redis

    from canary.heartbeat import redis_client
    from canary.monitor import _db_failure_asked

    key = DB_FAILURE_KEY.format(deployment_id=rollout.deployment_id)
    redis_client().set(key, "1")

    calls = []

    def broken(self, *args, **kwargs):
        calls.append(args)
        raise redis.ConnectionError("lost on the way")

    with monkeypatch.context() as patch:
        patch.setattr(redis.connection.AbstractConnection, "send_command", broken)
        with _db_failure_asked(rollout.deployment_id) as failed:
            patch.undo()
            assert failed() is True  # GETDEL, the usual way
    assert calls == [("EXISTS", key)]
    assert redis_client().get(key) is None


def test_an_extension_reports_the_phase_times_it_wrote(rollout):
    first = step(rollout, 60)
    assert (first.verdict, first.action) == ("INCONCLUSIVE", "EXTEND")
    phase = Phase.objects.get(rollout=rollout, index=1)
    assert first.phase_times == (1, phase.started_at, phase.ends_at)
    assert (phase.ends_at, phase.extensions, phase.consecutive_warnings) == (at(90), 1, 0)
    assert "phase_times" not in first.to_dict()
    assert step(rollout, 70).phase_times is None  # no action


def test_an_extension_follows_the_rows_extension_when_the_callers_copy_is_stale(rollout):
    phase = services.current_phase(reload(rollout))
    Phase.objects.filter(pk=phase.pk).update(extension_s=45, extensions=2)
    extended = services.phase_extend(
        rollout=reload(rollout), phase=phase, warning=True, reason="test", now=at(60)
    )
    stored = Phase.objects.get(pk=phase.pk)
    assert (stored.ends_at, stored.extensions, stored.consecutive_warnings) == (at(105), 3, 1)
    assert (extended.ends_at, extended.extensions, extended.extension_s) == (at(105), 3, 45)
    assert (
        AuditEvent.objects.filter(action="rollout.extend").latest("id").payload["ends_at"]
        == at(105).isoformat()
    )


def test_beat_schedules_the_monitor_task():
    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["canary-monitor"]
    assert entry["task"] == "canary.monitor"
    assert entry["schedule"] == settings.CANARY_MONITOR_INTERVAL_S == 10.0
    import canary.tasks  # noqa: F401 - registers the tasks

    assert "canary.monitor" in app.tasks


def test_monitor_task_runs_a_step_with_the_wall_clock(rollout):
    from canary.monitor_tasks import monitor

    (result,) = monitor.apply().get()
    assert result["rollout"] == rollout.pk
    assert result["evaluation"] == GateEvaluation.objects.get(rollout=rollout).pk


def test_the_callers_writes_before_a_step_are_made_in_its_transaction(rollout):
    """``before``: run first inside the step's transaction (no savepoint of the step's own
    around it), so that it commits and fails with the step."""
    healthy_orders(rollout.deployment, 25, start=at(1))
    touch_stream(when=at(30))
    outside = len(connection.savepoint_ids)
    seen = []

    def before():
        seen.append((connection.in_atomic_block, len(connection.savepoint_ids)))
        touch_stream(when=at(31))

    result = monitor_step(rollout_id=rollout.pk, now=at(31), before=before)
    assert seen == [(True, outside + 1)]  # the step's atomic block (nested in the test's)
    assert (result.verdict, result.action) == ("PASS", "NONE")
    assert GateEvaluation.objects.get(pk=result.evaluation_id).metrics["stream_gap_s"] == 0.0

    evaluations = GateEvaluation.objects.count()

    def failing():
        touch_stream(when=at(40))
        raise RuntimeError("the caller's write failed")

    with pytest.raises(RuntimeError):
        monitor_step(rollout_id=rollout.pk, now=at(41), before=failing)
    assert GateEvaluation.objects.count() == evaluations
    assert MarketStream.objects.get().last_received_at == at(31)  # rolled back with the step
