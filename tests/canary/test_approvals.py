"""Gate #1: approvals by two people in two roles, the Alpha trader's signal validation,
the pre-flight age, void approvals after a configuration change, recorded refusals."""

import math
from datetime import timedelta

import pytest

from audit.models import AuditEvent
from canary import services
from canary.models import Approval, RolloutState
from canary.services import ApprovalRefused, RolloutError, RolloutForbidden

from .factories import (
    GOOD_EVIDENCE,
    T0,
    approve_both,
    at,
    go_preflight,
    make_deployment,
    new_rollout,
)

pytestmark = pytest.mark.django_db


class People(dict):
    """Users created on first use (password hashing is slow)."""

    ROLES = {"alpha": ("alice", "Alpha"), "planner": ("paul", "Planner"), "ops": ("olga", "Ops")}

    def __init__(self, make_user):
        super().__init__()
        self.make_user = make_user

    def __missing__(self, key):
        self[key] = self.make_user(*self.ROLES[key])
        return self[key]


@pytest.fixture
def people(make_user):
    return People(make_user)


@pytest.fixture
def rollout():
    return new_rollout(make_deployment())


def refusals(action="approval.refused"):
    return list(AuditEvent.objects.filter(action=action).order_by("seq"))


def approve_alpha(rollout, actor, **evidence_changes):
    return services.approval_record(
        rollout=rollout,
        role="alpha",
        actor=actor,
        evidence=GOOD_EVIDENCE | evidence_changes,
        now=T0,
    )


def test_alpha_and_planner_approvals_pass_gate_with_a_fresh_preflight(rollout, people):
    approve_both(rollout, people["alpha"], people["planner"])
    go_preflight(at(-59 * 60))
    gate = services.gate1_check(rollout=rollout, now=T0)
    assert gate.ok, gate.problems
    recorded = AuditEvent.objects.filter(action="approval.record")
    assert [e.payload["role"] for e in recorded.order_by("seq")] == ["alpha", "planner"]
    assert recorded.first().payload["evidence"] == GOOD_EVIDENCE


# (field, value, allowed): at and around each bound
EVIDENCE_BOUNDS = [
    ("smc_alignment_pct", 79.99, False),
    ("smc_alignment_pct", 80, True),
    ("smc_alignment_pct", 80.01, True),
    ("smc_alignment_pct", 100, True),
    ("smc_alignment_pct", 100.01, False),
    ("smc_alignment_pct", -1, False),
    ("reward_risk", 2.99, False),
    ("reward_risk", 3, False),
    ("reward_risk", 3.0001, True),
    ("reward_risk", -0.5, False),
    ("liquidation_sweep_errors", 0, True),
    ("liquidation_sweep_errors", 0.0, True),
    ("liquidation_sweep_errors", 1, False),
    ("liquidation_sweep_errors", 0.5, False),
    ("liquidation_sweep_errors", -1, False),
]


@pytest.mark.parametrize(("field", "value", "allowed"), EVIDENCE_BOUNDS)
def test_alpha_evidence_bounds(rollout, people, field, value, allowed):
    if allowed:
        approval = approve_alpha(rollout, people["alpha"], **{field: value})
        assert approval.evidence[field] == value
        return
    with pytest.raises(ApprovalRefused) as refused:
        approve_alpha(rollout, people["alpha"], **{field: value})
    assert field in refused.value.message
    assert not Approval.objects.exists()
    (event,) = refusals()
    assert event.payload["op"] == "approve"
    assert field in event.payload["reason"]
    assert event.payload["evidence"][field] == value


@pytest.mark.parametrize(
    "bad", [None, "85", True, math.nan, math.inf, [85], pytest.param(10**400, id="10**400")]
)
def test_alpha_evidence_must_be_numbers(rollout, people, bad):
    with pytest.raises(ApprovalRefused, match="smc_alignment_pct: must be a number"):
        approve_alpha(rollout, people["alpha"], smc_alignment_pct=bad)


def test_alpha_evidence_missing_field_is_named(rollout, people):
    evidence = {k: v for k, v in GOOD_EVIDENCE.items() if k != "reward_risk"}
    with pytest.raises(ApprovalRefused, match="reward_risk"):
        services.approval_record(
            rollout=rollout, role="alpha", actor=people["alpha"], evidence=evidence
        )


@pytest.mark.parametrize(
    ("role", "who"), [("alpha", "planner"), ("planner", "alpha"), ("alpha", "ops")]
)
def test_wrong_role_is_refused_and_recorded(rollout, people, role, who):
    with pytest.raises(RolloutForbidden, match=f"approve_{role}"):
        services.approval_record(
            rollout=rollout, role=role, actor=people[who], evidence=GOOD_EVIDENCE
        )
    (event,) = refusals()
    assert event.actor == people[who].username
    assert event.payload["code"] == "forbidden"
    assert event.target_id == str(rollout.pk)


def test_unknown_role_and_anonymous_are_refused(rollout, people):
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(ApprovalRefused, match="unknown role"):
        services.approval_record(rollout=rollout, role="boss", actor=people["alpha"])
    with pytest.raises(RolloutForbidden):
        services.approval_record(rollout=rollout, role="planner", actor=AnonymousUser())
    assert len(refusals()) == 2


