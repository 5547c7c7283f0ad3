"""The canary monitor step: metrics of the phase window -> engine verdict -> lifecycle
decision -> services. Time is passed in (``now``): the beat task passes the wall clock,
the rehearsal the candle clock.

Per rollout and step, in one transaction: lock the rollout, compute the metrics in SQL,
evaluate, decide, store a ``GateEvaluation`` and apply the decision through the services
(each writing its audit record). RUNNING rollouts follow every decision; PAUSED and LIVE
ones keep being judged with the breaker armed (a FAIL rolls back) but are not promoted,
extended or paused. ROLLING_BACK rollouts become ROLLED_BACK once their rollback is flat.

Canary alerts: a WARNING (once per run of WARNINGs), every FAIL (breaker or not), and each
state change (from the services).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection, transaction

from trading.rows import ModelRows, execute, fetch_one, sql_once

from . import services
from .engine import (
    METRIC_NAMES,
    Action,
    Decision,
    Metrics,
    Outcome,
    Thresholds,
    Verdict,
    decide,
    evaluate,
)
from .metrics import phase_metrics
from .models import GateEvaluation, Phase, Rollback, RollbackState, Rollout, RolloutState

logger = logging.getLogger(__name__)

DB_FAILURE_KEY = "canary:dbfail:{deployment_id}"
STEP_STATES = (*services.MONITORED_STATES, RolloutState.ROLLING_BACK)


@dataclass
class StepResult:
    rollout_id: int
    state: str
    phase: int | None = None
    verdict: str | None = None
    action: str = Action.NONE.value
    reasons: list[str] = field(default_factory=list)
    evaluation_id: int | None = None
    error: str | None = None
    # (index, started_at, ends_at) of the current phase as the step left it, when the step
    # extended it (the only change it made to the phase): not part of ``to_dict``.
    phase_times: tuple[int, datetime | None, datetime | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout_id,
            "state": self.state,
            "phase": self.phase,
            "verdict": self.verdict,
            "action": self.action,
            "reasons": self.reasons,
            "evaluation": self.evaluation_id,
            "error": self.error,
        }


_FOLLOWED_WHEN_LINKED = (
    RollbackState.RUNNING,
    RollbackState.STAGE1_DONE,
    RollbackState.COMPLETED,
)


def monitor_all(*, now: datetime) -> list[StepResult]:
    """One step for every rollout that is being monitored; one failing rollout never
    stops the others."""
    rows = list(
        Rollout.objects.filter(state__in=STEP_STATES)
        .order_by("pk")
        .values_list("pk", "deployment_id", "state")
    )
    results = []
    for rollout_id, deployment_id, state in rows:
        try:
            results.append(monitor_step(rollout_id=rollout_id, now=now))
        except DatabaseError as exc:
            lost = _database_lost()
            if lost:
                _fail_closed(deployment_id)
            logger.exception("canary monitor: rollout %s (database lost: %s)", rollout_id, lost)
            results.append(StepResult(rollout_id, state, error=f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - logged, reported, the loop goes on
            logger.exception("canary monitor: rollout %s", rollout_id)
            results.append(StepResult(rollout_id, state, error=f"{type(exc).__name__}: {exc}"))
    return results


def monitor_step(
    *, rollout_id: int, now: datetime, before: Callable[[], Any] | None = None
) -> StepResult:
    """One step of one rollout. ``before``: the caller's own writes, made first in the
    step's transaction (the rehearsal's buffered strategy rows: one commit instead of
    two); they must open no savepoint."""
    with transaction.atomic():
        if before is not None:
            before()
        rollout = services.lock_rollout(rollout_id)
        if rollout.state == RolloutState.ROLLING_BACK:
            rollout = services.rollout_settle_rollback(rollout=rollout, now=now)
            return StepResult(rollout.pk, rollout.state, rollout.current_phase or None)
        if rollout.state not in services.MONITORED_STATES:
            return StepResult(rollout.pk, rollout.state, rollout.current_phase or None)
        # A rollback running for the deployment, or one linked to this rollout that is
        # already past stage 1 (replayed from the journal after the database came back),
        # and the current phase: one query on every step, after the lock.
        phase, running_id = _phase_and_rollback(rollout)
        if running_id is not None:
            running = Rollback.objects.get(pk=running_id)
            rollout = services.rollout_join_rollback(rollout=rollout, rollback=running, now=now)
            return StepResult(rollout.pk, rollout.state, rollout.current_phase or None)
        return _evaluate_and_act(rollout, phase, now)


def _sql_literal(value: str) -> str:
    """A constant of this module (a state name) as an SQL string literal."""
    if not value.replace("_", "").isalnum():
        raise ValueError(f"not a state name: {value!r}")
    return f"'{value}'"


def _phase_and_rollback_sql(connection: Any) -> str:
    # The states are written as literals: SQLite prepares a statement again on every run
    # when a bound value could change its plan, as ``state = %s`` could (the partial unique
    # index of one RUNNING rollback per deployment); the newest rollback is the MAX id.
    qn = connection.ops.quote_name
    running = _sql_literal(RollbackState.RUNNING.value)
    followed = ", ".join(_sql_literal(s.value) for s in _FOLLOWED_WHEN_LINKED)
    rollback = (
        f"SELECT MAX(b.{qn('id')}) FROM {qn(Rollback._meta.db_table)} b"
        f" WHERE (b.{qn('deployment_id')} = %s AND b.{qn('state')} = {running})"
        f" OR (b.{qn('rollout_id')} = %s AND b.{qn('state')} IN ({followed}))"
    )
    return (
        f"SELECT ({rollback}), {services.PHASE_ROWS.columns(connection)}"
        f" FROM (SELECT 1 AS one) o LEFT JOIN {qn(Phase._meta.db_table)} p"
        f" ON p.{qn('rollout_id')} = %s AND p.{qn('index')} = %s"
    )


def _phase_and_rollback(rollout: Rollout) -> tuple[Phase | None, int | None]:
    """(the current phase, the newest rollback to join) of a locked rollout."""
    connection = transaction.get_connection()
    sql = sql_once(connection, ("phase_and_rollback",), lambda: _phase_and_rollback_sql(connection))
    params = [rollout.deployment_id, rollout.pk, rollout.pk, rollout.current_phase or 0]
    with connection.cursor() as cursor:
        execute(cursor, sql, params)
        running_id, *values = cursor.fetchone()
    if values[0] is None:  # no phase row (its id is NULL)
        return None, running_id
    return services.PHASE_ROWS.instance(connection, values), running_id


def _evaluate_and_act(rollout: Rollout, phase: Phase | None, now: datetime) -> StepResult:
    if phase is None or phase.started_at is None:
        return StepResult(rollout.pk, rollout.state, error="no current phase")
    thresholds = _thresholds(rollout.thresholds)
    with _db_failure_asked(rollout.deployment_id) as db_failure:
        metrics = phase_metrics(deployment=rollout.deployment, since=phase.started_at, now=now)
        if db_failure():
            metrics = replace(metrics, db_ok=False)
    verdict = evaluate(metrics, thresholds, phase.index)
    decision = _decision(rollout, phase, verdict, now)
    connection = transaction.get_connection()
    previous_verdict = None
    if verdict.outcome is Outcome.WARNING:
        previous_verdict = _previous_verdict(connection, phase.pk)
    reasons = [r.message for r in verdict.reasons]
    evaluation_id = _EVALUATION_ROWS.insert(
        connection,
        {
            "rollout_id": rollout.pk,
            "phase_id": phase.pk,
            "evaluated_at": now,
            "metrics": _metrics_json(metrics),
            "verdict": verdict.outcome.value,
            "reasons": reasons,
            "action": decision.action.value,
        },
    )
    _alert_verdict(rollout, phase, verdict, evaluation_id, previous_verdict, now)
    extended = None
    if decision.action is not Action.NONE:
        # The services that change the rollout copy its new state into this instance.
        extended = _apply(rollout, phase, verdict, decision, now)
    return StepResult(
        rollout.pk,
        rollout.state,
        phase.index,
        verdict.outcome.value,
        decision.action.value,
        reasons,
        evaluation_id,
        phase_times=None
        if extended is None
        else (extended.index, extended.started_at, extended.ends_at),
    )


_EVALUATION_ROWS = ModelRows(GateEvaluation, "e")
_THRESHOLDS: dict[str, Thresholds] = {}


def _thresholds(raw: Any) -> Thresholds:
    """``Thresholds.from_dict``, kept per distinct JSON (the rollout's thresholds are read
    on every step and validated once); a ``ThresholdError`` is raised every time."""
    try:
        key = json.dumps(raw or {}, sort_keys=True)
    except (TypeError, ValueError):
        return Thresholds.from_dict(raw or {})
    thresholds = _THRESHOLDS.get(key)
    if thresholds is None:
        thresholds = Thresholds.from_dict(raw or {})
        if len(_THRESHOLDS) > 256:
            _THRESHOLDS.clear()
        _THRESHOLDS[key] = thresholds
    return thresholds


def _previous_verdict(connection: Any, phase_id: int) -> str | None:
    """The verdict of the phase's last evaluation (``phase.evaluations.order_by(
    "-evaluated_at", "-id")``'s first)."""

    def build() -> str:
        qn = connection.ops.quote_name
        return (
            f"SELECT {qn('verdict')} FROM {qn(GateEvaluation._meta.db_table)}"
            f" WHERE {qn('phase_id')} = %s ORDER BY {qn('evaluated_at')} DESC, {qn('id')} DESC"
            " LIMIT 1"
        )

    row = fetch_one(connection, ("previous_verdict",), build, [phase_id])
    return None if row is None else row[0]


