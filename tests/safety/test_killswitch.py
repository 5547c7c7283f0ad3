"""The kill switch: a change reaches another process's very next read (nothing cached),
and a process whose Redis is unreachable reads "unreadable" and allows nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from canary import killswitch
from canary.heartbeat import redis_client
from trading.models import KillSwitch

ROOT = Path(__file__).resolve().parents[2]
READER = """
import sys
import django
django.setup()
from canary.killswitch import KillSwitchUnreadable, allows, read_state
for line in sys.stdin:
    try:
        state = read_state(int(line))
        print(state.value, allows(state, reduce_only=False), allows(state, reduce_only=True), flush=True)
    except KillSwitchUnreadable:
        print("UNREADABLE", False, False, flush=True)
"""


class Reader:
    """A separate, long-lived process answering one read per line."""

    def __init__(self, redis_url: str):
        env = dict(os.environ, REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read(self, deployment_id: int) -> str:
        self.proc.stdin.write(f"{deployment_id}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=20)


@pytest.mark.django_db
def test_a_change_reaches_another_process_next_read(make_deployment, redis_url):
    deployment = make_deployment()
    reader = Reader(redis_url)
    try:
        killswitch.set_state(deployment=deployment, state=KillSwitch.ACTIVE, actor="t", reason="go")
        assert reader.read(deployment.pk) == "ACTIVE True True"
        killswitch.set_state(
            deployment=deployment, state=KillSwitch.REDUCING, actor="t", reason="r"
        )
        assert reader.read(deployment.pk) == "REDUCING False True"
        killswitch.set_state(deployment=deployment, state=KillSwitch.HALTED, actor="t", reason="h")
        assert reader.read(deployment.pk) == "HALTED False False"
        redis_client().delete(killswitch.key(deployment.pk))
        assert reader.read(deployment.pk) == "UNREADABLE False False"
    finally:
        reader.close()
    deployment.refresh_from_db()
    assert deployment.kill_switch == KillSwitch.HALTED


@pytest.mark.django_db
def test_fail_closed_when_redis_is_down(make_deployment, redis_url, settings):
    deployment = make_deployment()
    killswitch.write_redis(deployment.pk, KillSwitch.ACTIVE)
    reader = Reader("redis://127.0.0.1:1/0")
    try:
        assert reader.read(deployment.pk) == "UNREADABLE False False"
    finally:
        reader.close()
    settings.REDIS_URL, working = "redis://127.0.0.1:1/0", settings.REDIS_URL
    redis_client.cache_clear()
    try:
        with pytest.raises(killswitch.KillSwitchUnreadable, match="Redis unavailable"):
            killswitch.read_state(deployment.pk)
    finally:
        settings.REDIS_URL = working
        redis_client.cache_clear()


@pytest.mark.django_db
def test_a_key_lost_with_redis_is_reseeded_from_the_mirror_once(make_deployment, redis_url):
    from alerts.models import Alert
    from audit.models import AuditEvent
    from canary.watchdogs import watchdogs_tick

    halted, active = make_deployment(), make_deployment()
    killswitch.set_state(deployment=halted, state=KillSwitch.HALTED, actor="t", reason="h")
    killswitch.set_state(deployment=active, state=KillSwitch.ACTIVE, actor="t", reason="go")
    client = redis_client()
    client.delete(killswitch.key(halted.pk), killswitch.key(active.pk))  # Redis lost its data
    with pytest.raises(killswitch.KillSwitchUnreadable):
        killswitch.read_state(active.pk)

    assert sorted(killswitch.reseed_missing()) == sorted([halted.pk, active.pk])
    assert killswitch.read_state(halted.pk) == KillSwitch.HALTED
    assert killswitch.read_state(active.pk) == KillSwitch.ACTIVE
    reseeded = AuditEvent.objects.filter(action="killswitch.reseeded")
    assert {(e.target_id, e.payload["to"]) for e in reseeded} == {
        (str(halted.pk), "HALTED"),
        (str(active.pk), "ACTIVE"),
    }
    assert Alert.objects.filter(dedupe_key__startswith="canary:killswitch-reseeded:").count() == 2

    killswitch.write_redis(active.pk, KillSwitch.REDUCING)  # set in Redis first, as set_state
    assert killswitch.reseed_missing() == []
    assert killswitch.read_state(active.pk) == KillSwitch.REDUCING

    client.delete(killswitch.key(halted.pk))  # the watchdog's tick does it
    assert watchdogs_tick()["reseeded"] == [halted.pk]
    assert killswitch.read_state(halted.pk) == KillSwitch.HALTED


class FailsOnSecondSet:
    """A Redis client whose second SET fails (Redis going away part-way through)."""

    def __init__(self, client):
        self.client, self.sets = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def set(self, *args, **kwargs):
        self.sets += 1
        if self.sets == 2:
            raise redis.ConnectionError("Redis went away")
        return self.client.set(*args, **kwargs)


@pytest.mark.django_db
def test_keys_reseeded_before_redis_fails_part_way_are_recorded(
    make_deployment, redis_url, monkeypatch
):
    from audit.models import AuditEvent

    first, second = sorted([make_deployment(), make_deployment()], key=lambda d: d.pk)
    for deployment in (first, second):
        killswitch.set_state(deployment=deployment, state=KillSwitch.HALTED, actor="t", reason="h")
    client = redis_client()
    client.delete(killswitch.key(first.pk), killswitch.key(second.pk))
    monkeypatch.setattr(killswitch, "redis_client", lambda: FailsOnSecondSet(client))

    assert killswitch.reseed_missing() == [first.pk]
    assert killswitch.read_state(first.pk) == KillSwitch.HALTED
    reseeded = AuditEvent.objects.filter(action="killswitch.reseeded")
    assert [e.target_id for e in reseeded] == [str(first.pk)]
    monkeypatch.setattr(killswitch, "redis_client", redis_client)
    assert killswitch.reseed_missing() == [second.pk]
