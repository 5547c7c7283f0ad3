"""Watchdogs, run by beat every SAFETY_WATCHDOG_INTERVAL_S (task canary.watchdogs).

- database unreachable for SAFETY_DB_DOWN_TICKS ticks in a row: stage 1 of every
  deployment still trading (kill switch ACTIVE or REDUCING in Redis), from Redis and the
  exchange alone, journaled (rollback_run_offline);
- database back: journals replayed, deployment snapshots refreshed in Redis;
- market stream silent > SAFETY_STREAM_SILENT_S for a deployment that is ACTIVE: rollback;
- rollbacks left open by a dead worker (lease expired): queued again.

At worker start (Celery signal worker_ready) the open rollbacks are queued on the
starting worker's own queue, and wait there for the dead worker's lease to expire.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection
from django.utils import timezone

from trading.models import Deployment, KillSwitch

from . import killswitch, safety_adapters
from .heartbeat import redis_client
from .journal import Journal
from .models import Rollback, Rollout, RolloutState
from .rollback import (
    OPEN_STATES,
    enqueue_run,
    journal_replay_pending,
    rollback_request,
)
from .stage1 import (
    DeploymentSnapshot,
    Lease,
    active_get,
    rkey,
    snapshot_store,
    snapshots_all,
)

log = logging.getLogger("canary.watchdogs")
TRADING = (KillSwitch.ACTIVE, KillSwitch.REDUCING)
ROLLOUT_LIVE = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.LIVE)


def db_available() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except DatabaseError:
        with contextlib.suppress(Exception):
            connection.close()
        return False


def watchdogs_tick(now: datetime | None = None) -> dict[str, Any]:
    """One pass of every watchdog. Never raises for a component that is down."""
    now = now or timezone.now()
    if not db_available():
        return {"database": "down", "offline": _database_down()}
    _database_back()
    return {
        "database": "ok",
        "reseeded": killswitch.reseed_missing(),
        "replayed": journal_replay_pending(),
        "snapshots": snapshot_deployments(),
        "silent": stream_watch(now),
        "resumed": rollback_resume_stale(now),
    }


# --------------------------------------------------------------------------- database


def _database_down() -> list[int]:
    """Count the failed tick; from the SAFETY_DB_DOWN_TICKS-th on, queue stage 1 of every
    deployment still trading. Returns the deployment ids queued."""
    try:
        client = redis_client()
        ticks = int(client.incr(rkey("dbdown")))
        client.expire(rkey("dbdown"), int(settings.SAFETY_WATCHDOG_INTERVAL_S * 10) + 60)
        snapshots = snapshots_all()
    except redis.RedisError as exc:
        log.critical("database and Redis both unreachable: nothing can act (%s)", exc)
        return []
    if ticks < settings.SAFETY_DB_DOWN_TICKS:
        return []
    from .safety_tasks import rollback_offline_task

    queued = []
    for snapshot in snapshots:
        if _trading(snapshot.id) or _halted_before_flat(snapshot.id):
            rollback_offline_task.delay(snapshot.id, "database unreachable")
            queued.append(snapshot.id)
    return queued


def _database_back() -> None:
    with contextlib.suppress(redis.RedisError):
        redis_client().delete(rkey("dbdown"))


def _state(deployment_id: int) -> KillSwitch | None:
    try:
        return killswitch.read_state(deployment_id)
    except killswitch.KillSwitchUnreadable:
        return None


def _trading(deployment_id: int) -> bool:
    return _state(deployment_id) in TRADING


def _halted_before_flat(deployment_id: int) -> bool:
    """Halted, its positions perhaps still open: a rollback whose stage 1 has not finished
    (its key still active, its journal without stage1_done: a run that failed on the
    exchange or died, online or offline), or the monitor failing closed (database lost
    mid-step) with no stage 1 run since. Halting stopped new orders; it did not close the
    positions, so stage 1 is queued again at every tick while the database is down."""
    from .monitor import DB_FAILURE_KEY

    try:
        failed_closed = redis_client().exists(DB_FAILURE_KEY.format(deployment_id=deployment_id))
        key = active_get(deployment_id)
    except redis.RedisError:
        return False
    if key is not None:
        return not Journal(settings.SAFETY_JOURNAL_DIR, key).state().stage1_done
    return bool(failed_closed)


def snapshot_deployments() -> int:
    """Keep in Redis what stage 1 needs of every deployment that trades or rolls back."""
    open_ids = set(
        Rollback.objects.filter(state__in=OPEN_STATES).values_list("deployment_id", flat=True)
    )
    count = 0
    for deployment in Deployment.objects.all():
        if deployment.kill_switch in TRADING or deployment.pk in open_ids:
            snapshot_store(DeploymentSnapshot.of(deployment))
            count += 1
    return count


# --------------------------------------------------------------------------- streams


def stream_watch(now: datetime) -> list[int]:
    """Roll back every ACTIVE deployment whose market stream is silent for too long."""
    limit = float(settings.SAFETY_STREAM_SILENT_S)
    started = []
    for deployment in Deployment.objects.filter(kill_switch=KillSwitch.ACTIVE):
        if _state(deployment.pk) != KillSwitch.ACTIVE:  # REDUCING: already rolling back
            continue
        gap = safety_adapters.stream_gap_s(deployment, now)
        if gap <= limit:
            continue
        silent = "never heard of" if math.isinf(gap) else f"silent for {gap:.0f} s"
        rollout = Rollout.objects.filter(deployment=deployment, state__in=ROLLOUT_LIVE).first()
        rollback = rollback_request(
            deployment=deployment,
            rollout=rollout,
            trigger="watchdog",
            cause=f"market stream {silent} (limit {limit:.0f} s)",
            reasons=[
                {
                    "metric": "stream_gap_s",
                    "value": None if math.isinf(gap) else gap,
                    "limit": limit,
                }
            ],
            actor="watchdog",
        )
        started.append(rollback.pk)
    return started


# --------------------------------------------------------------------------- resume


def rollback_resume_stale(now: datetime | None = None, queue: str | None = None) -> list[int]:
    """Queue again every open rollback whose lease has expired (its worker died). A fresh
    rollback (< 10 s, never run) is left to the task its request queued."""
    now = now or timezone.now()
    queued = []
    for rollback in Rollback.objects.filter(state__in=OPEN_STATES):
        fresh = rollback.report.get("runs", 0) == 0 and now - rollback.started_at < timedelta(
            seconds=10
        )
        if fresh or Lease.held(rollback.deployment_id) or not _mark_requeued(rollback.pk):
            continue
        enqueue_run(rollback.pk, queue)
        queued.append(rollback.pk)
    return queued


def _mark_requeued(rollback_id: int) -> bool:
    """At most one re-queue per lease period and a half (the queued run takes the lease)."""
    ttl = max(int(settings.SAFETY_ROLLBACK_LEASE_S * 3), 5)
    try:
        return bool(redis_client().set(rkey("requeued", rollback_id), "1", nx=True, ex=ttl))
    except redis.RedisError:
        return True


def resume_at_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Celery worker_ready: replay journals and queue every open rollback on this worker's
    queue (in a thread: a database that is down must not hold the worker's start)."""
    queue = None
    with contextlib.suppress(Exception):
        queue = next(iter(sender.app.amqp.queues.consume_from))
    threading.Thread(target=_resume_all, args=(queue,), name="rollback-resume", daemon=True).start()


def _resume_all(queue: str | None) -> None:
    try:
        journal_replay_pending()
        for rollback_id in Rollback.objects.filter(state__in=OPEN_STATES).values_list(
            "pk", flat=True
        ):
            log.warning("worker start: resuming rollback %s", rollback_id)
            enqueue_run(rollback_id, queue)
    except DatabaseError as exc:
        log.error("worker start: rollbacks not resumed, database unavailable: %s", exc)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
