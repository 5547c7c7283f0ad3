"""REST API of the rollout lifecycle: reads, approvals, actions, refusals."""

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from audit.models import AuditEvent
from canary.models import Approval, Rollout, RolloutState

from .factories import (
    GOOD_EVIDENCE,
    fast_passwords,  # noqa: F401
    go_preflight,
    make_deployment,
    new_rollout,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]


@pytest.fixture
def client_for(api_token):
    def make(username: str, role: str) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(username, role)}")
        return client

    return make


@pytest.fixture
def rollout():
    return new_rollout(make_deployment())


def url(rollout, tail=""):
    return f"/api/v1/rollouts/{rollout.pk}/{tail}"


def approve(client, rollout, role, evidence=None):
    return client.post(
        url(rollout, "approvals"), {"role": role, "evidence": evidence or {}}, format="json"
    )


def test_reads_need_the_desk_permission(rollout, client_for):
    assert APIClient().get("/api/v1/rollouts/").status_code == 401
    viewer = client_for("vic", "Viewer")
    listing = viewer.get("/api/v1/rollouts/").json()
    assert listing["results"][0]["id"] == rollout.pk
    detail = viewer.get(url(rollout)).json()
    assert detail["state"] == "PENDING"
    assert detail["gate"]["ok"] is False
    assert viewer.get(url(rollout, "status")).json()["rollout"]["id"] == rollout.pk
    exported = viewer.get(url(rollout, "export"))
    assert exported.json()["rollout"]["plan"] == rollout.plan
    assert "attachment" in exported["Content-Disposition"]
    assert viewer.get(url(rollout, "approvals")).json() == []


def test_full_gate_and_actions_through_the_api(rollout, client_for):
    alpha, planner, ops = (
        client_for("alice", "Alpha"),
        client_for("paul", "Planner"),
        client_for("olga", "Ops"),
    )
    assert approve(alpha, rollout, "alpha", GOOD_EVIDENCE).status_code == 201
    assert approve(planner, rollout, "planner").status_code == 201
    refused = ops.post(url(rollout, "start"), {}, format="json")
    assert refused.status_code == 409
    assert refused.json()["reasons"] == ["no GO pre-flight report younger than 60 min"]
    go_preflight(timezone.now())
    started = ops.post(url(rollout, "start"), {}, format="json")
    assert started.status_code == 200, started.json()
    assert (started.json()["state"], started.json()["current_phase"]) == ("RUNNING", 1)
    assert ops.post(url(rollout, "promote"), {}, format="json").status_code == 400
    promoted = planner.post(url(rollout, "promote"), {"reason": "clean"}, format="json")
    assert promoted.json()["current_phase"] == 2
    assert (
        ops.post(url(rollout, "pause"), {"reason": "news"}, format="json").json()["state"]
        == "PAUSED"
    )
    assert (
        ops.post(url(rollout, "resume"), {"reason": "ok"}, format="json").json()["state"]
        == "RUNNING"
    )
    assert alpha.post(url(rollout, "pause"), {"reason": "x"}, format="json").status_code == 403
    rolled = alpha.post(url(rollout, "rollback"), {"reason": "signal drift"}, format="json")
    assert rolled.status_code == 200
    assert rolled.json()["state"] == "ROLLING_BACK"
    assert rolled.json()["rollback"]
    start_event = AuditEvent.objects.get(action="rollout.start")
    assert start_event.actor == "olga"
    assert start_event.ip == "127.0.0.1"


def test_refused_approvals_answer_with_the_reason_and_are_recorded(rollout, client_for):
    alpha = client_for("alice", "Alpha")
    weak = approve(alpha, rollout, "alpha", GOOD_EVIDENCE | {"smc_alignment_pct": 79})
    assert weak.status_code == 409
    assert weak.json()["field"] == "evidence"
    assert weak.json()["reasons"] == ["smc_alignment_pct: 79 does not meet >= 80"]
    wrong_role = approve(alpha, rollout, "planner")
    assert wrong_role.status_code == 403
    assert "approve_planner" in wrong_role.json()["error"]
    assert approve(alpha, rollout, "alpha", GOOD_EVIDENCE).status_code == 201
    twice = approve(alpha, rollout, "alpha", GOOD_EVIDENCE)
    assert twice.status_code == 409
    bad_input = alpha.post(url(rollout, "approvals"), {"evidence": {}}, format="json")
    assert bad_input.status_code == 400
    assert AuditEvent.objects.filter(action="approval.refused").count() == 3
    assert Approval.objects.count() == 1


def test_unknown_rollout_is_404(client_for):
    ops = client_for("olga", "Ops")
    assert ops.get("/api/v1/rollouts/999/status").status_code == 404
    assert ops.post("/api/v1/rollouts/999/pause", {"reason": "x"}, format="json").status_code == 404
    assert Rollout.objects.filter(state=RolloutState.RUNNING).count() == 0
