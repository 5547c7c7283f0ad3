"""Staged rollback of a deployment: services.

- `rollback_request(...)`: start a rollback, or join the open one (idempotent).
- `rollback_run(rollback_id)`: run or resume stages 1 and 2 (Celery: canary.rollback_run).
- `rollback_run_offline(deployment_id, cause=...)`: stage 1 with the database down.
- `journal_replay_pending()`: write journaled stage-1 records once the database is back.
- `rollback_restore(...)`: stage 3, by a person holding audit.restore_database.

Stage 1 (canary.stage1) flattens and halts, target < SAFETY_STAGE1_TARGET_S, measured and
reported. Stage 2 captures the recent error log records and the triggering evaluation,
snapshots the database, computes the P&L impact and stores the report. The deployment
stays HALTED until a person resumes it; nothing here ever loosens the kill switch.

A run holds the deployment's lease (canary.stage1.Lease: Redis, and online the database
lock that excludes runs of processes on other Redis namespaces too): a second run of the
same deployment waits for it or returns, a run whose worker died is resumed at worker start
(canary.watchdogs.resume_at_worker_start) or by the watchdog once its lease has expired.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.core import serializers
from django.db import Error as DatabaseError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from audit.services import audit_record
from trading.models import Deployment, Fill, KillSwitch, Order, OrderStatus, Position

from . import killswitch, safety_adapters
from .heartbeat import redis_client
from .journal import Journal, JournalState, now_iso, pending_journals, recent_errors
from .models import Backup, GateEvaluation, Rollback, RollbackState, RollbackStep, Rollout
from .stage1 import (
    DONE,
    DeploymentSnapshot,
    Intent,
    Lease,
    Recorder,
    Stage1,
    active_clear,
    active_get,
    active_set,
    close_cids,
    jsonable,
    settle_order,
    snapshot_load,
    snapshot_store,
    stage1_timing,
)

log = logging.getLogger("canary.rollback")

OPEN_STATES = (RollbackState.RUNNING, RollbackState.STAGE1_DONE)
TRIGGERS = ("gate", "watchdog", "person")
STAGE2 = ("capture_logs", "snapshot_db", "pnl_impact", "report")


class RollbackDenied(Exception):
    """Not allowed: permission, missing cause or reason, wrong state."""


def rollback_key(rollback: Rollback) -> str:
    return str((rollback.report or {}).get("journal_key") or rollback.pk)


def _require(actor: Any, permission: str) -> None:
    if not getattr(actor, "is_authenticated", False):
        raise RollbackDenied(f"a person holding {permission} is required")
    if not actor.has_perm(permission):
        raise RollbackDenied(f"{actor.get_username()} lacks the permission {permission}")


def _actor_name(actor: Any) -> str:
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()
    return str(actor or "system")


# --------------------------------------------------------------------------- request


def _tighten_now(deployment_id: int) -> None:
    """REDUCING at once, before any database work; never loosens HALTED."""
    try:
        if killswitch.read_state(deployment_id) != KillSwitch.ACTIVE:
            return
    except killswitch.KillSwitchUnreadable:
        pass
    with contextlib.suppress(redis.RedisError):
        killswitch.write_redis(deployment_id, KillSwitch.REDUCING)


def rollback_request(
    *,
    deployment: Deployment,
    rollout: Rollout | None = None,
    trigger: str,
    cause: str,
    reasons: Iterable[Any] = (),
    actor: Any,
    request: Any = None,
) -> Rollback:
    """Start a rollback, or join the open one of this deployment (recorded, run once).

    Triggers: "gate" (the engine's FAIL reasons), "watchdog", "person" (needs
    audit.trigger_rollback). New entries stop at once (kill switch REDUCING in Redis);
    stage 1 is queued when the row is committed.
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    if trigger == "person":
        _require(actor, "audit.trigger_rollback")
    if not cause.strip():
        raise RollbackDenied("a cause is required")
    _tighten_now(deployment.pk)
    args = (deployment, rollout, trigger, cause, jsonable(list(reasons)), actor, request)
    try:
        rollback, created = _create_or_join(*args)
    except IntegrityError:  # a concurrent request created it first: join it
        rollback, created = _create_or_join(*args)
    snapshot_store(DeploymentSnapshot.of(deployment))
    if created:
        active_set(deployment.pk, rollback_key(rollback))
    return rollback