def _metrics_json(metrics: Metrics) -> dict[str, Any]:
    """``dataclasses.asdict`` of the (flat) metrics."""
    return {name: getattr(metrics, name) for name in METRIC_NAMES}


def _decision(rollout: Rollout, phase: Phase, verdict: Verdict, now: datetime) -> Decision:
    started = phase.started_at
    assert started is not None
    ends_at = phase.ends_at or started
    decision = decide(
        verdict,
        phase_elapsed_s=(now - started).total_seconds(),
        min_duration_s=(ends_at - started).total_seconds(),
        previous_warning=phase.consecutive_warnings > 0,
        needs_manual_promote=phase.needs_manual_promote,
        is_last_phase=phase.index >= len(rollout.plan or []),
    )
    if rollout.state == RolloutState.RUNNING or decision.action is Action.ROLLBACK:
        return decision
    return Decision(Action.NONE, f"rollout {rollout.state}: only a FAIL acts")


def _apply(
    rollout: Rollout, phase: Phase, verdict: Verdict, decision: Decision, now: datetime
) -> Phase | None:
    """Apply the decision; the phase as extended for an EXTEND."""
    action = decision.action
    reasons = [r.message for r in verdict.reasons]
    detail = f"{decision.reason}: {'; '.join(reasons)}" if reasons else decision.reason
    actor = services.SYSTEM_ACTOR
    if action is Action.ROLLBACK:
        breaker = " (circuit breaker)" if verdict.breaker_tripped else ""
        services.rollout_rollback(
            rollout=rollout,
            actor=actor,
            reason=f"verdict FAIL in phase {phase.index}{breaker}: {'; '.join(reasons)}"[:300],
            reasons=reasons,
            trigger="gate",
            now=now,
        )
    elif action is Action.PROMOTE:
        services.rollout_promote(rollout=rollout, actor=actor, reason=decision.reason, now=now)
    elif action is Action.MARK_LIVE:
        services.rollout_mark_live(rollout=rollout, actor=actor, reason=decision.reason, now=now)
    elif action is Action.EXTEND:
        warning = verdict.outcome is Outcome.WARNING
        return services.phase_extend(
            rollout=rollout, phase=phase, warning=warning, reason=detail, now=now
        )
    elif action is Action.PAUSE:
        services.rollout_pause(rollout=rollout, actor=actor, reason=detail[:300], now=now)
    elif action is Action.AWAIT_PROMOTE:
        _await_promote(rollout, phase, now)
    return None


