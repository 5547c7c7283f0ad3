"""Rollouts, approvals and evaluations in the admin: validation and services behind it."""

import json

import pytest
from django.test import Client

from audit.models import AuditEvent
from canary.models import Approval, GateEvaluation, Rollout

from .factories import (
    GOOD_EVIDENCE,
    SHORT_PLAN,
    T0,
    fast_passwords,  # noqa: F401
    make_deployment,
    new_rollout,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]


@pytest.fixture
def admin_client_for(make_user):
    def make(username: str, role: str | None = None, **extra) -> Client:
        user = make_user(username, role, is_staff=True, **extra)
        client = Client()
        client.force_login(user)
        return client

    return make


def form(rollout=None, **changes):
    from trading.models import Deployment

    data = {
        "name": "canary v2",
        "plan": json.dumps(SHORT_PLAN),
        "thresholds": json.dumps({"min_orders": 10}),
        "strategy_params": json.dumps({"min_score": 3}),
    }
    if rollout is None:
        deployment = Deployment.objects.filter(name="admin-deploy").first()
        data["deployment"] = str((deployment or make_deployment(name="admin-deploy")).pk)
    data.update(changes)
    data.update(
        {f"{p}-{k}": "0" for p in ("phases", "approvals") for k in ("TOTAL_FORMS", "INITIAL_FORMS")}
    )
    return data


def test_add_rollout_validates_and_goes_through_the_service(admin_client_for):
    client = admin_client_for("root", is_superuser=True)
    bad_plan = [dict(p) for p in SHORT_PLAN]
    bad_plan[1]["allocation"] = 0.05
    response = client.post("/admin/canary/rollout/add/", form(plan=json.dumps(bad_plan)))
    assert response.status_code == 200
    assert (
        "plan.2.allocation: allocation must be above the previous phase"
        in response.content.decode()
    )
    response = client.post("/admin/canary/rollout/add/", form(thresholds='{"fill_rate_fail": 3}'))
    assert "thresholds.fill_rate_fail" in response.content.decode()
    response = client.post("/admin/canary/rollout/add/", form())
    assert response.status_code == 302, response.content.decode()[:2000]
    rollout = Rollout.objects.get()
    assert rollout.thresholds["min_orders"] == 10
    assert rollout.plan[0]["needs_manual_promote"] is False
    assert AuditEvent.objects.get(action="rollout.create").actor == "root"


def test_changing_a_pending_rollout_bumps_its_version(admin_client_for):
    client = admin_client_for("root", is_superuser=True)
    rollout = new_rollout(make_deployment())
    plan = [dict(p) for p in SHORT_PLAN]
    plan[2]["min_duration_s"] = 999
    response = client.post(
        f"/admin/canary/rollout/{rollout.pk}/change/", form(rollout, plan=json.dumps(plan))
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    rollout.refresh_from_db()
    assert (rollout.config_version, rollout.plan[2]["min_duration_s"], rollout.name) == (
        2,
        999,
        "canary v2",
    )


def test_started_rollout_is_view_only(admin_client_for):
    client = admin_client_for("root", is_superuser=True)
    rollout = new_rollout(make_deployment())
    Rollout.objects.filter(pk=rollout.pk).update(state="RUNNING")
    page = client.get(f"/admin/canary/rollout/{rollout.pk}/change/")
    assert page.status_code == 200
    assert 'name="plan"' not in page.content.decode()
    response = client.post(f"/admin/canary/rollout/{rollout.pk}/change/", form(rollout))
    assert response.status_code == 403


def test_evaluations_are_read_only(admin_client_for):
    client = admin_client_for("vic", "Viewer")
    rollout = new_rollout(make_deployment())
    evaluation = GateEvaluation.objects.create(
        rollout=rollout,
        evaluated_at=T0,
        metrics={"orders": 3},
        verdict="INCONCLUSIVE",
        reasons=["orders 3 < 20"],
    )
    assert client.get("/admin/canary/gateevaluation/").status_code == 200
    page = client.get(f"/admin/canary/gateevaluation/{evaluation.pk}/change/")
    assert "orders 3 &lt; 20" in page.content.decode()
    assert client.get("/admin/canary/gateevaluation/add/").status_code == 403
    assert client.post(f"/admin/canary/gateevaluation/{evaluation.pk}/delete/").status_code == 403


def test_approval_from_the_admin_and_a_refusal_on_the_form(admin_client_for):
    rollout = new_rollout(make_deployment())
    alpha = admin_client_for("alice", "Alpha")
    data = {
        "rollout": rollout.pk,
        "role": "alpha",
        "comment": "",
        "evidence": json.dumps(GOOD_EVIDENCE | {"reward_risk": 3}),
    }
    response = alpha.post("/admin/canary/approval/add/", data)
    assert response.status_code == 200
    assert "reward_risk: 3 does not meet &gt; 3" in response.content.decode()
    data["evidence"] = json.dumps(GOOD_EVIDENCE)
    response = alpha.post("/admin/canary/approval/add/", data)
    assert response.status_code == 302
    approval = Approval.objects.get()
    assert (approval.user.username, approval.config_version) == ("alice", 1)
    assert AuditEvent.objects.filter(action="approval.refused").count() == 1
    viewer = admin_client_for("vic", "Viewer")
    assert viewer.get("/admin/canary/approval/add/").status_code == 403