def _create_or_join(
    deployment: Deployment,
    rollout: Rollout | None,
    trigger: str,
    cause: str,
    reasons: list[Any],
    actor: Any,
    request: Any,
) -> tuple[Rollback, bool]:
    with transaction.atomic():
        Deployment.objects.select_for_update().get(pk=deployment.pk)
        existing = Rollback.objects.filter(deployment=deployment, state__in=OPEN_STATES).first()
        if existing is not None:
            joined = {
                "at": timezone.now().isoformat(),
                "trigger": trigger,
                "cause": cause[:300],
                "by": _actor_name(actor),
            }
            existing.report = {
                **existing.report,
                "joined": [*existing.report.get("joined", []), joined],
            }
            existing.save(update_fields=["report"])
            audit_record(
                action="rollback.joined",
                actor=actor,
                target=existing,
                payload=joined,
                request=request,
            )
            return existing, False
        rollback = Rollback.objects.create(
            deployment=deployment,
            rollout=rollout,
            trigger=trigger,
            cause=cause[:300],
            reasons=reasons,
            requested_by=_actor_name(actor)[:150],
            started_at=timezone.now(),
            report={"runs": 0},
        )
        audit_record(
            action="rollback.requested",
            actor=actor,
            target=rollback,
            payload={"trigger": trigger, "cause": cause[:300], "reasons": reasons},
            request=request,
        )
        transaction.on_commit(lambda: enqueue_run(rollback.pk), robust=True)
    return rollback, True


def enqueue_run(rollback_id: int, queue: str | None = None) -> None:
    """Queue canary.rollback_run; if the broker refuses, run it in a thread right here."""
    from kombu.exceptions import OperationalError

    from .safety_tasks import rollback_run_task

    if rollback_run_task.app.conf.task_always_eager:
        rollback_run_task.apply(args=[rollback_id], throw=True)
        return
    try:
        rollback_run_task.apply_async(args=[rollback_id], **({"queue": queue} if queue else {}))
    except (OperationalError, OSError) as exc:  # broker down: never lose a rollback
        log.error("could not queue rollback %s (%s); running it in this process", rollback_id, exc)
        threading.Thread(target=rollback_run, args=(rollback_id,), daemon=True).start()


# --------------------------------------------------------------------------- run


def rollback_run(rollback_id: int) -> Rollback | None:
    """Run or resume stages 1 and 2. Safe to call any number of times, concurrently too:
    one run per deployment holds the lease; another waits for it (a dead worker's lease
    expires) and then finds the work done, or returns if it is still held."""
    journal_replay_pending()
    rollback = Rollback.objects.select_related("deployment").filter(pk=rollback_id).first()
    if rollback is None or rollback.state not in OPEN_STATES:
        return rollback
    lease = Lease(rollback.deployment_id, database=True)
    if not lease.acquire(wait_s=lease.ttl + 1, db_wait_s=settings.SAFETY_STAGE1_TARGET_S):
        return rollback
    try:
        rollback.refresh_from_db()
        if rollback.state not in OPEN_STATES:  # the run that held the lease finished it
            return rollback
        rollback = _count_run(rollback)
        if rollback.state == RollbackState.RUNNING:
            _run_stage1(rollback)
        rollback.refresh_from_db()
        if rollback.state == RollbackState.STAGE1_DONE:
            _run_stage2(rollback)
            rollback.refresh_from_db()
    except DatabaseError as exc:
        log.error(
            "rollback %s: database lost; stage 1 journaled, stage 2 waits: %s", rollback_id, exc
        )
    finally:
        lease.release()
    return rollback


