"""Rollout lifecycle services: plan validation, start, promote, pause, resume, roll back,
their permissions, audit records, kill-switch side effects after commit, status, export."""

from datetime import timedelta

import pytest

from audit.models import AuditEvent
from canary import services
from canary.models import Phase, Rollback, Rollout, RolloutState
from canary.services import GateRefused, RolloutError, RolloutForbidden, RolloutInvalid
from trading.models import Deployment, KillSwitch

from .factories import (
    SHORT_PLAN,
    T0,
    approve_both,
    at,
    fast_passwords,  # noqa: F401
    go_preflight,
    make_deployment,
    new_rollout,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]


@pytest.fixture
def ops(make_user):
    return make_user("olga", "Ops")


@pytest.fixture
def ready(make_user):
    """A PENDING rollout past gate #1."""
    rollout = new_rollout(make_deployment())
    approve_both(rollout, make_user("alice", "Alpha"), make_user("paul", "Planner"))
    go_preflight(at(-60))
    return rollout


@pytest.fixture
def running(ready, ops, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_start(rollout=ready, actor=ops, now=T0)
    return ready


def actions(rollout):
    return list(
        AuditEvent.objects.filter(target_type="canary.Rollout", target_id=str(rollout.pk))
        .order_by("seq")
        .values_list("action", flat=True)
    )


# --- plan ---------------------------------------------------------------------------------


def test_default_plan_is_ten_fifty_hundred():
    specs = services.parse_plan(services.default_plan())
    assert [s.allocation for s in specs] == [0.1, 0.5, 1.0]
    assert [s.min_duration_s for s in specs] == [1800, 7200, 14400]


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ("nope", "plan"),
        ([{"allocation": 1.0, "min_duration_s": 60, "extension_s": 60}], "plan"),
        ([{"allocation": 0.1, "min_duration_s": 60, "extension_s": 60}, 3], "plan.2"),
        (
            [{"allocation": 0, "min_duration_s": 60, "extension_s": 1}, SHORT_PLAN[2]],
            "plan.1.allocation",
        ),
        (
            [
                {"allocation": 0.5, "min_duration_s": 60, "extension_s": 1},
                SHORT_PLAN[0] | {"allocation": 0.5},
                SHORT_PLAN[2],
            ],
            "plan.2.allocation",
        ),
        ([SHORT_PLAN[0], SHORT_PLAN[1] | {"allocation": 0.9}], "plan.allocation"),
        ([SHORT_PLAN[0] | {"min_duration_s": 0}, SHORT_PLAN[2]], "plan.1.min_duration_s"),
        ([SHORT_PLAN[0] | {"extension_s": 1.5}, SHORT_PLAN[2]], "plan.1.extension_s"),
        (
            [SHORT_PLAN[0] | {"needs_manual_promote": "yes"}, SHORT_PLAN[2]],
            "plan.1.needs_manual_promote",
        ),
        ([SHORT_PLAN[0] | {"size": 3}, SHORT_PLAN[2]], "plan.1.size"),
        ([SHORT_PLAN[0] | {"allocation": True}, SHORT_PLAN[2]], "plan.1.allocation"),
    ],
)
def test_bad_plans_are_refused_naming_the_field(plan, field):
    with pytest.raises(RolloutInvalid) as refused:
        services.parse_plan(plan)
    assert refused.value.field == field


def test_bad_thresholds_are_refused_naming_the_field():
    with pytest.raises(RolloutInvalid) as refused:
        services.parse_thresholds({"fill_rate_fail": 2})
    assert refused.value.field == "thresholds.fill_rate_fail"
    with pytest.raises(RolloutInvalid) as refused:
        services.parse_thresholds({"bogus": 1})
    assert refused.value.field == "thresholds.bogus"


def test_create_stores_validated_config_and_audits():
    deployment = make_deployment()
    rollout = services.rollout_create(
        deployment=deployment, name="v1", actor="tests", thresholds={"min_orders": 5.0}, now=T0
    )
    assert rollout.plan == services.default_plan()
    assert rollout.thresholds["min_orders"] == 5
    assert rollout.strategy_params == deployment.params
    assert rollout.state == RolloutState.PENDING
    assert actions(rollout) == ["rollout.create"]