def _await_promote(rollout: Rollout, phase: Phase, now: datetime) -> None:
    """Once per phase: the phase passed and waits for a person's promote."""
    if phase.outcome == "AWAIT_PROMOTE":
        return
    phase.outcome = "AWAIT_PROMOTE"
    phase.save(update_fields=["outcome"])
    services.phase_reset_warnings(phase=phase)
    from audit.services import audit_record

    audit_record(
        action="rollout.await_promote",
        actor=services.SYSTEM_ACTOR,
        target=rollout,
        payload={"phase": phase.index},
    )
    services.rollout_alert(
        rollout,
        kind="await_promote",
        severity="warning",
        message=f"phase {phase.index} passed; waiting for a person's promote",
        now=now,
    )


def _alert_verdict(
    rollout: Rollout,
    phase: Phase,
    verdict: Verdict,
    evaluation_id: int,
    previous_verdict: str | None,
    now: datetime,
) -> None:
    warning = verdict.outcome is Outcome.WARNING and previous_verdict != Outcome.WARNING.value
    if verdict.outcome is not Outcome.FAIL and not warning:
        return  # no alert (a WARNING: once per run of WARNINGs)
    reasons = "; ".join(r.message for r in verdict.reasons)
    payload = {
        "rollout": rollout.pk,
        "phase": phase.index,
        "evaluation": evaluation_id,
        "verdict": verdict.outcome.value,
        "reasons": [r.message for r in verdict.reasons],
    }
    if verdict.outcome is Outcome.FAIL:
        kind = "breaker" if verdict.breaker_tripped else "fail"
        title = "circuit breaker tripped" if verdict.breaker_tripped else "gate FAIL"
        services.canary_alert(
            key=f"rollout:{rollout.pk}:{kind}:{evaluation_id}",
            severity="critical",
            message=f"{rollout.name}: {title} in phase {phase.index}: {reasons}",
            payload={**payload, "kind": kind},
        )
    else:
        services.canary_alert(
            key=f"rollout:{rollout.pk}:warning:{evaluation_id}",
            severity="warning",
            message=f"{rollout.name}: WARNING in phase {phase.index}: {reasons}",
            payload={**payload, "kind": "warning"},
        )