def _count_run(rollback: Rollback) -> Rollback:
    with transaction.atomic():
        rb = Rollback.objects.select_for_update().select_related("deployment").get(pk=rollback.pk)
        runs = int(rb.report.get("runs", 0)) + 1
        rb.report = {**rb.report, "runs": runs}
        if runs > settings.SAFETY_ROLLBACK_MAX_RUNS:
            rb.state, rb.ended_at = RollbackState.FAILED, timezone.now()
            audit_record(
                action="rollback.failed", actor="rollback", target=rb, payload={"runs": runs}
            )
            safety_adapters.raise_alert(
                key=f"rollback:{rb.pk}:failed",
                message=f"Rollback {rb.pk} gave up after {runs - 1} runs; it needs a person",
                payload={"rollback": rb.pk, "deployment": rb.deployment_id},
            )
        rb.save(update_fields=["report", "state", "ended_at"])
    return rb


def _header(rollback: Rollback) -> dict[str, Any]:
    return {
        "trigger": rollback.trigger,
        "cause": rollback.cause,
        "reasons": rollback.reasons,
        "requested_by": rollback.requested_by,
        "started_at": rollback.started_at.isoformat(),
    }


def _run_stage1(rollback: Rollback) -> None:
    snapshot = DeploymentSnapshot.of(rollback.deployment)
    snapshot_store(snapshot)
    key = rollback_key(rollback)
    active_set(snapshot.id, key)
    recorder = Recorder(key=key, snapshot=snapshot, rollback=rollback, header=_header(rollback))
    stage = Stage1(
        key=key,
        snapshot=snapshot,
        adapter=safety_adapters.exchange_for(rollback.deployment),
        recorder=recorder,
        cause=rollback.cause,
        resumed=rollback.report.get("runs", 1) > 1,
    )
    complete, summary = stage.run()
    if complete:
        recorder.stage1_done(summary)


def rollback_run_offline(
    deployment_id: int, *, cause: str, trigger: str = "watchdog"
) -> str | None:
    """Stage 1 with the database unreachable: Redis and the exchange only, journaled.

    Continues the deployment's open rollback (same key, same closing ids) when Redis knows
    one. Returns the journal key; None when another run holds the lease or Redis has no
    snapshot of the deployment."""
    snapshot = snapshot_load(deployment_id)
    if snapshot is None:
        log.critical("database down, no snapshot of deployment %s in Redis", deployment_id)
        return None
    lease = Lease(deployment_id)
    if not lease.acquire(wait_s=0):
        return None
    try:
        key = active_get(deployment_id) or f"j{uuid.uuid4().hex[:12]}"
        active_set(deployment_id, key)
        journal = Journal(settings.SAFETY_JOURNAL_DIR, key)
        header = {
            "trigger": trigger,
            "cause": cause[:300],
            "reasons": [],
            "requested_by": trigger,
            "started_at": now_iso(),
        }
        recorder = Recorder(key=key, snapshot=snapshot, rollback=None, header=header)
        stage = Stage1(
            key=key,
            snapshot=snapshot,
            adapter=safety_adapters.exchange_for(snapshot.unsaved()),
            recorder=recorder,
            cause=cause,
            resumed=journal.exists() or not key.startswith("j"),
        )
        complete, summary = stage.run()
        if complete:
            recorder.stage1_done(summary)
        return key
    finally:
        lease.release()


# --------------------------------------------------------------------------- replay


def journal_replay_pending() -> list[int]:
    """Replay every local journal whose deployment is not being flattened right now."""
    replayed = []
    for journal in pending_journals(settings.SAFETY_JOURNAL_DIR):
        state = journal.state()
        deployment_id = (state.header.get("deployment") or {}).get("id")
        if deployment_id is None or Lease.held(int(deployment_id)):
            continue
        try:
            rollback = journal_replay(journal, state)
        except DatabaseError as exc:
            log.error("journal %s not replayed yet: %s", journal.key, exc)
            break
        if rollback is not None:
            replayed.append(rollback.pk)
    return replayed


