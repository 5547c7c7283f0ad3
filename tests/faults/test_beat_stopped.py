"""Beat stopped: uvicorn, a Celery worker and beat on a private Redis, heartbeats every
second and stale after 3 s; beat is SIGKILLed. /health must say so (503, beat not ok) and
an alert must be raised. (A stale heartbeat written by hand: tests/config/test_health.py.)
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import pytest

from .harness import flush_database, private_stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STALE_S = 3.0
WAIT_FOR_ALERT_S = 8.0


@dataclass
class Outcome:
    before: tuple[int, dict]
    after: tuple[int, dict]
    alerts: list[tuple[str, str, str]]


def _health(live) -> tuple[int, dict]:
    try:
        return live.request("GET", "/health")
    except OSError as exc:
        return 0, {"error": str(exc)}


def _run() -> Outcome:
    from alerts.models import Alert

    env = {"HEARTBEAT_INTERVAL_S": "1", "HEARTBEAT_STALE_S": str(STALE_S)}
    with private_stack(env, beat=True) as (live, _):
        before = wait_for(
            lambda: (h := _health(live))[0] == 200 and h, 60, lambda: f"healthy {_health(live)}"
        )
        live.stack.kill("beat", signal.SIGKILL)
        after = wait_for(
            lambda: (h := _health(live))[0] == 503 and not h[1]["components"]["beat"]["ok"] and h,
            30,
            "beat reported stale",
        )
        time.sleep(WAIT_FOR_ALERT_S)
        alerts = list(Alert.objects.values_list("source", "detector", "message"))
    return Outcome(before, after, alerts)


@pytest.fixture(scope="module")
def outcome(django_db_setup, django_db_blocker, request) -> Outcome:
    if request.config.redis_problem:
        pytest.skip(request.config.redis_problem)
    with django_db_blocker.unblock():
        try:
            result = _run()
        except Exception as exc:  # not an AssertionError: no xfail may swallow it
            raise RuntimeError(f"the scenario did not run: {exc}") from exc
        finally:
            flush_database()
    components = result.after[1]["components"]
    print(f"\nbeat stopped: /health {result.after[0]} {components}; alerts {result.alerts}")
    return result


def test_health_says_beat_is_down(outcome: Outcome):
    status, body = outcome.after
    assert outcome.before[0] == 200
    assert status == 503 and body["status"] == "degraded"
    assert body["components"]["beat"]["ok"] is False
    assert body["components"]["beat"]["age_s"] >= STALE_S
    assert body["components"]["database"]["ok"] and body["components"]["redis"]["ok"]


def test_an_alert_is_raised_when_beat_stops(outcome: Outcome):
    assert any("beat" in " ".join(row).lower() for row in outcome.alerts), outcome.alerts
