"""The kill switch of a deployment: ACTIVE, REDUCING (position-reducing orders only) or
HALTED. Authoritative in Redis, mirrored in trading.Deployment.kill_switch.

Fail closed: a Redis error or a missing key means "unreadable", and the order router
places nothing. Nothing is cached, so a change reaches every worker's next order.
"""

from __future__ import annotations

import time

import redis
from django.db import transaction

from audit.services import audit_record
from trading.models import Deployment, KillSwitch

from .heartbeat import redis_client

KEY = "killswitch:{deployment_id}"


class KillSwitchUnreadable(Exception):
    """The kill switch could not be read: trading is not allowed."""


def key(deployment_id: int) -> str:
    return KEY.format(deployment_id=deployment_id)


def read_state(deployment_id: int) -> KillSwitch:
    try:
        raw = redis_client().get(key(deployment_id))
    except redis.RedisError as exc:
        raise KillSwitchUnreadable(f"Redis unavailable: {type(exc).__name__}") from exc
    if raw is None:
        raise KillSwitchUnreadable("kill switch is not set in Redis")
    try:
        return KillSwitch(raw.decode())
    except ValueError as exc:
        raise KillSwitchUnreadable(f"unknown kill switch value {raw!r}") from exc


def allows(state: KillSwitch, *, reduce_only: bool) -> bool:
    if state == KillSwitch.ACTIVE:
        return True
    return state == KillSwitch.REDUCING and reduce_only


def write_redis(deployment_id: int, state: KillSwitch) -> None:
    """Redis only: used by the rollback when the database is unreachable."""
    redis_client().set(key(deployment_id), state.value)


def set_state(
    *, deployment: Deployment, state: KillSwitch, actor, reason: str, request=None
) -> None:
    """Switch and mirror. Redis is written first: a halt must take effect even if the
    database write that follows fails."""
    write_redis(deployment.pk, state)
    with transaction.atomic():
        previous = Deployment.objects.select_for_update().get(pk=deployment.pk).kill_switch
        Deployment.objects.filter(pk=deployment.pk).update(kill_switch=state)
        audit_record(
            action="killswitch.set",
            actor=actor,
            target=deployment,
            payload={"from": previous, "to": state.value, "reason": reason},
            request=request,
        )
    deployment.kill_switch = state


def resync_mirror(deployment: Deployment) -> KillSwitch | None:
    """Bring the database mirror in line with Redis (after the database was down)."""
    try:
        state = read_state(deployment.pk)
    except KillSwitchUnreadable:
        return None
    if deployment.kill_switch != state:
        Deployment.objects.filter(pk=deployment.pk).update(kill_switch=state)
    return state


def reseed_missing() -> list[int]:
    """Redis came back without its data (restarted without persistence): every deployment
    whose key is missing gets back the state its database mirror holds, the last one set
    through ``set_state`` (SET NX: a switch made meanwhile is never overwritten), with an
    audit record and a warning alert. Until then the key reads "unreadable" and the router
    places nothing. Returns the deployment ids re-seeded ([] when Redis is unreachable;
    those re-seeded before Redis failed part-way, each with its record)."""
    from . import safety_adapters

    rows = list(Deployment.objects.order_by("pk").values_list("pk", "kill_switch"))
    if not rows:
        return []
    client = redis_client()
    reseeded: list[tuple[int, str]] = []
    try:
        current = client.mget([key(pk) for pk, _ in rows])
        missing = [
            (pk, state) for (pk, state), raw in zip(rows, current, strict=True) if raw is None
        ]
        for pk, state in missing:
            if client.set(key(pk), state, nx=True):
                reseeded.append((pk, state))
    except redis.RedisError:
        pass  # the keys set so far are no longer missing: their records are made below
    for pk, state in reseeded:
        reason = "Redis held no kill switch for the deployment (restarted without its data?)"
        with transaction.atomic():
            audit_record(
                action="killswitch.reseeded",
                actor="watchdog",
                target_type=Deployment._meta.label,
                target_id=pk,
                payload={"to": state, "from": "missing", "reason": reason},
            )
            safety_adapters.raise_alert(
                key=f"killswitch-reseeded:{pk}:{state}:{int(time.time())}",
                severity="warning",
                message=f"Kill switch of deployment {pk} was missing in Redis: restored to "
                f"{state} from the database",
                payload={"deployment_id": pk, "state": state},
            )
    return [pk for pk, _ in reseeded]