def journal_replay(journal: Journal, state: JournalState | None = None) -> Rollback | None:
    """Write a journal's records into the database in one transaction, then archive it.
    Idempotent: steps by (rollback, name), orders by client order id."""
    state = state or journal.state()
    if not state.header:
        return None
    with transaction.atomic():
        rollback = _replay_rollback(state)
        _replay_steps(rollback, state)
        for line in state.orders.values():
            settle_order(rollback.deployment_id, Intent.from_line(line))
        _replay_effects(rollback, state)
        audit_record(
            action="rollback.journal_replayed",
            actor="rollback",
            target=rollback,
            payload={"key": state.key, "steps": len(state.steps), "orders": len(state.orders)},
        )
        for alert in state.alerts:
            safety_adapters.raise_alert(
                key=alert["key"], message=alert["message"], payload=alert.get("payload")
            )
        # In this order, once committed: the journal is archived before the run it queues
        # (which replays pending journals first) can see it.
        transaction.on_commit(journal.archive)
        if state.stage1_done:
            transaction.on_commit(lambda: active_clear(rollback.deployment_id, state.key))
            transaction.on_commit(lambda: _forget_db_failure(rollback.deployment_id))
        if rollback.state in OPEN_STATES:
            transaction.on_commit(lambda: enqueue_run(rollback.pk), robust=True)
    return rollback


def _replay_rollback(state: JournalState) -> Rollback:
    rollback = None
    if state.header.get("rollback_id"):
        rollback = Rollback.objects.filter(pk=state.header["rollback_id"]).first()
    if rollback is None:
        rollback = Rollback.objects.filter(report__journal_key=state.key).first()
    if rollback is None and state.key.isdigit():
        # an offline run that continued an open rollback (``rollback_run_offline`` takes
        # the deployment's active key: that rollback's id, ``rollback_key``)
        rollback = Rollback.objects.filter(
            pk=int(state.key), deployment_id=state.header["deployment"]["id"]
        ).first()
    if rollback is None:
        rollback = _replay_create(state)
    if state.stage1_done and rollback.state == RollbackState.RUNNING:
        ended = parse_datetime(state.stage1_done["at"]) or timezone.now()
        summary = state.stage1_done.get("summary", {})
        rollback.state, rollback.stage1_ended_at = RollbackState.STAGE1_DONE, ended
        rollback.report = {**rollback.report, "stage1": stage1_timing(rollback, summary, ended)}
        rollback.save(update_fields=["state", "stage1_ended_at", "report"])
    return rollback


# The rollout states a rollback of their deployment takes over (services.MONITORED_STATES
# and ROLLING_BACK; not imported from services, which imports this module).
_ROLLOUT_FOLLOWS = ("RUNNING", "PAUSED", "LIVE", "ROLLING_BACK")


def _forget_db_failure(deployment_id: int) -> None:
    """The offline stage 1 flattened what the monitor's fail-closed halt left open."""
    from .monitor import DB_FAILURE_KEY

    with contextlib.suppress(redis.RedisError):
        redis_client().delete(DB_FAILURE_KEY.format(deployment_id=deployment_id))