# --- database loss: fail closed -----------------------------------------------------------


def _database_lost() -> bool:
    """A query failed: is the database gone (a fresh connection cannot answer), or was it
    a transient error the next step retries?"""
    with contextlib.suppress(Exception):
        connection.close()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:  # noqa: BLE001 - any failure here means the database is lost
        return True
    return False


def _fail_closed(deployment_id: int) -> None:
    """No database: halt the deployment in Redis (the order router reads it there) and
    remember it, so that the next step with a database judges ``db_ok=False`` (FAIL) and
    starts the rollback."""
    from trading.models import KillSwitch

    from . import killswitch
    from .heartbeat import redis_client

    try:
        killswitch.write_redis(deployment_id, KillSwitch.HALTED)
        redis_client().set(DB_FAILURE_KEY.format(deployment_id=deployment_id), "1", ex=86400)
    except Exception:  # noqa: BLE001 - nothing else can be done without DB and Redis
        logger.critical("deployment %s: database and Redis unreachable", deployment_id)


def _consume_db_failure(deployment_id: int) -> bool:
    from .heartbeat import redis_client

    try:
        return bool(redis_client().getdel(DB_FAILURE_KEY.format(deployment_id=deployment_id)))
    except Exception:  # noqa: BLE001 - no Redis: no remembered failure
        return False


@contextlib.contextmanager
def _db_failure_asked(deployment_id: int) -> Iterator[Callable[[], bool]]:
    """``_consume_db_failure`` asked early: an EXISTS of the flag is sent on entry (before
    the metrics' SQL) and its reply read by the callable, so that the round trip to Redis
    overlaps the step's queries instead of adding to them. The flag is consumed (GETDEL,
    whose answer decides) only when it exists, so that a step never takes it without
    acting on it; a flag set after the EXISTS is found by the next step. Without a
    connection to Redis there is no remembered failure (as for ``_consume_db_failure``);
    a question that failed on the way is asked again by ``_consume_db_failure`` itself."""
    from .heartbeat import redis_client

    pool = conn = None
    try:
        pool = redis_client().connection_pool
        conn = pool.get_connection()  # connected, with the client's retries
    except Exception:  # noqa: BLE001 - no Redis: no remembered failure
        conn = None
    sent = False
    if conn is not None:
        try:
            conn.send_command("EXISTS", DB_FAILURE_KEY.format(deployment_id=deployment_id))
            sent = True
        except Exception:  # noqa: BLE001 - asked again the usual way, with its retries
            pool.release(conn)
    pending = sent

    def answer() -> bool:
        nonlocal pending
        if not pending:
            return conn is not None and _consume_db_failure(deployment_id)
        pending = False
        try:
            found = conn.read_response()
        except Exception:  # noqa: BLE001 - asked again the usual way, with its retries
            conn.disconnect()
            found = True
        finally:
            pool.release(conn)
        return bool(found) and _consume_db_failure(deployment_id)

    try:
        yield answer
    finally:
        if pending:  # never answered (the step failed first): its reply is left unread
            conn.disconnect()
            pool.release(conn)
