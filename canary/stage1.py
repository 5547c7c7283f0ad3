"""Stage 1 of a rollback (flatten), its records and its lease.

`Stage1.run()` performs the steps not yet done: kill switch REDUCING, signals off, cancel
open orders, close every holding with reduce-only market sells, re-read until flat, kill
switch HALTED, a critical alert. Each step is recorded with start, end and outcome by the
`Recorder`: in the database, or, from the first failing database write on (or from the
start when the database is down), in the local journal (canary.journal).

Closing orders have one id sequence per (deployment, rollback, symbol, attempt), the
order router's `trading.execution.flatten_client_id(..., "rollback-<key>", ...)`. Each is
recorded before it is sent (an Order row, or a journal line); every recorded, unsettled
close is looked up by its id (after a grace period) before anything else is sent for its
symbol; a resumed run also walks the ids on the exchange past the recorded ones; holdings
are re-read after that. So nothing is sold twice. Outcomes go through the router's
`order_record` (fills, position, cash, equity, audit). The router's own `flatten` gives
the same guarantee but closes one symbol after the other and needs the database: stage 1
closes the symbols concurrently (SAFETY_FLATTEN_WORKERS; the adapter paces the orders).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import Error as DatabaseError
from django.db import connection, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from audit.services import audit_record
from trading.exchange import (
    DuplicateOrder,
    ExchangeAdapter,
    ExchangeError,
    OrderRequest,
    OrderResult,
    OrderStatusUnknown,
    RateLimited,
    TemporaryExchangeError,
    client_order_id,
)
from trading.models import Deployment, Fill, KillSwitch, Order, OrderStatus, Position

from . import killswitch, safety_adapters
from .heartbeat import redis_client
from .journal import Journal, now_iso
from .models import Rollback, RollbackState, RollbackStep

log = logging.getLogger("canary.rollback")

DONE = ("ok", "skipped")
STEPS = (
    "reducing",
    "stop_signals",
    "cancel_orders",
    "close_positions",
    "verify_flat",
    "halt",
    "alert",
)
MAX_ATTEMPTS = 20  # as trading.execution.MAX_FLATTEN_ATTEMPTS
UNSETTLED = (OrderStatus.PENDING, OrderStatus.OPEN, OrderStatus.UNKNOWN)
Plan = dict[str, tuple[float, float | None]]


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


# --------------------------------------------------------------------------- identity


def rkey(*parts: object) -> str:
    return ":".join([settings.SAFETY_REDIS_PREFIX, *(str(p) for p in parts)])


def flatten_key(key: str) -> str:
    return f"rollback-{key}"


def close_cid(deployment_id: int, key: str, symbol: str, attempt: int) -> str:
    """The closing order id of (rollback, symbol, attempt): the router's flatten id when
    the router exists, so the online and the journaled paths share one sequence."""
    router_id = safety_adapters.optional("trading.execution", "flatten_client_id")
    if router_id is not None:
        return router_id(Deployment(pk=deployment_id), flatten_key(key), symbol, attempt)
    return client_order_id("flat", deployment_id, flatten_key(key), symbol, attempt)


def close_cids(deployment_id: int, key: str, symbols: Iterable[str]) -> dict[str, tuple[str, int]]:
    return {
        close_cid(deployment_id, key, s, k): (s, k) for s in symbols for k in range(MAX_ATTEMPTS)
    }


@dataclass(frozen=True)
class DeploymentSnapshot:
    """What stage 1 needs of a deployment, kept in Redis for when the database is down."""

    id: int
    name: str
    exchange: str
    symbols: tuple[str, ...]
    timeframe: str = "5m"

    @classmethod
    def of(cls, deployment: Deployment) -> DeploymentSnapshot:
        held = Position.objects.filter(deployment=deployment).exclude(qty=0)
        symbols = [*deployment.symbols, *held.values_list("symbol", flat=True)]
        return cls(
            deployment.pk,
            deployment.name,
            deployment.exchange,
            tuple(dict.fromkeys(symbols)),
            deployment.timeframe,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentSnapshot:
        return cls(
            int(data["id"]),
            data["name"],
            data["exchange"],
            tuple(data["symbols"]),
            data.get("timeframe", "5m"),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"symbols": list(self.symbols)}

    def unsaved(self) -> Deployment:
        return Deployment(
            id=self.id,
            name=self.name,
            exchange=self.exchange,
            symbols=list(self.symbols),
            timeframe=self.timeframe,
        )


def snapshot_store(snapshot: DeploymentSnapshot) -> None:
    with contextlib.suppress(redis.RedisError):
        redis_client().hset(rkey("deployments"), str(snapshot.id), json.dumps(snapshot.as_dict()))


def snapshot_load(deployment_id: int) -> DeploymentSnapshot | None:
    raw = redis_client().hget(rkey("deployments"), str(deployment_id))
    return DeploymentSnapshot.from_dict(json.loads(raw)) if raw else None


def snapshots_all() -> list[DeploymentSnapshot]:
    raw = redis_client().hgetall(rkey("deployments"))
    return [DeploymentSnapshot.from_dict(json.loads(v)) for v in raw.values()]


def active_set(deployment_id: int, key: str) -> None:
    with contextlib.suppress(redis.RedisError):
        redis_client().set(rkey("active", deployment_id), key)


def active_get(deployment_id: int) -> str | None:
    raw = redis_client().get(rkey("active", deployment_id))
    return raw.decode() if raw else None


def active_clear(deployment_id: int, key: str) -> None:
    with contextlib.suppress(redis.RedisError):
        if active_get(deployment_id) == key:
            redis_client().delete(rkey("active", deployment_id))


# --------------------------------------------------------------------------- lease


DB_LOCK_CLASS = 0x5AFE  # PostgreSQL advisory lock class of the rollback runs


class DatabaseLock:
    """A deployment's rollback runs exclude each other through the database too, among
    every process that uses it: whatever their Redis namespace (SAFETY_REDIS_PREFIX), and
    after a run's Redis lease lapsed. A PostgreSQL session advisory lock on a connection
    of its own, or an flock on a file beside an SQLite database; either ends with the
    process that holds it, so a killed worker never blocks the next run."""

    def __init__(self, deployment_id: int):
        self.deployment_id = deployment_id
        self._conn: Any = None
        self._file: Any = None

    @staticmethod
    def _objid(deployment_id: int) -> int:
        return deployment_id & 0x7FFFFFFF

    @staticmethod
    def _lock_path(deployment_id: int) -> str | None:
        name = str(connection.settings_dict["NAME"])
        if connection.vendor != "sqlite" or not name or name.startswith(":memory:"):
            return None
        if "mode=memory" in name:
            return None
        directory = Path(f"{name.removeprefix('file:').split('?')[0]}.locks")
        directory.mkdir(exist_ok=True)
        return str(directory / f"rollback-{deployment_id}.lock")

    def _connect(self) -> Any:
        conf = connection.settings_dict
        return connection.Database.connect(
            host=conf.get("HOST") or "127.0.0.1",
            port=conf.get("PORT") or 5432,
            user=conf.get("USER") or None,
            password=conf.get("PASSWORD") or None,
            dbname=conf["NAME"],
            autocommit=True,
            connect_timeout=5,
        )

    def try_acquire(self) -> bool:
        """True when taken (or when the database cannot say: the run goes on as before,
        under the Redis lease), False when another run holds it."""
        try:
            if connection.vendor == "postgresql":
                return self._try_postgresql()
            if connection.vendor == "sqlite":
                return self._try_sqlite()
        except Exception as exc:  # noqa: BLE001 - database down: the Redis lease decides
            log.error("rollback database lock unavailable: %s", exc)
            self.release()
        return True

    def _try_postgresql(self) -> bool:
        if self._conn is None:
            self._conn = self._connect()
        row = self._conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)",
            (DB_LOCK_CLASS, self._objid(self.deployment_id)),
        ).fetchone()
        return bool(row and row[0])

    def _try_sqlite(self) -> bool:
        import fcntl

        path = self._lock_path(self.deployment_id)
        if path is None:
            return True
        if self._file is None:
            self._file = open(path, "a+b")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                self.release()
                return False
            time.sleep(0.1)
        return True

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the session: the advisory lock goes with it
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()  # drops the flock

    @classmethod
    def held(cls, deployment_id: int) -> bool:
        """Whether a run of another connection or process holds it (False if unknown)."""
        probe = cls(deployment_id)
        try:
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d"
                        " ON d.oid = l.database WHERE l.locktype = 'advisory'"
                        " AND l.granted AND d.datname = current_database()"
                        " AND l.classid = %s AND l.objid = %s AND l.objsubid = 2)",
                        [DB_LOCK_CLASS, cls._objid(deployment_id)],
                    )
                    return bool(cursor.fetchone()[0])
            if connection.vendor == "sqlite" and cls._lock_path(deployment_id) is not None:
                return not probe._try_sqlite()
        except Exception:  # noqa: BLE001 - cannot tell: not held
            return False
        finally:
            probe.release()
        return False


class Lease:
    """A per-deployment Redis lock, renewed by a thread while the run lives; it expires
    SAFETY_ROLLBACK_LEASE_S after its worker dies. With Redis unreachable the run goes on
    unleased (closing ids and fresh holdings still keep every close single).

    `database=True` (the online runs) also takes the deployment's DatabaseLock, waiting up
    to `db_wait_s` for a run that holds it to end: two runs never interleave their writes
    even when the Redis lease cannot tell them apart."""

    def __init__(self, deployment_id: int, *, database: bool = False):
        self.name = rkey("lease", deployment_id)
        self.ttl = float(settings.SAFETY_ROLLBACK_LEASE_S)
        self._lock: Any = None
        self._stop = threading.Event()
        self.degraded = False
        self.db_lock = DatabaseLock(deployment_id) if database else None

    @staticmethod
    def held(deployment_id: int) -> bool:
        with contextlib.suppress(redis.RedisError):
            if redis_client().exists(rkey("lease", deployment_id)):
                return True
        return DatabaseLock.held(deployment_id)

    def acquire(self, wait_s: float, db_wait_s: float | None = None) -> bool:
        if not self._acquire_redis(wait_s):
            return False
        if self.db_lock is not None and not self.db_lock.acquire(
            wait_s if db_wait_s is None else db_wait_s
        ):
            log.warning("%s: another run holds the database lock", self.name)
            self.release()
            return False
        return True

    def _acquire_redis(self, wait_s: float) -> bool:
        try:
            self._lock = redis_client().lock(
                self.name, timeout=self.ttl, sleep=0.1, blocking_timeout=wait_s, thread_local=False
            )
            if not self._lock.acquire():
                self._lock = None
                return False
        except redis.RedisError as exc:
            log.error("rollback lease unavailable, running unleased: %s", exc)
            self.degraded = True
            return True
        threading.Thread(target=self._renew, name=self.name, daemon=True).start()
        return True

    def _renew(self) -> None:
        """Renew; a lease that lapsed (a stalled process, Redis away for a while) is taken
        again when free, so the watchdog does not think this run dead."""
        while not self._stop.wait(self.ttl / 3):
            try:
                self._lock.reacquire()
            except redis.exceptions.LockError:
                with contextlib.suppress(redis.RedisError):
                    if self._lock.acquire(blocking=False):
                        log.error("%s lapsed and was taken again", self.name)
            except redis.RedisError:
                continue

    def release(self) -> None:
        self._stop.set()
        if self._lock is not None and not self.degraded:
            with contextlib.suppress(Exception):
                self._lock.release()
        if self.db_lock is not None:
            self.db_lock.release()


# --------------------------------------------------------------------------- orders


@dataclass
class Intent:
    """A closing order as recorded before it is sent, and what became of it."""

    symbol: str
    attempt: int
    client_order_id: str
    qty: float
    reference_price: float | None
    status: str = OrderStatus.PENDING
    created_at: str = field(default_factory=now_iso)
    exchange_status: str = ""
    filled: float = 0.0
    average: float | None = None
    fee: float = 0.0
    exchange_order_id: str = ""
    error: str = ""

    @property
    def settled(self) -> bool:
        return self.status not in UNSETTLED

    def apply(
        self, result: OrderResult | None, error: str = "", status: str = OrderStatus.REJECTED
    ) -> None:
        """Record the exchange's answer; without one, `status` (REJECTED: refused, ERROR:
        never placed) with the `error`."""
        self.error = error[:300]
        if result is None:
            self.status = status if error else self.status
            return
        self.exchange_order_id = result.exchange_order_id
        self.exchange_status = result.status
        self.filled, self.average, self.fee = result.filled, result.average, result.fee
        self.status = _order_status(result)

    def result(self) -> OrderResult | None:
        if not self.exchange_status:
            return None
        return OrderResult(
            exchange_order_id=self.exchange_order_id,
            client_order_id=self.client_order_id,
            symbol=self.symbol,
            side="sell",
            type="market",
            status=self.exchange_status,
            amount=self.qty,
            filled=self.filled,
            average=self.average,
            fee=self.fee,
            fee_currency=None,
            timestamp_ms=None,
        )

    @classmethod
    def from_line(cls, line: dict[str, Any]) -> Intent:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in line.items() if k in known})

    @classmethod
    def from_order(cls, order: Order, attempt: int) -> Intent:
        return cls(
            symbol=order.symbol,
            attempt=attempt,
            client_order_id=order.client_order_id,
            qty=order.requested_qty,
            reference_price=order.reference_price,
            status=order.status,
            created_at=order.created_at.isoformat(),
            filled=order.filled_qty,
            average=order.avg_fill_price,
            fee=order.fee,
            exchange_order_id=order.exchange_order_id,
            error=order.error,
        )


def _order_status(result: OrderResult) -> str:
    if result.status == "closed":
        return OrderStatus.FILLED
    if result.status == "open":
        return OrderStatus.OPEN
    if result.status == "rejected":
        return OrderStatus.REJECTED
    return OrderStatus.PARTIAL if result.filled > 0 else OrderStatus.CANCELED


def _order_row(deployment_id: int, intent: Intent) -> Order:
    created = parse_datetime(intent.created_at) or timezone.now()
    return Order(
        deployment_id=deployment_id,
        client_order_id=intent.client_order_id,
        purpose="flatten",
        symbol=intent.symbol,
        side="sell",
        type="market",
        reduce_only=True,
        requested_qty=intent.qty,
        reference_price=intent.reference_price,
        status=OrderStatus.PENDING,
        created_at=created,
        submitted_at=created,
    )


def settle_order(deployment_id: int, intent: Intent) -> None:
    """Write an order's outcome, creating its row if only the journal had it. Recording
    the same outcome twice changes nothing."""
    order = Order.objects.filter(client_order_id=intent.client_order_id).first()
    if order is None:
        order = _order_row(deployment_id, intent)
        order.save()
    if not intent.settled and intent.status != OrderStatus.UNKNOWN:
        return
    if not record_outcome(order, intent.result(), intent.status, intent.error):
        _settle_locally(order, intent)


def record_outcome(order: Order, result: OrderResult | None, status: str, error: str) -> bool:
    """Through the order router's `order_record` (the accounting: fills, position, cash,
    equity snapshot, audit); False when the router does not exist."""
    record = safety_adapters.optional("trading.execution", "order_record")
    outcome_cls = safety_adapters.optional("trading.execution", "Outcome")
    if record is None or outcome_cls is None:
        return False
    if result is not None:
        outcome = outcome_cls(result=result)
    else:
        outcome = outcome_cls(status=status, error=error)
    record(order_id=order.pk, outcome=outcome)
    return True


def _settle_locally(order: Order, intent: Intent) -> None:
    """Fallback accounting while the order router does not exist."""
    new_fill = max(intent.filled - order.filled_qty, 0.0)
    order.status, order.error = intent.status, intent.error
    order.exchange_order_id = intent.exchange_order_id or order.exchange_order_id
    order.filled_qty = max(intent.filled, order.filled_qty)
    order.avg_fill_price, order.fee = intent.average, intent.fee
    if intent.average and intent.reference_price:
        ref = intent.reference_price
        order.slippage_bps = (ref - intent.average) / ref * 10_000
    order.save()
    if new_fill <= 0 or not intent.average:
        return
    Fill.objects.create(
        order=order, qty=new_fill, price=intent.average, fee=intent.fee, ts=timezone.now()
    )
    position = Position.objects.filter(
        deployment_id=order.deployment_id, symbol=order.symbol
    ).first()
    if position is not None:
        sold = min(new_fill, max(position.qty, 0.0))
        position.realised_pnl += (intent.average - position.avg_entry) * sold
        position.qty = max(position.qty - new_fill, 0.0)
        position.last_price = intent.average
        position.save(update_fields=["qty", "realised_pnl", "last_price", "updated_at"])


# --------------------------------------------------------------------------- records


@dataclass
class Prior:
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: dict[str, Intent] = field(default_factory=dict)

    def done(self, name: str) -> bool:
        return self.steps.get(name, {}).get("outcome") in DONE

    def detail(self, name: str) -> dict[str, Any]:
        return dict(self.steps.get(name, {}).get("detail") or {})


class Recorder:
    """Records steps, orders and effects in the database; from the first failing database
    write on (or from the start, without a rollback row) in the journal instead."""

    def __init__(
        self,
        *,
        key: str,
        snapshot: DeploymentSnapshot,
        rollback: Rollback | None,
        header: dict[str, Any],
    ):
        self.key, self.snapshot, self.rollback = key, snapshot, rollback
        self.journal = Journal(settings.SAFETY_JOURNAL_DIR, key)
        self.header = {
            "key": key,
            "rollback_id": rollback.pk if rollback else None,
            "deployment": snapshot.as_dict(),
            **header,
        }
        self.offline = False
        if rollback is None:
            self.go_offline()

    def go_offline(self, exc: BaseException | None = None) -> None:
        if exc is not None:
            log.error("rollback %s: database write failed, journaling: %s", self.key, exc)
        self.offline = True
        with contextlib.suppress(Exception):
            connection.close()
        if not self.journal.state().header:
            self.journal.append("rollback", **self.header)

    def db(self, fn: Callable[[], Any]) -> bool:
        """Run `fn` in a transaction; False (and offline from now on) if the database fails."""
        if self.offline:
            return False
        try:
            with transaction.atomic():
                fn()
            return True
        except DatabaseError as exc:
            self.go_offline(exc)
            return False

    # ---------------------------------------------------------------- reads

    def prior(self) -> Prior:
        prior = Prior()
        if not self.offline:
            try:
                prior = self._prior_db()
            except DatabaseError as exc:
                self.go_offline(exc)
        state = self.journal.state()
        prior.steps.update(state.steps)
        prior.intents.update({cid: Intent.from_line(ln) for cid, ln in state.orders.items()})
        return prior

    def _prior_db(self) -> Prior:
        steps = {
            s.name: {"outcome": s.outcome, "detail": s.detail, "stage": s.stage}
            for s in RollbackStep.objects.filter(rollback=self.rollback)
        }
        candidates = close_cids(self.snapshot.id, self.key, self.snapshot.symbols)
        rows = Order.objects.filter(client_order_id__in=list(candidates))
        intents = {
            o.client_order_id: Intent.from_order(o, candidates[o.client_order_id][1]) for o in rows
        }
        return Prior(steps=steps, intents=intents)

    # ---------------------------------------------------------------- steps

    def step_begin(self, name: str, stage: int) -> None:
        now = timezone.now()

        def write() -> None:
            RollbackStep.objects.update_or_create(
                rollback=self.rollback,
                name=name,
                defaults={"stage": stage, "started_at": now, "ended_at": None, "outcome": ""},
            )

        if not self.db(write):
            self.journal.append("step", name=name, stage=stage, started_at=now.isoformat())

    def step_end(self, name: str, stage: int, outcome: str, detail: dict[str, Any]) -> None:
        now, detail = timezone.now(), jsonable(detail)

        def write() -> None:
            step = RollbackStep.objects.select_for_update().get(rollback=self.rollback, name=name)
            step.ended_at, step.outcome, step.detail = now, outcome, detail
            step.save(update_fields=["ended_at", "outcome", "detail"])
            audit_record(
                action="rollback.step",
                actor="rollback",
                target=self.rollback,
                payload={"step": name, "stage": stage, "outcome": outcome},
            )

        if not self.db(write):
            self.journal.append(
                "step", name=name, stage=stage, ended_at=now.isoformat(), outcome=outcome,
                detail=detail,
            )  # fmt: skip

    # ---------------------------------------------------------------- orders

    def intents(self, intents: Sequence[Intent]) -> None:
        if not intents:
            return
        rows = [_order_row(self.snapshot.id, i) for i in intents]

        def write() -> None:
            Order.objects.bulk_create(rows, ignore_conflicts=True)
            audit_record(
                action="rollback.orders_submitted",
                actor="rollback",
                target=self.rollback,
                payload={"orders": [asdict(i) for i in intents]},
            )

        if not self.db(write):
            for intent in intents:
                self.journal.append("order", **asdict(intent))

    def canceled(self, results: Sequence[OrderResult]) -> None:
        """Settle the local rows of the orders the cancel step canceled (online only: a
        journaled rollback leaves them to reconciliation)."""
        by_cid = {r.client_order_id: r for r in results if r.client_order_id}
        if not by_cid or self.offline:
            return

        def write() -> None:
            for order in Order.objects.filter(client_order_id__in=list(by_cid)):
                result = by_cid[order.client_order_id]
                if not record_outcome(order, result, "", ""):
                    Order.objects.filter(pk=order.pk).update(status=_order_status(result))

        self.db(write)

    def results(self, intents: Sequence[Intent]) -> None:
        if not intents:
            return

        def write() -> None:
            for intent in intents:
                settle_order(self.snapshot.id, intent)

        if not self.db(write):
            for intent in intents:
                self.journal.append("order", **asdict(intent))

    # ---------------------------------------------------------------- effects

    def kill_switch(self, state: KillSwitch, reason: str) -> None:
        if not self.offline:
            try:
                killswitch.set_state(
                    deployment=self.snapshot.unsaved(), state=state, actor="rollback", reason=reason
                )
                return
            except DatabaseError as exc:  # Redis was written first: the switch holds
                self.go_offline(exc)
        killswitch.write_redis(self.snapshot.id, state)
        self.journal.append("killswitch", state=state.value, reason=reason)

    def signals_off(self) -> None:
        def write() -> None:
            Deployment.objects.filter(pk=self.snapshot.id).update(signals_enabled=False)
            audit_record(
                action="deployment.signals_disabled",
                actor="rollback",
                target_type="trading.Deployment",
                target_id=self.snapshot.id,
                payload={"rollback": self.key},
            )

        if not self.db(write):
            self.journal.append("signals", enabled=False)

    def alert(self, key: str, message: str, payload: dict[str, Any]) -> None:
        def write() -> None:
            safety_adapters.raise_alert(key=key, message=message, payload=payload)

        try:
            raised = self.db(write)
        except Exception:
            log.critical("ROLLBACK ALERT (alerts failed): %s %s", message, payload, exc_info=True)
            raise
        if not raised:
            log.critical("ROLLBACK ALERT (database down, raised on replay): %s", message)
            self.journal.append("alert", key=key, message=message, payload=jsonable(payload))

    def stage1_done(self, summary: dict[str, Any]) -> None:
        def write() -> None:
            rb = Rollback.objects.select_for_update().get(pk=self.rollback.pk)
            if rb.state != RollbackState.RUNNING:
                return
            rb.state, rb.stage1_ended_at = RollbackState.STAGE1_DONE, timezone.now()
            rb.report = {**rb.report, "stage1": stage1_timing(rb, summary, rb.stage1_ended_at)}
            rb.save(update_fields=["state", "stage1_ended_at", "report"])
            audit_record(
                action="rollback.stage1_done",
                actor="rollback",
                target=rb,
                payload=rb.report["stage1"],
            )

        if self.db(write):
            active_clear(self.snapshot.id, self.key)
        else:
            self.journal.append("stage1_done", summary=jsonable(summary))


def stage1_timing(rollback: Rollback, summary: dict[str, Any], ended: datetime) -> dict[str, Any]:
    from_request = (ended - rollback.started_at).total_seconds()
    return {
        **summary,
        "from_request_s": round(from_request, 3),
        "target_s": settings.SAFETY_STAGE1_TARGET_S,
        "within_target": from_request < settings.SAFETY_STAGE1_TARGET_S,
    }


# --------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class FlattenConfig:
    rounds: int
    workers: int
    flat_checks: int
    pause_s: float
    grace_s: float
    close_delay_s: float
    # The longest a Retry-After holds the closing orders back (the stage-1 target).
    max_retry_after_s: float = 30.0

    @classmethod
    def from_settings(cls) -> FlattenConfig:
        delay = float(settings.SAFETY_CLOSE_DELAY_S)
        return cls(
            rounds=max(1, int(settings.SAFETY_FLATTEN_ROUNDS)),
            workers=1 if delay > 0 else max(1, int(settings.SAFETY_FLATTEN_WORKERS)),
            flat_checks=max(1, int(settings.SAFETY_FLAT_CHECKS)),
            pause_s=float(settings.SAFETY_FLAT_CHECK_PAUSE_S),
            grace_s=float(settings.SAFETY_ORDER_GRACE_S),
            close_delay_s=delay,
            max_retry_after_s=float(settings.SAFETY_STAGE1_TARGET_S),
        )


RATE_LIMIT_PAUSE_S = 1.0  # after a rate limit that names no Retry-After


class OrderGate:
    """Holds the closing orders to one exchange back while it asks to (HTTP 429/418 with
    Retry-After): every order, in every thread, waits until the latest hold is over."""

    def __init__(self, max_hold_s: float):
        self.max_hold_s = max(max_hold_s, 0.0)
        self._until = 0.0
        self._lock = threading.Lock()

    def hold(self, retry_after_s: float | None) -> float:
        seconds = RATE_LIMIT_PAUSE_S if retry_after_s is None else retry_after_s
        seconds = min(max(seconds, 0.0), self.max_hold_s)
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)
        return seconds

    def wait(self) -> None:
        while True:
            with self._lock:
                left = self._until - time.monotonic()
            if left <= 0:
                return
            time.sleep(left)


class DelayedAdapter:
    """Test only (SAFETY_CLOSE_DELAY_S): pauses before each order, so that a test can kill
    the worker in the middle of stage 1. Everything else is delegated."""

    def __init__(self, adapter: ExchangeAdapter, delay_s: float):
        self._adapter, self._delay_s = adapter, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)

    def create_order(self, request: OrderRequest) -> OrderResult:
        time.sleep(self._delay_s)
        return self._adapter.create_order(request)


def pmap(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


class Stage1:
    """Runs the stage-1 steps not yet done. `run() -> (complete, summary)`."""

    def __init__(
        self,
        *,
        key: str,
        snapshot: DeploymentSnapshot,
        adapter: ExchangeAdapter,
        recorder: Recorder,
        cause: str,
        resumed: bool,
        config: FlattenConfig | None = None,
    ):
        self.cfg = config or FlattenConfig.from_settings()
        if self.cfg.close_delay_s > 0:
            adapter = DelayedAdapter(adapter, self.cfg.close_delay_s)  # type: ignore[assignment]
        self.key, self.snapshot, self.adapter, self.rec = key, snapshot, adapter, recorder
        self.cause, self.resumed = cause, resumed
        self.symbols = list(snapshot.symbols)
        self.outcomes: dict[str, str] = {}
        self.intents: dict[str, Intent] = {}
        self.holdings_before: dict[str, float] | None = None
        # Online: the deployment's own orders still unsettled after a look-up, by symbol
        # (their fills, not yet recorded, are missing from the positions that cap a close)
        self.unsettled: dict[str, str] = {}
        # Online: the positions' average entry prices before this run closed anything (the
        # report's P&L of the flatten; a closed position's entry is reset to 0)
        self.entries_before: dict[str, float] | None = None
        self.gate = OrderGate(self.cfg.max_retry_after_s)

    def run(self) -> tuple[bool, dict[str, Any]]:
        started = time.monotonic()
        prior = self.rec.prior()
        self.intents = dict(prior.intents)
        self.holdings_before = prior.detail("cancel_orders").get("holdings")
        for name in STEPS:
            if prior.done(name):
                self.outcomes[name] = prior.steps[name]["outcome"]
            else:
                self.outcomes[name] = self._step(name, getattr(self, f"step_{name}"))
        # Flat and halted completes stage 1; a failed alert is recorded and logged.
        complete = all(self.outcomes[n] in DONE for n in STEPS if n != "alert")
        run_s = round(time.monotonic() - started, 3)
        return complete, {"run_s": run_s, "outcomes": self.outcomes, "complete": complete}

    def _step(self, name: str, fn: Callable[[], tuple[str, dict[str, Any]]]) -> str:
        self.rec.step_begin(name, 1)
        started = time.monotonic()
        try:
            outcome, detail = fn()
        except (ExchangeError, redis.RedisError, killswitch.KillSwitchUnreadable) as exc:
            outcome, detail = "failed", _error(exc)
        except Exception as exc:
            if name != "alert" or isinstance(exc, DatabaseError):
                raise
            outcome, detail = "failed", _error(exc)
        detail["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        self.rec.step_end(name, 1, outcome, detail)
        return outcome

    # ---------------------------------------------------------------- steps

    def step_reducing(self) -> tuple[str, dict[str, Any]]:
        try:
            current: KillSwitch | None = killswitch.read_state(self.snapshot.id)
        except killswitch.KillSwitchUnreadable as exc:
            if "Redis unavailable" in str(exc):
                raise
            current = None
        if current == KillSwitch.HALTED:
            return "skipped", {"kill_switch": "already HALTED"}
        self.rec.kill_switch(KillSwitch.REDUCING, f"rollback {self.key}: {self.cause}")
        return "ok", {"kill_switch": "REDUCING", "was": current.value if current else "unset"}

    def step_stop_signals(self) -> tuple[str, dict[str, Any]]:
        self.rec.signals_off()
        return "ok", {"signals_enabled": False}

    def step_cancel_orders(self) -> tuple[str, dict[str, Any]]:
        outcomes = pmap(self._cancel_one, self.symbols, self.cfg.workers)
        pairs = list(zip(self.symbols, outcomes, strict=True))
        canceled = {s: len(done) for s, (done, _) in pairs if done}
        errors = {s: e for s, (_, e) in pairs if e}
        self.rec.canceled([r for _, (done, _) in pairs for r in done])
        if self.holdings_before is None:
            self.holdings_before = self.adapter.positions(self.symbols)
        detail = {"canceled": canceled, "errors": errors, "holdings": self.holdings_before}
        return ("failed" if errors else "ok"), detail

    def _cancel_one(self, symbol: str) -> tuple[list[OrderResult], str]:
        error = ""
        for attempt in range(3):
            try:
                return self.adapter.cancel_all_orders(symbol), ""
            except TemporaryExchangeError as exc:
                error = str(exc)[:200]
                time.sleep(0.2 * (attempt + 1))
            except ExchangeError as exc:
                return [], f"{type(exc).__name__}: {str(exc)[:200]}"
        return [], error

    def step_close_positions(self) -> tuple[str, dict[str, Any]]:
        if self.resumed:
            self._discover()
        known = len(self.intents)
        todo: Plan = {}
        dust: dict[str, float] = {}
        for _ in range(self.cfg.rounds):
            self._settle_unsettled()
            todo, dust = self._plan()
            if not todo:
                break
            self._send_round(todo)
        if todo:
            self._settle_unsettled()
            todo, dust = self._plan()
        residual = {s: q for s, (q, _) in todo.items()}
        detail = {
            "orders_sent": len(self.intents) - known,
            "orders": {cid: i.status for cid, i in self.intents.items()},
            "dust": dust,
            "residual": residual,
        }
        if self.entries_before is not None:
            detail["entries"] = self.entries_before
        if self.unsettled:
            detail["unsettled"] = dict(self.unsettled)
        if residual or self.unsettled:
            return "failed", detail
        return ("ok" if self.intents else "skipped"), detail

    def step_verify_flat(self) -> tuple[str, dict[str, Any]]:
        todo: Plan = {}
        for check in range(self.cfg.flat_checks):
            todo, dust = self._plan()
            if not todo and not self.unsettled:
                return "ok", {"checks": check + 1, "dust": dust}
            time.sleep(self.cfg.pause_s)
        residual = {s: q for s, (q, _) in todo.items()}
        detail: dict[str, Any] = {"checks": self.cfg.flat_checks, "residual": residual}
        if self.unsettled:
            detail["unsettled"] = dict(self.unsettled)
        return "failed", detail

    def step_halt(self) -> tuple[str, dict[str, Any]]:
        self.rec.kill_switch(KillSwitch.HALTED, f"rollback {self.key}: {self.cause}")
        return "ok", {"kill_switch": "HALTED"}

    def step_alert(self) -> tuple[str, dict[str, Any]]:
        failed = [n for n in STEPS[:-1] if self.outcomes.get(n) not in DONE]
        name = self.snapshot.name
        if failed:
            status = "incomplete"
            message = f"Rollback of {name} INCOMPLETE: {', '.join(failed)} failed ({self.cause})"
        else:
            status = "flat"
            message = f"Rollback of {name}: trading HALTED, positions flat ({self.cause})"
        payload = {
            "rollback": self.key,
            "deployment": self.snapshot.id,
            "cause": self.cause,
            "outcomes": self.outcomes,
        }
        self.rec.alert(f"rollback:{self.key}:stage1:{status}", message, payload)
        return ("failed" if failed else "ok"), {"status": status, "message": message}

    # ---------------------------------------------------------------- holdings

    def _local_cap(self) -> dict[str, float] | None:
        """Online, only the strategy's own positions are ours to close (as the router's
        flatten does), read after its own unsettled orders are looked up (an entry the
        exchange filled while its record says PENDING or UNKNOWN holds what its position
        does not count yet); offline the exchange holdings of the symbols are (dedicated
        account)."""
        if self.rec.offline:
            return None
        try:
            self.unsettled = self._settle_own_orders()
            rows = Position.objects.filter(deployment_id=self.snapshot.id, symbol__in=self.symbols)
            positions = list(rows.values_list("symbol", "qty", "avg_entry"))
        except DatabaseError as exc:
            self.unsettled = {}
            self.rec.go_offline(exc)
            return None
        if self.entries_before is None:
            self.entries_before = {s: entry for s, qty, entry in positions if qty > 0}
        return {symbol: qty for symbol, qty, _ in positions}

    def _settle_own_orders(self) -> dict[str, str]:
        """The deployment's unsettled orders of the symbols other than this rollback's
        closes (looked up by ``_settle_unsettled``), each looked up by its client id through
        the router (``order_resolve``: found, its status and fills recorded; not found past
        the grace period, never placed). {symbol: why an order of it is still unsettled}:
        while one is, the symbol's holding cannot be known from the records."""
        from trading.execution import resolve_unsettled

        unsettled: dict[str, str] = {}
        found = resolve_unsettled(
            self.snapshot.id, self.adapter, self.symbols, exclude=self.intents
        )
        for order, error in found:
            if error is not None:
                unsettled[order.symbol] = (
                    f"{order.client_order_id} ({order.status}) could not be looked up: "
                    f"{type(error).__name__}: {str(error)[:200]}"
                )
            elif order.status in UNSETTLED:
                unsettled[order.symbol] = (
                    f"{order.client_order_id} is still {order.status} after its look-up"
                )
        return unsettled

    def _plan(self) -> tuple[Plan, dict[str, float]]:
        """Symbols still to sell: {symbol: (tradable qty, reference price)}, and the dust."""
        held = self.adapter.positions(self.symbols)
        cap = self._local_cap()
        if cap is not None:
            held = {s: min(q, cap.get(s, 0.0)) for s, q in held.items()}
        symbols = [s for s, q in held.items() if q > 0]
        markets = self.adapter.load_markets()
        prices = pmap(lambda s: self.adapter.fetch_ticker(s).last, symbols, self.cfg.workers)
        todo: Plan = {}
        dust: dict[str, float] = {}
        for symbol, price in zip(symbols, prices, strict=True):
            market = markets.get(symbol)
            qty = market.tradable_qty(held[symbol], price) if market else 0.0
            if qty > 0:
                todo[symbol] = (qty, price)
            else:
                dust[symbol] = held[symbol]
        return todo, dust

    # ---------------------------------------------------------------- closing

    def _next_attempt(self, symbol: str) -> int:
        tried = [i.attempt for i in self.intents.values() if i.symbol == symbol]
        return max(tried) + 1 if tried else 0

    def _blocked(self, symbol: str) -> bool:
        return any(i.symbol == symbol and not i.settled for i in self.intents.values())

    def _send_round(self, todo: Plan) -> None:
        batch = []
        for symbol, (qty, price) in todo.items():
            attempt = self._next_attempt(symbol)
            if self._blocked(symbol) or attempt >= MAX_ATTEMPTS:
                continue
            cid = close_cid(self.snapshot.id, self.key, symbol, attempt)
            batch.append(Intent(symbol, attempt, cid, qty, price))
        self.rec.intents(batch)
        self.intents.update({i.client_order_id: i for i in batch})
        pmap(self._send_one, batch, self.cfg.workers)
        self.rec.results(batch)

    def _send_one(self, intent: Intent) -> None:
        request = OrderRequest(
            symbol=intent.symbol,
            side="sell",
            type="market",
            amount=intent.qty,
            price=intent.reference_price,
            client_order_id=intent.client_order_id,
            reduce_only=True,
        )
        self.gate.wait()
        try:
            intent.apply(self.adapter.create_order(request))
        except RateLimited as exc:
            held = self.gate.hold(exc.retry_after_s)
            log.warning("%s: rate limited, next order in %.1f s: %s", intent.symbol, held, exc)
            if exc.placed is False:
                intent.apply(None, f"not placed (rate limited): {exc}", OrderStatus.ERROR)
            else:
                intent.status, intent.error = OrderStatus.UNKNOWN, str(exc)[:300]
        except DuplicateOrder:
            intent.apply(
                self.adapter.fetch_order_by_client_id(intent.symbol, request.client_order_id)
            )
        except OrderStatusUnknown as exc:
            intent.status, intent.error = OrderStatus.UNKNOWN, str(exc)[:300]
        except TemporaryExchangeError as exc:
            if exc.placed is False:
                intent.apply(None, f"not placed: {exc}", OrderStatus.ERROR)
            else:
                intent.status, intent.error = OrderStatus.UNKNOWN, str(exc)[:300]
        except ExchangeError as exc:
            intent.apply(None, f"{type(exc).__name__}: {exc}")

    def _settle_unsettled(self) -> None:
        """Look every recorded, unsettled close up by its id, once the grace period in which
        a sent request can still reach the exchange has passed."""
        pending = [i for i in self.intents.values() if not i.settled]
        if not pending:
            return
        newest = max(parse_datetime(i.created_at) or timezone.now() for i in pending)
        wait = self.cfg.grace_s - (timezone.now() - newest).total_seconds()
        if wait > 0:
            time.sleep(wait)
        pmap(self._lookup, pending, self.cfg.workers)
        self.rec.results(pending)

    def _lookup(self, intent: Intent) -> None:
        try:
            found = self.adapter.fetch_order_by_client_id(intent.symbol, intent.client_order_id)
        except ExchangeError:
            return
        if found is None:
            intent.apply(None, "not placed (not found on the exchange)", OrderStatus.ERROR)
        else:
            intent.apply(found)

    def _discover(self) -> None:
        """Resumed run: walk each symbol's closing ids on the exchange past the recorded
        ones (records may be missing, e.g. made online before the database went away)."""
        discovered = [
            i for found in pmap(self._walk, self.symbols, self.cfg.workers) for i in found
        ]
        if discovered:
            self.rec.intents(discovered)
            self.rec.results(discovered)
            self.intents.update({i.client_order_id: i for i in discovered})

    def _walk(self, symbol: str) -> list[Intent]:
        found: list[Intent] = []
        attempt = self._next_attempt(symbol)
        while attempt < MAX_ATTEMPTS:
            cid = close_cid(self.snapshot.id, self.key, symbol, attempt)
            result = self.adapter.fetch_order_by_client_id(symbol, cid)
            if result is None:
                break
            intent = Intent(symbol, attempt, cid, result.amount, None)
            intent.apply(result)
            found.append(intent)
            attempt += 1
        return found