def _replay_create(state: JournalState) -> Rollback:
    header = state.header
    deployment_id = header["deployment"]["id"]
    rollout = (
        Rollout.objects.filter(deployment_id=deployment_id, state__in=_ROLLOUT_FOLLOWS)
        .order_by("-pk")
        .first()
    )
    fields: dict[str, Any] = {
        "deployment_id": deployment_id,
        "rollout": rollout,
        "trigger": header.get("trigger", "watchdog"),
        "cause": str(header.get("cause", ""))[:300],
        "reasons": header.get("reasons", []),
        "requested_by": str(header.get("requested_by", "watchdog"))[:150],
        "started_at": parse_datetime(header.get("started_at") or header["at"]),
        "report": {"journal_key": state.key, "runs": 1, "offline": True},
    }
    try:
        with transaction.atomic():
            rollback = Rollback.objects.create(**fields)
    except IntegrityError:  # another rollback of this deployment is RUNNING
        done = RollbackState.STAGE1_DONE if state.stage1_done else RollbackState.FAILED
        fields["state"], fields["report"]["superseded"] = done, True
        rollback = Rollback.objects.create(**fields)
    audit_record(
        action="rollback.requested",
        actor=fields["requested_by"],
        target=rollback,
        payload={"trigger": fields["trigger"], "cause": fields["cause"], "offline": True},
    )
    return rollback


def _replay_steps(rollback: Rollback, state: JournalState) -> None:
    recorded = dict(
        RollbackStep.objects.filter(rollback=rollback).values_list("name", "started_at")
    )
    for name, line in state.steps.items():
        # a step begun online and ended offline: its start is the recorded one
        started = parse_datetime(line["started_at"]) if line.get("started_at") else None
        started = started or recorded.get(name) or parse_datetime(line["at"])
        ended = parse_datetime(line["ended_at"]) if line.get("ended_at") else None
        outcome = line.get("outcome", "")
        RollbackStep.objects.update_or_create(
            rollback=rollback,
            name=name,
            defaults={
                "stage": line.get("stage", 1),
                "started_at": started,
                "ended_at": ended,
                "outcome": outcome,
                "detail": line.get("detail", {}),
            },
        )
        audit_record(
            action="rollback.step",
            actor="rollback",
            target=rollback,
            payload={
                "step": name,
                "stage": line.get("stage", 1),
                "outcome": outcome,
                "journaled": True,
            },
        )


def _replay_effects(rollback: Rollback, state: JournalState) -> None:
    deployment = Deployment.objects.get(pk=rollback.deployment_id)
    if state.killswitch:
        now = killswitch.resync_mirror(deployment)
        audit_record(
            action="killswitch.set",
            actor="rollback",
            target=deployment,
            payload={
                "to": now.value if now else "unreadable",
                "journaled": [k["state"] for k in state.killswitch],
                "reason": f"rollback {state.key}",
            },
        )
    if state.signals_disabled and deployment.signals_enabled:
        Deployment.objects.filter(pk=deployment.pk).update(signals_enabled=False)
        audit_record(
            action="deployment.signals_disabled",
            actor="rollback",
            target=deployment,
            payload={"rollback": state.key, "journaled": True},
        )


# --------------------------------------------------------------------------- stage 2


def _run_stage2(rollback: Rollback) -> None:
    steps: dict[str, Callable[[Rollback], dict[str, Any]]] = {
        "capture_logs": _capture_logs,
        "snapshot_db": _snapshot_db,
        "pnl_impact": _pnl_step,
        "report": _report_step,
    }
    done = {s.name: s.outcome for s in RollbackStep.objects.filter(rollback=rollback, stage=2)}
    for name in STAGE2:
        if done.get(name) not in DONE and _stage2_step(rollback, name, steps[name]) != "ok":
            return
    with transaction.atomic():
        rb = Rollback.objects.select_for_update().get(pk=rollback.pk)
        rb.state, rb.ended_at = RollbackState.COMPLETED, timezone.now()
        rb.save(update_fields=["state", "ended_at"])
        audit_record(
            action="rollback.completed",
            actor="rollback",
            target=rb,
            payload={"stage1": rb.report.get("stage1", {}), "pnl": rb.report.get("pnl", {})},
        )


