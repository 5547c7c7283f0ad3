"""Admin pages behind the actions: the Alpha approval form with its evidence, a refusal
shown and recorded, pre-flight runs and rollbacks rendered readably."""

from __future__ import annotations

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from canary.models import PreflightRun, RollbackStep

from .conftest import Scene

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_as(make_user):
    def make(username: str, role: str) -> Client:
        client = Client()
        client.force_login(make_user(username, role, is_staff=True))
        return client

    return make


def test_alpha_approval_asks_for_the_evidence_and_records_a_refusal(scene: Scene, admin_as):
    rollout = scene.pending()
    alice = admin_as("alice", "Alpha")
    form = {"action": "approve_alpha", "_selected_action": [rollout.pk], "index": "0"}
    page = alice.post("/admin/canary/rollout/", form).content.decode()
    for name in ("reason", "smc_alignment_pct", "reward_risk", "liquidation_sweep_errors"):
        assert f'name="{name}"' in page, name
    weak = {
        **form,
        "confirm": "yes",
        "reason": "validated",
        "smc_alignment_pct": "70",
        "reward_risk": "3.5",
        "liquidation_sweep_errors": "0",
    }
    shown = alice.post("/admin/canary/rollout/", weak, follow=True).content.decode()
    assert "smc_alignment_pct: 70.0 does not meet &gt;= 80" in shown
    refusal = AuditEvent.objects.get(action="approval.refused")
    assert refusal.actor == "alice" and refusal.payload["comment"] == "validated"
    assert not rollout.approvals.exists()
    incomplete = alice.post("/admin/canary/rollout/", {**weak, "reward_risk": ""})
    assert incomplete.status_code == 200 and "This field is required" in incomplete.content.decode()


def test_preflight_and_rollback_pages_are_readable(scene: Scene, admin_as):
    viewer = admin_as("vic", "Viewer")
    now = timezone.now()
    run = PreflightRun.objects.create(
        started_at=now,
        ended_at=now,
        decision="NO-GO",
        checks=[{"name": "backup", "status": "FAIL", "critical": True, "detail": "too old"}],
    )
    listing = viewer.get("/admin/canary/preflightrun/?decision=NO-GO").content.decode()
    assert "backup" in listing and "/admin/canary/preflightrun/run/" not in listing
    detail = viewer.get(f"/admin/canary/preflightrun/{run.pk}/change/").content.decode()
    assert "<td>too old</td>" in detail
    assert viewer.get("/admin/canary/preflightrun/run/").status_code == 403
    rollback, _ = scene.completed_rollback()
    rollback.report = {"pnl": {"total": -1.5}, "ready_for_restart": False}
    rollback.save()
    RollbackStep.objects.create(
        rollback=rollback, stage=1, name="halt", started_at=now, outcome="ok", detail={"n": 1}
    )
    page = viewer.get(f"/admin/canary/rollback/{rollback.pk}/change/").content.decode()
    assert "ready_for_restart" in page and "&quot;total&quot;: -1.5" in page and "halt" in page
    assert viewer.get("/admin/canary/rollback/?state=COMPLETED").status_code == 200
    assert viewer.get("/admin/canary/backup/").status_code == 200
    assert viewer.get("/admin/canary/gateevaluation/?verdict=FAIL").status_code == 200