def test_same_person_cannot_approve_in_both_roles(rollout, make_user):
    both = make_user("bob", "Alpha")
    from django.contrib.auth.models import Group

    both.groups.add(Group.objects.get(name="Planner"))
    approve_alpha(rollout, both)
    with pytest.raises(ApprovalRefused, match="four eyes"):
        services.approval_record(rollout=rollout, role="planner", actor=both)
    assert Approval.objects.count() == 1
    assert refusals()[-1].payload["role"] == "planner"


def test_same_role_twice_is_refused(rollout, people, make_user):
    approve_alpha(rollout, people["alpha"])
    with pytest.raises(ApprovalRefused, match="already given"):
        approve_alpha(rollout, people["alpha"])
    with pytest.raises(ApprovalRefused, match="already given"):
        approve_alpha(rollout, make_user("anna", "Alpha"))


def test_approval_of_a_started_rollout_is_refused(rollout, people):
    rollout.state = RolloutState.RUNNING
    rollout.save()
    with pytest.raises(RolloutError, match="state RUNNING"):
        approve_alpha(rollout, people["alpha"])
    assert refusals()[-1].payload["reason"].startswith("cannot approve")


def test_configuration_change_voids_approvals(rollout, people, make_user):
    approve_both(rollout, people["alpha"], people["planner"])
    go_preflight(T0)
    assert services.gate1_check(rollout=rollout, now=T0).ok
    editor = make_user("ed", is_superuser=True)
    plan = [dict(p) for p in rollout.plan]
    plan[0]["min_duration_s"] = 600
    services.rollout_configure(rollout=rollout, actor=editor, plan=plan)
    assert rollout.config_version == 2
    gate = services.gate1_check(rollout=rollout, now=T0)
    assert not gate.ok
    assert any("Alpha trader approval of configuration v2" in p for p in gate.problems)
    # the same people may approve the new configuration
    approve_both(rollout, people["alpha"], people["planner"])
    assert services.gate1_check(rollout=rollout, now=T0).ok


def test_strategy_parameter_change_voids_approvals(rollout, people, make_user):
    approve_both(rollout, people["alpha"], people["planner"])
    services.rollout_configure(
        rollout=rollout, actor=make_user("ed", is_superuser=True), strategy_params={"min_score": 4}
    )
    assert services.valid_approvals(rollout) == {}


def test_unchanged_configuration_keeps_approvals(rollout, people, make_user):
    approve_both(rollout, people["alpha"], people["planner"])
    services.rollout_configure(
        rollout=rollout, actor=make_user("ed", is_superuser=True), plan=rollout.plan
    )
    assert rollout.config_version == 1
    assert set(services.valid_approvals(rollout)) == {"alpha", "planner"}


@pytest.mark.parametrize(
    ("age_s", "decision", "ok"),
    [
        (0, "GO", True),
        (3599, "GO", True),
        (3600, "GO", False),
        (3601, "GO", False),
        (10, "NO-GO", False),
        (-5, "GO", False),
    ],
)
def test_preflight_must_be_go_and_younger_than_an_hour(rollout, people, age_s, decision, ok):
    approve_both(rollout, people["alpha"], people["planner"])
    run = go_preflight(T0 - timedelta(seconds=age_s), decision=decision)
    gate = services.gate1_check(rollout=rollout, now=T0)
    assert gate.ok is ok
    if decision == "NO-GO":
        assert gate.problems == [
            f"the newest pre-flight report ({run.pk}, {run.ended_at.isoformat()}) says NO-GO"
        ]
    elif not ok:
        assert gate.problems == ["no GO pre-flight report younger than 60 min"]


@pytest.mark.parametrize(("no_go_age_s", "ok"), [(60, False), (600, True)])
def test_a_no_go_after_the_go_closes_the_gate(rollout, people, no_go_age_s, ok):
    """The newest pre-flight decides: a GO 5 minutes ago does not outweigh a NO-GO 1 minute
    ago (the exchange went away since), and a NO-GO before the GO does not count."""
    approve_both(rollout, people["alpha"], people["planner"])
    go_preflight(T0 - timedelta(seconds=300))
    go_preflight(T0 - timedelta(seconds=no_go_age_s), decision="NO-GO")
    gate = services.gate1_check(rollout=rollout, now=T0)
    assert gate.ok is ok
    assert ok or "says NO-GO" in gate.problems[0]


def test_approver_who_lost_the_permission_fails_the_gate(rollout, people):
    approve_both(rollout, people["alpha"], people["planner"])
    go_preflight(T0)
    people["planner"].groups.clear()
    gate = services.gate1_check(rollout=services.Rollout.objects.get(pk=rollout.pk), now=T0)
    assert gate.problems == ["paul no longer holds audit.approve_planner"]


@pytest.mark.django_db(transaction=True)
def test_refusal_record_is_committed_on_its_own(people):
    rollout = new_rollout(make_deployment())
    with pytest.raises(ApprovalRefused):
        approve_alpha(rollout, people["alpha"], reward_risk=1.0)
    assert AuditEvent.objects.filter(action="approval.refused").count() == 1
    from audit.services import audit_verify

    assert audit_verify() is None