def _stage2_step(rollback: Rollback, name: str, fn: Callable[[Rollback], dict[str, Any]]) -> str:
    RollbackStep.objects.update_or_create(
        rollback=rollback,
        name=name,
        defaults={"stage": 2, "started_at": timezone.now(), "ended_at": None, "outcome": ""},
    )
    try:
        detail, outcome = fn(rollback), "ok"
    except Exception as exc:  # noqa: BLE001 - recorded; retried on the next run
        log.exception("rollback %s: stage 2 step %s failed", rollback.pk, name)
        detail, outcome = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}, "failed"
    with transaction.atomic():
        step = RollbackStep.objects.select_for_update().get(rollback=rollback, name=name)
        step.ended_at, step.outcome, step.detail = timezone.now(), outcome, jsonable(detail)
        step.save(update_fields=["ended_at", "outcome", "detail"])
        audit_record(
            action="rollback.step",
            actor="rollback",
            target=rollback,
            payload={"step": name, "stage": 2, "outcome": outcome},
        )
    return outcome


def _evaluation(rollback: Rollback) -> dict[str, Any] | None:
    if rollback.rollout_id is None:
        return None
    evaluation = GateEvaluation.objects.filter(
        rollout_id=rollback.rollout_id, evaluated_at__lte=rollback.started_at
    ).first()
    if evaluation is None:
        return None
    return {
        "id": evaluation.pk,
        "evaluated_at": evaluation.evaluated_at.isoformat(),
        "verdict": evaluation.verdict,
        "reasons": evaluation.reasons,
        "metrics": evaluation.metrics,
        "action": evaluation.action,
    }


def _capture_logs(rollback: Rollback) -> dict[str, Any]:
    bad = [OrderStatus.ERROR, OrderStatus.REJECTED, OrderStatus.UNKNOWN]
    order_errors = Order.objects.filter(
        deployment_id=rollback.deployment_id,
        created_at__gte=rollback.started_at - timedelta(hours=1),
        status__in=bad,
    ).order_by("-created_at")[:50]
    return {
        "errors": recent_errors(100),
        "evaluation": _evaluation(rollback),
        "reasons": rollback.reasons,
        "order_errors": [
            {
                "client_order_id": o.client_order_id,
                "symbol": o.symbol,
                "purpose": o.purpose,
                "status": o.status,
                "error": o.error,
                "created_at": o.created_at.isoformat(),
            }
            for o in order_errors
        ],
    }


def _snapshot_db(rollback: Rollback) -> dict[str, Any]:
    from .backup import backup_create

    backup = backup_create(actor="rollback", note=f"rollback {rollback.pk} snapshot")
    return {
        "backup": backup.pk,
        "file": Path(backup.path).name,
        "sha256": backup.sha256,
        "size_bytes": backup.size_bytes,
    }


def pnl_impact(
    *,
    holdings_before: dict[str, float],
    entries: dict[str, float],
    closes: Sequence[dict[str, Any]],
    equity: Sequence[tuple[datetime, float]],
    positions_realised: float,
) -> dict[str, Any]:
    """Pure. The rollout's P&L (equity change over its window, None without two equity
    snapshots) and the cost of flattening. `closes`: {symbol, filled, average,
    reference_price, fee} per closing order; slippage cost of a sell is (reference - fill)
    x qty (positive = against us); fees as charged (quote currency)."""
    filled = [c for c in closes if c.get("filled") and c.get("average")]
    slippage = sum(
        (c["reference_price"] - c["average"]) * c["filled"]
        for c in filled
        if c.get("reference_price")
    )
    fees = sum(c.get("fee") or 0.0 for c in closes)
    realised = sum(
        (c["average"] - entries.get(c["symbol"], c["average"])) * c["filled"] for c in filled
    )
    by_symbol: dict[str, dict[str, float]] = {}
    for c in closes:
        row = by_symbol.setdefault(
            c["symbol"],
            {"held_before": holdings_before.get(c["symbol"], 0.0), "sold": 0.0, "fees": 0.0},
        )
        row["sold"] += c.get("filled") or 0.0
        row["fees"] += c.get("fee") or 0.0
    return {
        "rollout_pnl": equity[-1][1] - equity[0][1] if len(equity) >= 2 else None,
        "positions_realised_pnl": positions_realised,
        "flatten_realised_pnl": realised,
        "flatten_slippage_cost": slippage,
        "flatten_fees": fees,
        "flatten_cost": slippage + fees,
        "closing_orders": len(closes),
        "by_symbol": by_symbol,
    }