def test_create_and_configure_need_permissions(make_user, ready):
    viewer = make_user("vic", "Viewer")
    with pytest.raises(RolloutForbidden):
        services.rollout_create(deployment=ready.deployment, name="x", actor=viewer)
    with pytest.raises(RolloutForbidden):
        services.rollout_configure(rollout=ready, actor=viewer, plan=SHORT_PLAN)
    assert AuditEvent.objects.filter(action="rollout.refused").count() == 2


# --- start --------------------------------------------------------------------------------


def test_start_needs_gate_one(ops, make_user):
    rollout = new_rollout(make_deployment())
    with pytest.raises(GateRefused) as refused:
        services.rollout_start(rollout=rollout, actor=ops, now=T0)
    assert len(refused.value.reasons) == 3
    assert Rollout.objects.get(pk=rollout.pk).state == RolloutState.PENDING
    refusal = AuditEvent.objects.get(action="rollout.refused")
    assert refusal.payload["op"] == "start"
    assert len(refusal.payload["reasons"]) == 3


def test_start_opens_phase_one_and_activates_after_commit(running, redis_url):
    from canary import killswitch

    rollout = Rollout.objects.get(pk=running.pk)
    assert (rollout.state, rollout.current_phase, rollout.started_at) == (
        RolloutState.RUNNING,
        1,
        T0,
    )
    phase = Phase.objects.get(rollout=rollout)
    assert (phase.index, phase.allocation, phase.started_at) == (1, 0.1, T0)
    assert phase.ends_at == at(60)
    deployment = Deployment.objects.get(pk=rollout.deployment_id)
    assert deployment.allocation == 0.1
    assert deployment.kill_switch == KillSwitch.ACTIVE
    assert killswitch.read_state(deployment.pk) == KillSwitch.ACTIVE
    assert deployment.params == rollout.strategy_params
    assert actions(rollout)[-1] == "rollout.start"
    assert (
        AuditEvent.objects.filter(action="killswitch.set").latest("seq").payload["to"] == "ACTIVE"
    )


