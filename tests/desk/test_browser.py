"""The desk in a real browser: Debian's Chromium driven by Playwright against a real stack
(uvicorn, Celery worker, beat) on the test database. Each test saves screenshots to
test-artifacts/screenshots/."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.alerts.helpers import engulfing_pair, quiet_then_spike
from tests.e2e.conftest import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TIMEOUT_MS = 20_000


@dataclass
class LiveDesk:
    stack: object
    desk: object
    passwords: dict[str, str]
    token: str


@pytest.fixture
def live_desk(desk_stack, roles) -> Iterator[LiveDesk]:
    """The seeded desk, committed, with real (PBKDF2) passwords the server can check."""
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    from canary.heartbeat import redis_client
    from canary.killswitch import write_redis
    from tests.desk.factories import seed_desk
    from trading.models import KillSwitch

    users, passwords = {}, {}
    for role in ("Ops", "Viewer", "Alpha", "Planner"):
        passwords[role] = "pw-" + uuid.uuid4().hex
        user = User.objects.create_user(
            username=role.lower(), email=f"{role.lower()}@example.test", password=passwords[role]
        )
        user.groups.add(Group.objects.get(name=role))
        users[role] = user
    desk = seed_desk(users)
    redis_client.cache_clear()
    write_redis(desk.deployment.pk, KillSwitch.ACTIVE)
    token = Token.objects.create(user=users["Ops"]).key
    yield LiveDesk(desk_stack, desk, passwords, token)
    redis_client().delete(f"killswitch:{desk.deployment.pk}")


@pytest.fixture
def open_page(browser, live_desk, screenshot_dir, request):
    contexts = []
    pages = []

    def open_as(role: str):
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}"))
        page.errors = errors  # type: ignore[attr-defined]
        pages.append(page)
        page.goto(live_desk.stack.base_url + "/")
        assert "/login/" in page.url, "the desk needs a login"
        sign_in(page, role.lower(), live_desk.passwords[role])
        page.wait_for_selector("#ws-status.s-pass")
        return page

    yield open_as
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for i, page in enumerate(pages):
            page.screenshot(path=str(screenshot_dir / f"FAILED-{request.node.name}-{i}.png"))
            print("\n".join(page.errors))
    for context in contexts:
        context.close()


def sign_in(page, username: str, password: str) -> None:
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("form button[type=submit]")
    page.wait_for_selector("#desk-root")


def shot(page, screenshot_dir, name: str) -> None:
    page.screenshot(path=str(screenshot_dir / f"desk-{name}.png"), full_page=True)


def audit_actions(**filters) -> list[str]:
    from audit.models import AuditEvent

    return list(AuditEvent.objects.filter(**filters).values_list("action", flat=True))


def test_ops_sees_an_alert_arrive_and_acknowledges_it(open_page, live_desk, screenshot_dir):
    from alerts.models import Alert

    page = open_page("Ops")
    page.wait_for_selector("#gates-body tr[data-metric=slippage_bps]")
    assert page.locator("#phases > li").count() == 3
    assert "ETH/BTC SMC go-live" in page.inner_text("#rollout-name")
    assert "in progress" in page.inner_text("#phases > li:nth-child(2)")
    assert "outside target" in page.inner_text("#gates-body tr[data-metric=slippage_bps]")
    assert page.locator("#equity-chart canvas").count() == 2
    assert page.inner_text("#ks-badge").endswith("ACTIVE")
    assert page.locator("#halt-open").is_visible()
    shot(page, screenshot_dir, "01-ops")

    page.evaluate("window.__sameDocument = true")
    spike = quiet_then_spike()
    candles = spike + engulfing_pair(len(spike), spike[-1]["close"])
    status, body = live_desk.stack.request(
        "POST", "/api/v1/market/candles", candles, live_desk.token
    )
    assert status == 201, body
    page.wait_for_selector("#alert-list li[data-alert-id]:has-text('volatility')")
    page.wait_for_selector("#alert-list li[data-alert-id]:has-text('engulfing')")
    assert page.evaluate("window.__sameDocument") is True, "the alerts arrived without a reload"
    shot(page, screenshot_dir, "02-alerts-arrived")
    unacked = Alert.objects.filter(suppressed=False, acknowledged_at__isnull=True).count()
    assert f"{unacked} unacknowledged" in page.inner_text("#alerts-sub")

    volatility = Alert.objects.get(detector="volatility")
    item = page.locator(f"#alert-list li[data-alert-id='{volatility.pk}']")
    item.get_by_role("button", name=re.compile("^Acknowledge alert")).click()
    item.locator(".acked-by", has_text="Acknowledged by ops").wait_for()
    wait_until(lambda: Alert.objects.get(pk=volatility.pk).acknowledged_by_id is not None)
    assert audit_actions(action="alert.acknowledge", actor="ops", target_id=str(volatility.pk))
    page.wait_for_selector("#audit-body tr[data-action='alert.acknowledge']")
    assert "alert.acknowledge" in page.inner_text("#audit-body")

    engulfing = page.locator("#alert-list li[data-alert-id]", has_text="engulfing")
    engulfing.get_by_role("button", name=re.compile("^Silence")).click()
    dialog = page.locator("#silence-dialog")
    dialog.get_by_label("Reason").fill("engulfing noisy during the test")
    shot(page, screenshot_dir, "03-silence-dialog")
    dialog.get_by_role("button", name="Silence").click()
    page.wait_for_selector(".toast:has-text('Silenced until')")
    wait_until(lambda: audit_actions(action="alert.silence", actor="ops"))
    assert [e for e in page.errors if not e.startswith("console")] == []
    shot(page, screenshot_dir, "04-acknowledged-and-silenced")


def test_ops_halts_after_confirming_with_a_reason(open_page, live_desk, screenshot_dir):
    from canary.killswitch import read_state

    page = open_page("Ops")
    page.click("#halt-open")
    dialog = page.locator("#halt-dialog")
    dialog.get_by_role("button", name="Halt trading").click()
    assert dialog.is_visible(), "no halt without a reason and the confirmation"
    assert read_state(live_desk.desk.deployment.pk) == "ACTIVE"
    dialog.get_by_label("Reason").fill("slippage above target for 20 minutes")
    dialog.get_by_label("I confirm: halt trading now").check()
    shot(page, screenshot_dir, "05-halt-dialog")
    dialog.get_by_role("button", name="Halt trading").click()
    page.wait_for_selector("#ks-badge:has-text('HALTED')")
    assert "no orders are placed" in page.inner_text("#ks-words")
    assert read_state(live_desk.desk.deployment.pk) == "HALTED"
    from audit.models import AuditEvent

    event = AuditEvent.objects.get(action="killswitch.set")
    assert (
        event.actor == "ops" and event.payload["reason"] == "slippage above target for 20 minutes"
    )
    page.wait_for_selector("#audit-body tr[data-action='killswitch.set']")
    shot(page, screenshot_dir, "06-halted")


FORGED_HALT = """async (deployment) => {
  const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
  const body = new FormData();
  body.append("deployment", deployment);
  body.append("reason", "forged by a viewer");
  body.append("confirm", "on");
  const resp = await fetch("/desk/halt", {method: "POST", body,
    headers: {"X-CSRFToken": token, "Accept": "application/json"}});
  return {status: resp.status, body: await resp.json()};
}"""


def test_viewer_has_no_halt_and_a_forged_halt_is_refused(open_page, live_desk, screenshot_dir):
    from canary.killswitch import read_state

    page = open_page("Viewer")
    page.wait_for_selector("#gates-body tr")
    assert page.locator("#halt-open").count() == 0
    assert page.locator("#rollback-open").count() == 0
    assert page.locator("#alert-list button").count() == 0
    shot(page, screenshot_dir, "07-viewer")
    result = page.evaluate(FORGED_HALT, live_desk.desk.deployment.pk)
    assert result == {
        "status": 403,
        "body": {"error": "halt needs the audit.trigger_rollback permission"},
    }
    assert read_state(live_desk.desk.deployment.pk) == "ACTIVE"
    assert audit_actions(action="permission.refused", actor="viewer", target_id="halt")
    assert not audit_actions(action="killswitch.set")


def test_feed_reconnects_after_a_server_restart_and_catches_up(
    open_page, live_desk, screenshot_dir
):
    from alerts.models import Alert
    from alerts.services import alert_raise

    page = open_page("Ops")
    page.evaluate("window.__sameDocument = true")
    stack = live_desk.stack
    stack.stack.kill("web")
    page.wait_for_selector("#ws-status.s-warn:has-text('reconnecting')")
    page.wait_for_selector("body.stale")
    assert "server unreachable" in page.inner_text("#poll-status")
    shot(page, screenshot_dir, "08-reconnecting")

    missed = alert_raise(
        source="watchdog",
        key=f"stream-silent-{uuid.uuid4().hex[:6]}",
        message="market stream binance:ETH/BTC:5m silent for 45 s",
        symbol="ETH/BTC",
    )
    stack.stack.start_web(stack.port)
    page.wait_for_selector("#ws-status.s-pass")
    item = page.locator(f"#alert-list li[data-alert-id='{missed.pk}']")
    item.wait_for()
    page.wait_for_selector("#poll-status.s-pass")
    assert page.locator("body.stale").count() == 0
    assert page.evaluate("window.__sameDocument") is True
    shot(page, screenshot_dir, "09-reconnected")

    item.get_by_role("button", name=re.compile("^Acknowledge alert")).click()
    item.locator(".acked-by").wait_for()
    wait_until(lambda: Alert.objects.get(pk=missed.pk).acknowledged_at is not None)


def test_expired_session_goes_to_login_and_restores_the_draft(open_page, live_desk, screenshot_dir):
    page = open_page("Ops")
    page.click("#halt-open")
    page.locator("#halt-dialog").get_by_label("Reason").fill("half-typed reason, not sent")
    page.context.clear_cookies()
    page.wait_for_selector("#banner:has-text('Your session has expired')")
    assert page.locator("#halt-dialog").is_visible() is False
    shot(page, screenshot_dir, "10-session-expired")
    page.wait_for_url(re.compile(r"/login/\?next=%2F&expired=1$"))
    assert "Your session expired" in page.inner_text("main")
    sign_in(page, "ops", live_desk.passwords["Ops"])
    dialog = page.locator("#halt-dialog")
    dialog.wait_for()
    assert dialog.get_by_label("Reason").input_value() == "half-typed reason, not sent"
    assert "Nothing was sent" in dialog.inner_text()
    shot(page, screenshot_dir, "11-draft-restored")
    from audit.models import AuditEvent

    sets = list(AuditEvent.objects.filter(action="killswitch.set").values("actor", "payload"))
    assert not sets, sets


def test_stored_report_is_listed_and_opens(open_page, live_desk, screenshot_dir, settings):
    from datetime import date

    from canary.reports import daily_report_run

    settings.VAR_DIR = live_desk.stack.var_dir
    daily_report_run(day=date(2018, 1, 16), send=False)
    page = open_page("Viewer")
    link = page.locator("#report-list a", has_text="2018-01-16")
    link.wait_for()
    link.click()
    page.wait_for_selector("text=No data for 2018-01-16.")
    image = page.locator("img[alt^='Equity and drawdown chart']")
    image.wait_for()
    page.wait_for_function(
        "() => { const i = document.querySelector(\"img[alt^='Equity and drawdown chart']\");"
        " return i && i.complete; }"
    )
    assert image.evaluate("img => img.naturalWidth") == 720
    shot(page, screenshot_dir, "12-report")
    assert json.loads((live_desk.stack.var_dir / "reports" / "2018-01-16.json").read_text())
