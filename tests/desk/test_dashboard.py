"""The desk page, its JSON state, its permissions and its actions."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent

pytestmark = pytest.mark.django_db

JSON = {"HTTP_ACCEPT": "application/json"}


def page_state(response) -> dict:
    match = re.search(
        r'<script id="desk-state" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match, "the page embeds its first state"
    return json.loads(match.group(1))


# --------------------------------------------------------------------------- access


def test_anonymous_is_sent_to_login_and_can_sign_in(client, desk_users):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/"
    page = client.get("/login/?next=/")
    assert page.status_code == 200 and b'name="password"' in page.content
    user = desk_users["Ops"]
    user.set_password("desk-pass-123")
    user.save()
    signed_in = client.post(
        "/login/", {"username": "ops", "password": "desk-pass-123", "next": "/"}
    )
    assert signed_in.status_code == 302 and signed_in["Location"] == "/"
    assert client.get("/").status_code == 200
    assert AuditEvent.objects.filter(action="user.login", actor="ops").exists()


def test_expired_session_gets_401_json_with_login_url(client):
    response = client.get("/desk/state.json", **JSON)
    assert response.status_code == 401
    assert response.json() == {"error": "session expired", "login_url": "/login/?next=/"}
    post = client.post("/desk/halt", {"reason": "x"}, **JSON)
    assert post.status_code == 401


def test_user_without_desk_permission_is_refused_and_audited(client_for, make_user):
    client = client_for(make_user("stranger"))
    assert client.get("/").status_code == 403
    assert client.get("/desk/state.json", **JSON).status_code == 403
    refusals = AuditEvent.objects.filter(action="permission.refused", actor="stranger")
    assert refusals.count() == 2
    assert refusals.first().payload["permission"] == "audit.view_desk"


def test_static_assets_are_served_from_the_project(client_for, desk_users):
    client = client_for(desk_users["Viewer"])
    html = client.get("/").content.decode()
    scripts = re.findall(r'<script src="([^"]+)"', html)
    links = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
    assert scripts and links
    for url in scripts + links:
        assert url.startswith("/static/"), f"{url} is not served by the project"
        response = client.get(url)
        assert response.status_code == 200, url
        b"".join(response.streaming_content)
    assert "/static/vendor/uplot/uPlot.iife.min.js" in scripts


# --------------------------------------------------------------------------- what is shown


def test_ops_sees_the_desk_with_actions(client_for, desk):
    client = client_for(desk.users["Ops"])
    response = client.get("/")
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="halt-open"' in html and 'id="rollback-open"' in html
    assert 'id="halt-dialog"' in html and "csrfmiddlewaretoken" in html
    state = page_state(response)
    assert state["user"]["can"] == {"halt": True, "rollback": True, "handle_alerts": True}
    assert state["rollout"]["name"] == "ETH/BTC SMC go-live"


def test_viewer_sees_no_halt_or_rollback(client_for, desk):
    client = client_for(desk.users["Viewer"])
    html = client.get("/").content.decode()
    for marker in (
        "halt-open",
        "rollback-open",
        "halt-dialog",
        "rollback-dialog",
        "silence-dialog",
    ):
        assert marker not in html
    state = page_state(client.get("/"))
    assert state["user"]["can"] == {"halt": False, "rollback": False, "handle_alerts": False}


def test_timeline_has_time_in_phase_and_left(client_for, desk):
    state = client_for(desk.users["Viewer"]).get("/desk/state.json", **JSON).json()
    phases = state["rollout"]["phases"]
    assert [p["allocation"] for p in phases] == [0.1, 0.5, 1.0]
    assert [p["status"] for p in phases] == ["done", "current", "upcoming"]
    current = phases[1]
    assert current["elapsed_s"] == pytest.approx(45 * 60, abs=60)
    assert current["left_s"] == pytest.approx(75 * 60, abs=60)
    assert phases[0]["words"] == "done (PASS)"
    assert state["rollout"]["words"] == "Running"


def test_gate_metrics_in_colour_and_words(client_for, desk):
    gates = client_for(desk.users["Viewer"]).get("/desk/state.json", **JSON).json()["gates"]
    rows = {r["metric"]: r for r in gates["rows"]}
    assert gates["verdict"] == "WARNING" and gates["phase"] == 2
    assert rows["latency_p95_ms"]["status"] == "warn"
    assert rows["latency_p95_ms"]["words"] == "outside target (needs < 500 ms)"
    assert rows["slippage_bps"]["status"] == "warn"
    assert rows["slippage_bps"]["words"] == "outside target (needs < 15.0 bps)"
    assert rows["fill_rate"] == {
        "metric": "fill_rate",
        "label": "Fill rate",
        "value": 0.985,
        "display": "98.5 %",
        "target": "> 95.0 %",
        "fail": "< 90.0 %",
        "status": "pass",
        "words": "within target",
    }
    assert rows["stream_gap_s"]["words"] == "inside fail bound"
    assert rows["db_ok"]["display"] == "ok"
    assert all(r["words"] for r in gates["rows"]), "every status is also said in words"


def test_gate_rows_past_the_fail_bound_and_without_data():
    from canary.dashboard import gate_rows
    from canary.engine import Thresholds

    metrics = {"latency_p95_ms": 1650.0, "drawdown_pct": -3.2, "db_ok": False, "fill_rate": "x"}
    rows = {r["metric"]: r for r in gate_rows(metrics, Thresholds(), phase=2)}
    assert rows["latency_p95_ms"]["status"] == "fail"
    assert rows["latency_p95_ms"]["words"] == "past fail bound (> 1,500 ms)"
    assert rows["drawdown_pct"]["words"] == "past fail bound (<= -3.00 %): circuit breaker"
    assert (rows["db_ok"]["status"], rows["db_ok"]["words"]) == ("fail", "database check failed")
    assert rows["fill_rate"]["status"] == "none"
    assert (rows["slippage_bps"]["status"], rows["slippage_bps"]["words"]) == (
        "none",
        "no data yet",
    )
    assert rows["drawdown_pct"]["target"] == "> -2.00 %"


def test_verdicts_approvals_and_preflight(client_for, desk):
    state = client_for(desk.users["Viewer"]).get("/desk/state.json", **JSON).json()
    verdicts = state["verdicts"]
    assert [v["verdict"] for v in verdicts] == ["WARNING", "PASS", "PASS", "INCONCLUSIVE"]
    assert "latency_p95_ms 640.0 >= 500.0 (target < 500.0)" in verdicts[0]["reasons"]
    alpha, planner = state["approvals"]
    assert (alpha["role"], alpha["user"], alpha["current"]) == ("alpha", "alpha", True)
    assert ["SMC alignment", "86 %"] in alpha["evidence"]
    assert alpha["evidence_problems"] == []
    assert ["Reward:risk", "3.4"] in alpha["evidence"]
    assert planner["user"] == "planner" and ["Team ready", "yes"] in planner["evidence"]
    preflight = state["preflight"]
    assert preflight["decision"] == "GO" and preflight["go"] is True
    assert len(preflight["checks"]) == 8 and all(c["ok"] for c in preflight["checks"])
    assert preflight["checks"][6]["name"] == "backup"
    monitoring = preflight["checks"][7]
    assert (monitoring["kind"], monitoring["critical"]) == ("warn", False)


def test_equity_positions_and_today(client_for, desk):
    state = client_for(desk.users["Viewer"]).get("/desk/state.json", **JSON).json()
    equity = state["equity"]
    assert len(equity["t"]) == len(equity["equity"]) == len(equity["drawdown"]) == 288
    assert equity["worst_drawdown_pct"] == min(equity["drawdown"]) < 0
    assert equity["t"] == sorted(equity["t"])
    positions = state["positions"]
    assert [p["symbol"] for p in positions] == ["ETH/BTC", "LTC/BTC"], "flat rows are hidden"
    eth, ltc = positions
    assert eth["side"] == "long" and eth["unrealised"] == pytest.approx((0.09527 - 0.09412) * 0.85)
    assert ltc["side"] == "short" and ltc["unrealised"] < 0
    assert state["today"]["orders"] >= 1
    assert set(state["health"]["components"]) >= {"database", "redis", "worker", "beat"}


def test_equity_is_thinned_without_hiding_the_worst_drawdown(client_for, desk):
    from trading.models import EquitySnapshot

    now = timezone.now()
    EquitySnapshot.objects.bulk_create(
        EquitySnapshot(
            deployment=desk.deployment,
            ts=now - timedelta(seconds=10 * i),
            cash=1,
            positions_value=0,
            equity=1.0,
            peak=1.1,
            drawdown_pct=-9.0 if i == 777 else -1.0,
        )
        for i in range(1, 3000)
    )
    equity = client_for(desk.users["Viewer"]).get("/desk/state.json", **JSON).json()["equity"]
    assert len(equity["t"]) <= 602
    assert min(equity["drawdown"]) == -9.0 == equity["worst_drawdown_pct"]


def test_empty_database_shows_empty_states(client_for, desk_users):
    state = client_for(desk_users["Ops"]).get("/desk/state.json", **JSON).json()
    assert state["rollout"] is None and state["deployment"] is None
    assert state["preflight"] is None and state["reports"] == []
    assert client_for(desk_users["Ops"]).get("/").status_code == 200


def test_void_approval_of_an_older_config_version(client_for, desk):
    desk.rollout.config_version = 3
    desk.rollout.save()
    approvals = client_for(desk.users["Ops"]).get("/desk/state.json", **JSON).json()["approvals"]
    assert [a["current"] for a in approvals] == [False, False]


# --------------------------------------------------------------------------- no N+1


def _grow(desk, n: int) -> None:
    from alerts.models import Alert
    from canary.models import GateEvaluation
    from tests.desk.factories import seed_orders
    from trading.models import Position

    now = timezone.now()
    seed_orders(desk.deployment, now, n=n)
    Alert.objects.bulk_create(
        Alert(
            detector="volatility",
            symbol="ETH/BTC",
            dedupe_key=uuid.uuid4().hex,
            detected_at=now,
            acknowledged_at=now if i % 2 else None,
            acknowledged_by=desk.users["Ops"] if i % 2 else None,
        )
        for i in range(n)
    )
    GateEvaluation.objects.bulk_create(
        GateEvaluation(
            rollout=desk.rollout,
            phase=desk.phases[1],
            evaluated_at=now - timedelta(seconds=i + 90),
            metrics={},
            verdict="PASS",
        )
        for i in range(n)
    )
    Position.objects.bulk_create(
        Position(deployment=desk.deployment, symbol=f"X{i}/BTC", qty=1.0, last_price=1.0)
        for i in range(n)
    )


def _count(client, path: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(path, **JSON).status_code == 200
    return len(ctx.captured_queries)


def test_query_count_does_not_grow_with_the_data(client_for, desk, django_assert_max_num_queries):
    client = client_for(desk.users["Ops"])
    client.get("/desk/state.json", **JSON)
    small = {p: _count(client, p) for p in ("/", "/desk/state.json")}
    _grow(desk, 60)
    large = {p: _count(client, p) for p in ("/", "/desk/state.json")}
    assert large == small
    with django_assert_max_num_queries(22):
        client.get("/", **JSON)


# --------------------------------------------------------------------------- actions


def _halt(client, desk, **extra):
    data = {"deployment": desk.deployment.pk, "reason": "slippage spiking", "confirm": "on"}
    data.update(extra)
    return client.post("/desk/halt", data, **JSON)


def test_ops_halts_and_it_is_audited(client_for, desk, killswitch_redis):
    from canary.killswitch import read_state
    from trading.models import Deployment

    client = client_for(desk.users["Ops"])
    response = _halt(client, desk)
    assert response.status_code == 200, response.content
    assert response.json() == {"ok": True, "message": "smc-ethbtc halted: no new orders"}
    assert read_state(desk.deployment.pk) == "HALTED"
    assert Deployment.objects.get(pk=desk.deployment.pk).kill_switch == "HALTED"
    event = AuditEvent.objects.get(action="killswitch.set")
    assert event.actor == "ops" and event.payload["reason"] == "slippage spiking"
    assert event.payload["to"] == "HALTED"
    state = client.get("/desk/state.json", **JSON).json()
    assert state["kill_switch"]["state"] == "HALTED"
    assert state["audit"][0]["action"] == "killswitch.set"


def test_viewer_forged_halt_is_refused_and_audited(client_for, desk, killswitch_redis):
    from trading.models import Deployment

    killswitch_redis.set(f"killswitch:{desk.deployment.pk}", "ACTIVE")
    response = _halt(client_for(desk.users["Viewer"]), desk)
    assert response.status_code == 403
    assert response.json() == {"error": "halt needs the audit.trigger_rollback permission"}
    assert killswitch_redis.get(f"killswitch:{desk.deployment.pk}") == b"ACTIVE"
    assert Deployment.objects.get(pk=desk.deployment.pk).kill_switch == "ACTIVE"
    refusal = AuditEvent.objects.get(action="permission.refused")
    assert refusal.actor == "viewer" and refusal.target_id == "halt"
    assert not AuditEvent.objects.filter(action="killswitch.set").exists()


def test_halt_needs_the_csrf_token(desk):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(desk.users["Ops"])
    response = _halt(client, desk)
    assert response.status_code == 403
    assert b"CSRF" in response.content


def test_halt_needs_reason_and_confirmation(client_for, desk):
    client = client_for(desk.users["Ops"])
    response = _halt(client, desk, reason="", confirm="")
    assert response.status_code == 400
    message = response.json()["message"]
    assert "reason" in message and "tick the box to confirm" in message
    assert _halt(client, desk, deployment=999999).status_code == 404


def test_halt_with_redis_down_says_it_was_not_applied(client_for, desk, monkeypatch):
    from canary import killswitch

    def down(*args, **kwargs):
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(killswitch, "write_redis", down)
    response = _halt(client_for(desk.users["Ops"]), desk)
    assert response.status_code == 503
    assert "halt NOT applied" in response.json()["message"]
    assert AuditEvent.objects.filter(action="desk.halt_failed", actor="ops").exists()


def test_form_post_without_javascript_redirects_with_a_message(client_for, desk, killswitch_redis):
    client = client_for(desk.users["Ops"])
    data = {"deployment": desk.deployment.pk, "reason": "manual stop", "confirm": "on"}
    response = client.post("/desk/halt", data, follow=True)
    assert response.redirect_chain == [("/", 302)]
    assert b"smc-ethbtc halted: no new orders" in response.content


def test_rollback_delegates_to_the_safety_service(client_for, desk, monkeypatch):
    from canary import dashboard

    calls = []

    class Done:
        pk = 41

    def rollback_request(**kwargs):
        calls.append(kwargs)
        return Done()

    monkeypatch.setattr(dashboard, "_rollback_service", lambda: rollback_request)
    client = client_for(desk.users["Alpha"])
    data = {"deployment": desk.deployment.pk, "reason": "drawdown accelerating", "confirm": "on"}
    response = client.post("/desk/rollback", data, **JSON)
    assert response.json() == {"ok": True, "message": "rollback #41 of smc-ethbtc started"}
    (call,) = calls
    assert call["deployment"] == desk.deployment and call["rollout"] == desk.rollout
    assert call["trigger"] == "person" and call["cause"] == "drawdown accelerating"
    assert call["actor"] == desk.users["Alpha"]


def test_rollback_adapter_halts_until_the_runner_exists(
    client_for, desk, killswitch_redis, monkeypatch
):
    from canary import dashboard
    from canary.killswitch import read_state

    monkeypatch.setattr(dashboard, "_rollback_service", lambda: None)
    data = {"deployment": desk.deployment.pk, "reason": "drawdown accelerating", "confirm": "on"}
    response = client_for(desk.users["Planner"]).post("/desk/rollback", data, **JSON)
    assert response.status_code == 200 and "halted" in response.json()["message"]
    assert read_state(desk.deployment.pk) == "HALTED"
    event = AuditEvent.objects.get(action="desk.rollback_requested")
    assert event.actor == "planner" and event.payload["rollout"] == desk.rollout.pk


def test_viewer_rollback_is_refused(client_for, desk):
    data = {"deployment": desk.deployment.pk, "reason": "x" * 10, "confirm": "on"}
    response = client_for(desk.users["Viewer"]).post("/desk/rollback", data, **JSON)
    assert response.status_code == 403
    assert AuditEvent.objects.filter(action="permission.refused", target_id="rollback").exists()


def test_get_on_an_action_is_not_allowed(client_for, desk):
    assert client_for(desk.users["Ops"]).get("/desk/halt").status_code == 405


def test_health_round_trips_on_its_own_layer_instance(db):
    from channels.layers import get_channel_layer

    from canary.health import CHECKS, health_report

    shared = get_channel_layer()
    assert CHECKS["channel_layer"]() == {"ok": True}
    assert getattr(shared, "receive_count", 0) == 0, "the shared layer was not used"
    healthy, report = health_report()
    assert report["components"]["channel_layer"]["ok"] is True
    assert set(report["components"]) == {"database", "redis", "channel_layer", "worker", "beat"}
