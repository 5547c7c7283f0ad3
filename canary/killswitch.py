"""The kill switch of a deployment: ACTIVE, REDUCING (position-reducing orders only) or
HALTED. Authoritative in Redis, mirrored in trading.Deployment.kill_switch.

Fail closed: a Redis error or a missing key means "unreadable", and the order router
places nothing. Nothing is cached, so a change reaches every worker's next order.
"""

from __future__ import annotations

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