def _closing_orders(rollback: Rollback) -> list[Order]:
    symbols = DeploymentSnapshot.of(rollback.deployment).symbols
    cids = close_cids(rollback.deployment_id, rollback_key(rollback), symbols)
    return list(Order.objects.filter(client_order_id__in=list(cids)))


def _pnl_step(rollback: Rollback) -> dict[str, Any]:
    closes = [
        {
            "symbol": o.symbol,
            "filled": o.filled_qty,
            "average": o.avg_fill_price,
            "reference_price": o.reference_price,
            "fee": o.fee,
        }
        for o in _closing_orders(rollback)
    ]
    cancel = RollbackStep.objects.filter(rollback=rollback, name="cancel_orders").first()
    holdings = dict(((cancel.detail or {}).get("holdings") or {}) if cancel else {})
    positions = list(Position.objects.filter(deployment_id=rollback.deployment_id))
    # the entry prices stage 1 read before closing (a closed position's is reset to 0)
    close = RollbackStep.objects.filter(rollback=rollback, name="close_positions").first()
    entries = {p.symbol: p.avg_entry for p in positions if p.qty > 0}
    entries.update(((close.detail or {}).get("entries") or {}) if close else {})
    rollout = rollback.rollout
    start = rollout.started_at if rollout and rollout.started_at else rollback.started_at
    equity = rollback.deployment.equity.filter(ts__gte=start).order_by("ts")
    return pnl_impact(
        holdings_before=holdings,
        entries=entries,
        closes=closes,
        equity=list(equity.values_list("ts", "equity")),
        positions_realised=sum(p.realised_pnl for p in positions),
    )


def _report_step(rollback: Rollback) -> dict[str, Any]:
    steps = list(RollbackStep.objects.filter(rollback=rollback).order_by("stage", "id"))
    details = {s.name: s.detail for s in steps}
    with transaction.atomic():
        rb = Rollback.objects.select_for_update().select_related("deployment").get(pk=rollback.pk)
        rb.report = {
            **rb.report,
            "key": rollback_key(rb),
            "deployment": {"id": rb.deployment_id, "name": rb.deployment.name},
            "rollout": rb.rollout_id,
            "trigger": rb.trigger,
            "cause": rb.cause,
            "reasons": rb.reasons,
            "requested_by": rb.requested_by,
            "started_at": rb.started_at.isoformat(),
            "stage1_ended_at": rb.stage1_ended_at.isoformat() if rb.stage1_ended_at else None,
            "steps": [_step_row(s) for s in steps],
            "holdings_before": details.get("cancel_orders", {}).get("holdings", {}),
            "flatten": details.get("close_positions", {}),
            "logs": details.get("capture_logs", {}),
            "backup": details.get("snapshot_db", {}),
            "pnl": details.get("pnl_impact", {}),
        }
        rb.save(update_fields=["report"])
    return {"keys": sorted(rb.report)}


def _step_row(step: RollbackStep) -> dict[str, Any]:
    return {
        "stage": step.stage,
        "name": step.name,
        "started_at": step.started_at.isoformat(),
        "ended_at": step.ended_at.isoformat() if step.ended_at else None,
        "outcome": step.outcome,
    }


# --------------------------------------------------------------------------- stage 3