def test_kill_switch_waits_for_commit(ready, ops, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.rollout_start(rollout=ready, actor=ops, now=T0)
    assert any("_kill_switch_on_commit" in c.__qualname__ for c in callbacks)
    assert Deployment.objects.get(pk=ready.deployment_id).kill_switch == KillSwitch.HALTED


def test_start_needs_permission_and_pending_state(ready, make_user, running):
    with pytest.raises(RolloutError, match="state RUNNING"):
        services.rollout_start(rollout=running, actor=make_user("pam", "Planner"), now=T0)
    with pytest.raises(RolloutForbidden):
        services.rollout_start(rollout=running, actor=make_user("alf", "Alpha"), now=T0)


def test_second_rollout_of_a_busy_deployment_cannot_start(running, ops, make_user):
    other = new_rollout(running.deployment)
    approve_both(other, make_user("al2", "Alpha"), make_user("pl2", "Planner"))
    with pytest.raises(GateRefused, match="is RUNNING"):
        services.rollout_start(rollout=other, actor=ops, now=T0)


# --- promote ------------------------------------------------------------------------------


def test_person_promotes_early_with_a_reason(running, ops):
    with pytest.raises(RolloutInvalid, match="reason"):
        services.rollout_promote(rollout=running, actor=ops, now=at(10))
    services.rollout_promote(rollout=running, actor=ops, reason="metrics clean", now=at(10))
    assert (running.state, running.current_phase) == (RolloutState.RUNNING, 2)
    first, second = Phase.objects.filter(rollout=running)
    assert (first.outcome, first.ended_at) == ("PROMOTED", at(10))
    assert (second.allocation, second.started_at, second.ends_at) == (0.5, at(10), at(130))
    assert Deployment.objects.get(pk=running.deployment_id).allocation == 0.5
    event = AuditEvent.objects.filter(action="rollout.promote").latest("seq")
    assert {
        "early": True,
        "automatic": False,
        "reason": "metrics clean",
    }.items() <= event.payload.items()


def test_promote_from_last_phase_marks_live(running, ops):
    for when in (10, 20):
        services.rollout_promote(rollout=running, actor=ops, reason="go", now=at(when))
    services.rollout_promote(
        rollout=running, actor="canary-monitor", reason="last phase passed", now=at(300)
    )
    rollout = Rollout.objects.get(pk=running.pk)
    assert (rollout.state, rollout.current_phase) == (RolloutState.LIVE, 3)
    third = Phase.objects.get(rollout=rollout, index=3)
    assert third.outcome == "LIVE" and third.ended_at is None
    assert Deployment.objects.get(pk=rollout.deployment_id).allocation == 1.0
    with pytest.raises(RolloutError, match="state LIVE"):
        services.rollout_promote(rollout=rollout, actor=ops, reason="again", now=at(301))


def test_alpha_cannot_promote(running, make_user):
    with pytest.raises(RolloutForbidden, match="promote_rollout"):
        services.rollout_promote(rollout=running, actor=make_user("alf", "Alpha"), reason="x")


# --- pause / resume -----------------------------------------------------------------------


def test_pause_reduces_and_resume_reactivates(running, ops, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_pause(rollout=running, actor=ops, reason="news at 14:00", now=at(50))
    deployment = Deployment.objects.get(pk=running.deployment_id)
    assert running.state == RolloutState.PAUSED
    assert deployment.kill_switch == KillSwitch.REDUCING
    assert deployment.allocation == 0.1  # kept for the resume
    with pytest.raises(RolloutError, match="state PAUSED"):
        services.rollout_pause(rollout=running, actor=ops, reason="again")
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_resume(rollout=running, actor=ops, reason="news passed", now=at(55))
    assert running.state == RolloutState.RUNNING
    assert Deployment.objects.get(pk=running.deployment_id).kill_switch == KillSwitch.ACTIVE
    phase = Phase.objects.get(rollout=running, index=1)
    assert phase.ends_at == at(85)  # at least one extension after the resume
    assert actions(running)[-3:] == ["rollout.pause", "rollout.refused", "rollout.resume"]


def test_resume_only_from_pause(running, ops):
    with pytest.raises(RolloutError, match="state RUNNING"):
        services.rollout_resume(rollout=running, actor=ops, reason="x")


@pytest.mark.parametrize("linked", [False, True])
def test_a_rollback_taking_over_refuses_resume_and_promote(
    running, ops, django_capture_on_commit_callbacks, linked
):
    """A watchdog's rollback of the deployment (not yet followed by the monitor), or one
    linked to the rollout and finished: the kill switch stays where the rollback put it."""
    from canary.models import Rollback, RollbackState

    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_pause(rollout=running, actor=ops, reason="look", now=at(50))
    rollback = Rollback.objects.create(
        deployment_id=running.deployment_id,
        rollout=running if linked else None,
        trigger="watchdog",
        cause="market stream silent for 95 s",
        requested_by="watchdog",
        state=RollbackState.COMPLETED if linked else RollbackState.RUNNING,
        started_at=at(52),
    )
    for op in (services.rollout_resume, services.rollout_promote):
        with (
            django_capture_on_commit_callbacks(execute=True),
            pytest.raises(RolloutError, match=f"rollback {rollback.pk} of this deployment"),
        ):
            op(rollout=running, actor=ops, reason="looked", now=at(55))
    running.refresh_from_db()
    assert (running.state, running.current_phase) == (RolloutState.PAUSED, 1)
    assert Deployment.objects.get(pk=running.deployment_id).kill_switch == KillSwitch.REDUCING
    assert actions(running)[-2:] == ["rollout.refused", "rollout.refused"]


def test_promote_out_of_a_pause_reactivates(running, ops, django_capture_on_commit_callbacks):
    services.rollout_pause(rollout=running, actor=ops, reason="look", now=at(50))
    with django_capture_on_commit_callbacks(execute=True):
        services.rollout_promote(rollout=running, actor=ops, reason="looked", now=at(70))
    assert (running.state, running.current_phase) == (RolloutState.RUNNING, 2)
    assert Deployment.objects.get(pk=running.deployment_id).kill_switch == KillSwitch.ACTIVE


# --- rollback -----------------------------------------------------------------------------


def test_person_rolls_back(running, ops):
    rollback = services.rollout_rollback(rollout=running, actor=ops, reason="desk call", now=at(30))
    assert running.state == RolloutState.ROLLING_BACK
    assert Rollback.objects.get(pk=rollback.pk).trigger == "person"
    phase = Phase.objects.get(rollout=running, index=1)
    assert (phase.outcome, phase.ended_at) == ("ROLLED_BACK", at(30))
    event = AuditEvent.objects.filter(action="rollout.rollback").latest("seq")
    assert event.payload["rollback"] == rollback.pk
    with pytest.raises(RolloutError):
        services.rollout_rollback(rollout=running, actor=ops, reason="twice")


def test_rollback_needs_permission_and_reason(running, make_user, ops):
    with pytest.raises(RolloutForbidden):
        services.rollout_rollback(rollout=running, actor=make_user("vic", "Viewer"), reason="x")
    with pytest.raises(RolloutInvalid):
        services.rollout_rollback(rollout=running, actor=ops, reason="  ")
    assert running.state == RolloutState.RUNNING


def test_rolled_back_once_the_rollback_is_flat(running, ops):
    rollback = services.rollout_rollback(rollout=running, actor=ops, reason="desk", now=at(30))
    services.rollout_settle_rollback(rollout=running, now=at(31))
    assert running.state == RolloutState.ROLLING_BACK
    Rollback.objects.filter(pk=rollback.pk).update(state="STAGE1_DONE", stage1_ended_at=at(40))
    services.rollout_settle_rollback(rollout=running, now=at(45))
    assert (running.state, running.ended_at) == (RolloutState.ROLLED_BACK, at(40))


def test_rollout_follows_a_rollback_started_elsewhere(running):
    rollback = Rollback.objects.create(
        deployment=running.deployment,
        trigger="watchdog",
        cause="stream silent",
        requested_by="watchdog",
        started_at=at(5),
    )
    services.rollout_join_rollback(rollout=running, rollback=rollback, now=at(6))
    assert running.state == RolloutState.ROLLING_BACK
    assert "stream silent" in running.state_reason


# --- status and export --------------------------------------------------------------------


def test_status_shows_phase_clock_metrics_and_gate(ready, ops, running):
    status = services.rollout_status(rollout=running, now=at(45))
    assert status["phase"]["index"] == 1
    assert status["phase"]["in_phase_s"] == 45
    assert status["phase"]["left_s"] == 15
    rows = {row["metric"]: row for row in status["metrics"]}
    assert rows["orders"] == {
        "metric": "orders",
        "value": 0,
        "target": ">= 20",
        "fail": "",
        "state": "too few",
    }
    assert rows["drawdown_pct"]["target"] == "> -1.0"  # phase 1 override
    assert rows["drawdown_pct"]["fail"] == "<= -3.0"
    assert rows["db_ok"]["state"] == "ok"
    assert status["open_alerts"][0]["message"].endswith("started: phase 1 at 10%")
    pending = new_rollout(make_deployment(name="other"))
    assert services.rollout_status(rollout=pending, now=T0)["gate"]["ok"] is False


def test_export_is_one_json_document(running, ops):
    import json

    services.rollout_promote(rollout=running, actor=ops, reason="ok", now=at(20))
    doc = services.rollout_export(rollout=running)
    json.dumps(doc)
    assert [p["index"] for p in doc["phases"]] == [1, 2]
    assert doc["phases"][0]["outcome"] == "PROMOTED"
    assert {a["role"] for a in doc["approvals"]} == {"alpha", "planner"}
    assert [a["action"] for a in doc["actions"]][-2:] == ["rollout.start", "rollout.promote"]
    assert doc["rollout"]["plan"] == [p | {"needs_manual_promote": False} for p in SHORT_PLAN]
    assert doc["phases"][1]["started_at"] == (T0 + timedelta(seconds=20)).isoformat()
