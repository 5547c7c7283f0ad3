"""Market data silent during a phase: the beat's watchdog task, on a frozen clock, rolls
back the deployment after more than SAFETY_STREAM_SILENT_S (30 s) of silence and not
before. (45 s of silence outside a rollout: tests/safety/test_rollback.py
test_stream_watchdog_rolls_back_an_active_deployment.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

pytestmark = [pytest.mark.django_db(transaction=True)]

HEARD = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


@pytest.fixture
def phase(deployment_factory, safety_tmp, redis_url, monkeypatch):
    """A paper deployment trading in phase 1 of a RUNNING rollout, its stream last heard
    of at HEARD; rollbacks are recorded, their runs not queued."""
    from canary import killswitch
    from canary.models import Phase, Rollout
    from trading.models import KillSwitch, MarketStream

    queued: list[int] = []
    monkeypatch.setattr("canary.rollback.enqueue_run", lambda pk, queue=None: queued.append(pk))
    deployment = deployment_factory()
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    MarketStream.objects.create(
        exchange="paper", symbol="ETH/BTC", timeframe="5m", last_received_at=HEARD
    )
    started = HEARD - timedelta(minutes=10)
    rollout = Rollout.objects.create(
        deployment=deployment, name="silence", state="RUNNING", current_phase=1,
        plan=[{"allocation": 0.1, "min_duration_s": 1800, "extension_s": 600}],
        created_at=started, started_at=started,
    )  # fmt: skip
    Phase.objects.create(
        rollout=rollout, index=1, allocation=0.1, min_duration_s=1800, extension_s=600,
        started_at=started, ends_at=started + timedelta(minutes=30),
    )  # fmt: skip
    return deployment, rollout, queued


@pytest.mark.parametrize(("silent_s", "rolls_back"), [(29, False), (30, False), (31, True)])
def test_stream_silence_rolls_back_after_30_s_only(phase, silent_s, rolls_back):
    from canary import killswitch
    from canary.models import Rollback
    from canary.safety_tasks import watchdogs_task

    deployment, rollout, queued = phase
    with time_machine.travel(HEARD + timedelta(seconds=silent_s), tick=False):
        watchdogs_task()
    rollbacks = list(Rollback.objects.filter(deployment=deployment))
    state = killswitch.read_state(deployment.pk).value
    if not rolls_back:
        assert rollbacks == [] and queued == [] and state == "ACTIVE"
        return
    [rollback] = rollbacks
    assert rollback.trigger == "watchdog" and rollback.rollout_id == rollout.pk
    assert rollback.cause == f"market stream silent for {silent_s} s (limit 30 s)"
    assert rollback.reasons == [{"metric": "stream_gap_s", "value": silent_s, "limit": 30.0}]
    assert rollback.started_at == HEARD + timedelta(seconds=silent_s)
    assert queued == [rollback.pk] and state == "REDUCING"