def rollback_restore(
    *, rollback: Rollback, backup: Backup, actor: Any, reason: str, request: Any = None
) -> Rollback:
    """Stage 3: restore `backup` over the database, verify it, mark ready for restart.

    Refused, with nothing overwritten, without the permission or a reason, before stages
    1 and 2 are done, or when the backup fails verification (including: it predates the
    deployment). The rollback's own records (row, steps, closing orders and their fills)
    are carried into the restored database; the audit events the restore drops are
    exported to a file named in the new audit record. The deployment stays HALTED.
    """
    from .backup import backup_restore_file

    _require(actor, "audit.restore_database")
    if not reason.strip():
        raise RollbackDenied("a reason is required to restore a backup")
    rollback.refresh_from_db()
    if rollback.state != RollbackState.COMPLETED:
        raise RollbackDenied(f"rollback {rollback.pk} is {rollback.state}; stage 3 needs COMPLETED")
    carried = _carry(rollback)
    started = timezone.now()
    result = backup_restore_file(backup=backup, probe=_has_deployment(rollback.deployment_id))
    info = result.as_dict() | {
        "backup": backup.pk,
        "reason": reason[:300],
        "by": _actor_name(actor),
        "started_at": started.isoformat(),
        "ended_at": timezone.now().isoformat(),
    }
    with transaction.atomic():
        rb = _uncarry(carried)
        ready = result.integrity.ok
        rb.report = {**rb.report, "restore": info, "ready_for_restart": ready}
        rb.state = RollbackState.RESTORED if ready else rb.state
        rb.save(update_fields=["report", "state"])
        RollbackStep.objects.update_or_create(
            rollback=rb,
            name="restore",
            defaults={
                "stage": 3,
                "started_at": started,
                "ended_at": timezone.now(),
                "outcome": "ok" if ready else "failed",
                "detail": jsonable(info),
            },
        )
        _keep_halted(rb.deployment_id)
        audit_record(
            action="rollback.restored",
            actor=actor if _user_survived(actor) else _actor_name(actor),
            target=rb,
            payload=info,
            request=request,
        )
        if not ready:
            safety_adapters.raise_alert(
                key=f"rollback:{rb.pk}:restore",
                message=f"Restore of backup {backup.pk} fails the integrity check",
                payload=info,
            )
    return rb


def _keep_halted(deployment_id: int) -> None:
    deployment = Deployment.objects.get(pk=deployment_id)
    Deployment.objects.filter(pk=deployment_id).update(signals_enabled=False)
    killswitch.resync_mirror(deployment)


def _user_survived(actor: Any) -> bool:
    """The restored database may predate the user: audit by name then."""
    from django.contrib.auth import get_user_model

    pk = getattr(actor, "pk", None)
    return bool(pk) and get_user_model().objects.filter(pk=pk).exists()


def _has_deployment(deployment_id: int) -> Callable[[str], list[str]]:
    """A probe of the scratch restore: the backup must know the deployment."""

    def probe(alias: str) -> list[str]:
        if Deployment.objects.using(alias).filter(pk=deployment_id).exists():
            return []
        return [f"the backup predates deployment {deployment_id}"]

    return probe


def _carry(rollback: Rollback) -> str:
    orders = _closing_orders(rollback)
    fills = list(Fill.objects.filter(order__in=orders))
    steps = list(RollbackStep.objects.filter(rollback=rollback))
    return serializers.serialize("json", [rollback, *steps, *orders, *fills])


def _uncarry(data: str) -> Rollback:
    rollback_id = None
    for obj in serializers.deserialize("json", data):
        instance = obj.object
        if isinstance(instance, Rollback):
            if instance.rollout_id and not Rollout.objects.filter(pk=instance.rollout_id).exists():
                instance.rollout_id = None
            rollback_id = instance.pk
        obj.save()
    _reset_sequences([Rollback, RollbackStep, Order, Fill])
    return Rollback.objects.get(pk=rollback_id)


def _reset_sequences(models: list[type]) -> None:
    """Rows saved with their old ids: move the id sequences past them (PostgreSQL)."""
    from django.core.management.color import no_style
    from django.db import connection

    statements = connection.ops.sequence_reset_sql(no_style(), models)
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)
