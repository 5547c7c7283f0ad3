"""The /api/v1/ endpoints beyond the matrix: filters and pagination, pre-flight runs and
results, rollbacks and restore refusals, backups, the audit trail's filter/export/verify,
deliveries, bad input answered 400 naming the field, throttling."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from audit.management.commands.audit_export import FIELDS
from audit.models import AuditEvent
from audit.services import audit_record
from canary.models import GateEvaluation, PreflightRun, Rollback, RollbackStep
from tests.permissions.conftest import Scene

pytestmark = pytest.mark.django_db


@pytest.fixture
def scene(make_user):
    return Scene(make_user)


@pytest.fixture
def ops(client_for):
    return client_for("olga", "Ops")


@pytest.fixture
def viewer(client_for):
    return client_for("vic", "Viewer")


def fields_of(response) -> dict:
    assert response.status_code == 400, (response.status_code, response.content[:300])
    body = response.json()
    assert body["error"]
    return body.get("fields") or {body.get("field"): body["error"]}


def test_rollouts_are_filtered_and_paginated(scene, viewer):
    pending = [scene.pending() for _ in range(3)]
    running = scene.running()
    page = viewer.get("/api/v1/rollouts/?state=PENDING&limit=2").json()
    assert page["count"] == 3
    assert len(page["results"]) == 2 and page["next"]
    only = viewer.get(f"/api/v1/rollouts/?deployment={running.deployment_id}").json()
    assert [r["id"] for r in only["results"]] == [running.pk]
    assert viewer.get("/api/v1/rollouts/?rehearsal=true").json()["count"] == 0
    assert "state" in fields_of(viewer.get("/api/v1/rollouts/?state=SLEEPING"))
    assert "deployment" in fields_of(viewer.get("/api/v1/rollouts/?deployment=abc"))
    detail = viewer.get(f"/api/v1/rollouts/{running.pk}/").json()
    assert detail["phases"][0]["index"] == 1 and detail["gate"]["ok"] is True
    assert viewer.get(f"/api/v1/rollouts/{pending[0].pk}/").json()["gate"]["ok"] is False


def test_evaluations_of_a_rollout(scene, viewer):
    rollout = scene.running()
    now = timezone.now()
    for i, verdict in enumerate(("PASS", "WARNING", "PASS")):
        GateEvaluation.objects.create(
            rollout=rollout,
            evaluated_at=now + timedelta(seconds=i),
            metrics={"orders": i},
            verdict=verdict,
            action="NONE",
        )
    url = f"/api/v1/rollouts/{rollout.pk}/evaluations"
    everything = viewer.get(url).json()
    assert [e["metrics"]["orders"] for e in everything["results"]] == [2, 1, 0]
    assert viewer.get(f"{url}?verdict=WARNING").json()["count"] == 1
    assert "verdict" in fields_of(viewer.get(f"{url}?verdict=MAYBE"))
    assert viewer.get("/api/v1/rollouts/999999/evaluations").status_code == 404


def test_actions_name_the_bad_field(scene, ops):
    rollout = scene.running()
    base = f"/api/v1/rollouts/{rollout.pk}"
    assert "reason" in fields_of(ops.post(f"{base}/pause", {"reason": ["x"]}, format="json"))
    assert "reason" in fields_of(ops.post(f"{base}/pause", {"reason": "x" * 301}, format="json"))
    missing = ops.post(f"{base}/pause", {}, format="json")
    assert fields_of(missing) == {"reason": "pause needs a reason"}
    not_json = ops.post(f"{base}/pause", "{nope", content_type="application/json")
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]
    approvals = f"/api/v1/rollouts/{scene.pending().pk}/approvals"
    assert "role" in fields_of(ops.post(approvals, {"role": ["alpha"]}, format="json"))
    assert ops.post(f"{base}/pause", {"reason": "news"}, format="json").status_code == 200


def test_preflight_run_and_results(scene, ops, viewer):
    deployment = scene.deployment()
    checks = fields_of(ops.post("/api/v1/preflight/", {"checks": ["nope"]}, format="json"))
    assert "unknown check(s): nope" in checks["checks"][0]
    assert "deployment" in fields_of(
        ops.post("/api/v1/preflight/", {"deployment": 2**40}, format="json")
    )
    made = ops.post(
        "/api/v1/preflight/", {"deployment": deployment.pk, "checks": ["env"]}, format="json"
    )
    assert made.status_code == 201, made.json()
    run = made.json()
    assert [c["name"] for c in run["checks"]] == ["env"]
    assert run["decision"] in ("GO", "NO-GO") and run["actor"] == "olga"
    refused = viewer.post("/api/v1/preflight/", {"checks": ["env"]}, format="json")
    assert refused.status_code == 403 and PreflightRun.objects.count() == 1
    listed = viewer.get(f"/api/v1/preflight/?decision={run['decision']}").json()
    assert [r["id"] for r in listed["results"]] == [run["id"]]
    assert viewer.get(f"/api/v1/preflight/{run['id']}/").json()["checks"] == run["checks"]
    assert "decision" in fields_of(viewer.get("/api/v1/preflight/?decision=MAYBE"))


def test_rollbacks_and_refused_restores(scene, ops, viewer):
    rollback, backup = scene.completed_rollback()
    RollbackStep.objects.create(
        rollback=rollback, stage=1, name="halt", started_at=timezone.now(), outcome="ok"
    )
    listed = viewer.get("/api/v1/rollbacks/?state=COMPLETED&trigger=gate").json()
    assert [r["id"] for r in listed["results"]] == [rollback.pk]
    detail = viewer.get(f"/api/v1/rollbacks/{rollback.pk}/").json()
    assert detail["steps"][0]["name"] == "halt" and detail["report"] == {"runs": 1}
    assert "state" in fields_of(viewer.get("/api/v1/rollbacks/?state=LOST"))
    url = f"/api/v1/rollbacks/{rollback.pk}/restore"
    assert "reason" in fields_of(ops.post(url, {"backup": backup.pk}, format="json"))
    assert "backup" in fields_of(ops.post(url, {"backup": 999, "reason": "x"}, format="json"))
    Rollback.objects.filter(pk=rollback.pk).update(state="RUNNING")
    early = ops.post(url, {"backup": backup.pk, "reason": "db broken"}, format="json")
    assert early.status_code == 409 and "needs COMPLETED" in early.json()["error"]
    refusal = AuditEvent.objects.get(action="rollback.refused")
    assert (refusal.actor, refusal.payload["op"]) == ("olga", "restore")
    backups = viewer.get("/api/v1/backups/").json()["results"]
    assert backups[0]["file"] == "b.sqlite3" and "path" not in backups[0]


def _events(count: int) -> list[AuditEvent]:
    return [
        audit_record(action=f"test.{'even' if i % 2 == 0 else 'odd'}", actor=f"a{i % 3}")
        for i in range(count)
    ]


def test_audit_events_are_filtered(viewer):
    made = _events(6)
    by_action = viewer.get("/api/v1/audit/events/?action=test.even").json()
    assert [e["seq"] for e in by_action["results"]] == [e.seq for e in made[::2]]
    prefixed = viewer.get("/api/v1/audit/events/?action_prefix=test.&actor=a1").json()
    assert [e["seq"] for e in prefixed["results"]] == [made[1].seq, made[4].seq]
    after = viewer.get(f"/api/v1/audit/events/?action_prefix=test.&after_seq={made[3].seq}")
    assert after.json()["count"] == 2
    soon = (timezone.now() + timedelta(hours=1)).isoformat()
    assert viewer.get("/api/v1/audit/events/", {"since": soon}).json()["count"] == 0
    assert "since" in fields_of(viewer.get("/api/v1/audit/events/?since=yesterday"))
    assert "after_seq" in fields_of(viewer.get("/api/v1/audit/events/?after_seq=x"))
    window = {"since": soon, "until": timezone.now().isoformat()}
    assert "until" in fields_of(viewer.get("/api/v1/audit/events/", window))


def test_audit_export_and_verify(viewer):
    from audit.services import event_hash

    made = _events(5)
    jsonl = viewer.get("/api/v1/audit/export?action_prefix=test.")
    assert jsonl.status_code == 200 and jsonl["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in b"".join(jsonl.streaming_content).splitlines()]
    assert [line["seq"] for line in lines] == [e.seq for e in made]
    assert lines[-1]["hash"] == event_hash(made[-1])
    as_csv = viewer.get("/api/v1/audit/export?output=csv&action=test.odd")
    rows = list(csv.DictReader(io.StringIO(b"".join(as_csv.streaming_content).decode())))
    assert tuple(rows[0]) == FIELDS and [int(r["seq"]) for r in rows] == [made[1].seq, made[3].seq]
    assert "output" in fields_of(viewer.get("/api/v1/audit/export?output=xml"))
    state = viewer.get("/api/v1/audit/verify").json()
    assert state["ok"] is True and state["first_break"] is None
    assert state["head_seq"] == made[-1].seq == state["events"]


def test_deliveries_are_listed_and_filtered(scene, viewer):
    from alerts.models import Delivery

    alert = scene.alert()
    now = timezone.now()
    for channel, status in (("email", "sent"), ("webhook", "failed")):
        Delivery.objects.create(
            alert=alert,
            channel=channel,
            recipient=f"r-{uuid.uuid4().hex[:6]}",
            status=status,
            created_at=now,
        )
    everything = viewer.get("/api/v1/deliveries/").json()
    assert everything["count"] == 2
    failed = viewer.get(f"/api/v1/deliveries/?alert={alert.pk}&status=failed").json()
    assert [d["channel"] for d in failed["results"]] == ["webhook"]
    assert "channel" in fields_of(viewer.get("/api/v1/deliveries/?channel=pigeon"))


def test_unknown_paths_and_ids_answer_json_404(ops):
    for url in ("/api/v1/rollouts/abc/", "/api/v1/nothing-here", "/api/v1/rollbacks/7/"):
        response = ops.get(url)
        assert response.status_code == 404, url
        assert response.json()["error"], url


def test_state_changing_calls_are_throttled(scene, ops, monkeypatch):
    from rest_framework.throttling import ScopedRateThrottle

    monkeypatch.setattr(
        ScopedRateThrottle,
        "THROTTLE_RATES",
        {**ScopedRateThrottle.THROTTLE_RATES, "actions": "2/min"},
    )
    rollout = scene.running()
    base = f"/api/v1/rollouts/{rollout.pk}"
    assert ops.post(f"{base}/pause", {"reason": "a"}, format="json").status_code == 200
    assert ops.post(f"{base}/resume", {"reason": "b"}, format="json").status_code == 200
    third = ops.post(f"{base}/pause", {"reason": "c"}, format="json")
    assert third.status_code == 429 and "throttled" in third.json()["error"]
    assert ops.get("/api/v1/rollouts/").status_code == 200  # reads have their own rate


def test_nul_characters_are_refused_naming_where(scene, ops, viewer):
    from django.db import connection

    bad = fields_of(viewer.get("/api/v1/audit/events/", {"actor": "a\x00b"}))
    assert bad == {"actor": ["NUL characters are not allowed"]}
    approvals = f"/api/v1/rollouts/{scene.pending().pk}/approvals"
    body = {"role": "planner", "evidence": {"notes": ["ok", "a\x00b"]}}
    refused = ops.post(approvals, body, format="json")
    assert refused.status_code == 400
    assert refused.json()["error"] == "evidence.notes.1: NUL characters are not allowed"
    # a view that passes the value on to the database: refused there, still a 400
    other = ops.get("/api/v1/alerts/", {"detector": "a\x00b"})
    expected = 400 if connection.vendor == "postgresql" else 200
    assert other.status_code == expected
