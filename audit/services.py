"""Writing and checking the audit trail."""

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from .models import AuditChainHead, AuditEvent

GENESIS = "0" * 64
SECRET_KEYS = ("password", "secret", "token", "api_key", "apikey", "authorization")


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: ("***" if any(s in str(k).lower() for s in SECRET_KEYS) else _scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _as_jsonb_returns(value: Any) -> Any:
    """``value`` (plain JSON data) as PostgreSQL's jsonb gives it back, so that the hash
    taken at writing is the one verification recomputes from the stored payload: jsonb
    keeps numbers as ``numeric``, which has no negative zero (-0.0 comes back 0.0) and
    writes a float given with a positive exponent in full, without a decimal point (1e+16
    comes back as the integer 10000000000000000). Other floats come back as the same float
    (its text is the shortest that reads back as it)."""
    if isinstance(value, dict):
        return {k: _as_jsonb_returns(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_jsonb_returns(v) for v in value]
    if isinstance(value, float) and math.isfinite(value):
        if value == 0.0:
            return 0.0
        text = repr(value)
        if "e+" in text:
            return int(Decimal(text))
    return value


def _dump(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), cls=DjangoJSONEncoder)


def canonical_around_seq(
    *,
    created_at: datetime,
    actor: str,
    actor_user_id: int | None,
    action: str,
    target_type: str,
    target_id: str,
    payload: Any,
    ip: str | None,
    user_agent: str,
) -> tuple[str, str]:
    """The canonical JSON of an event without its seq, as ``(before, after)``:
    ``canonical = before + str(seq) + after``. The keys are sorted, so the top-level "seq"
    member sits between "payload" and "target_id": PostgreSQL fills in the seq it assigns
    and hashes the text in the same statement (``audit_record``)."""
    before = _dump(
        {
            "action": action,
            "actor": actor,
            "actor_user_id": actor_user_id,
            "created_at": created_at.isoformat(timespec="microseconds"),
            "ip": ip,
            "payload": payload,
        }
    )
    after = _dump({"target_id": target_id, "target_type": target_type, "user_agent": user_agent})
    return before[:-1] + ',"seq":', "," + after[1:]


def canonical_fields(*, seq: int, **fields: Any) -> str:
    """The canonical JSON the hash covers: the event's own fields, keys sorted, compact."""
    before, after = canonical_around_seq(**fields)
    return f"{before}{int(seq)}{after}"


def chain_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


def event_hash(event: AuditEvent) -> str:
    return chain_hash(
        event.prev_hash,
        canonical_fields(
            seq=event.seq,
            created_at=event.created_at,
            actor=event.actor,
            actor_user_id=event.actor_user_id,
            action=event.action,
            target_type=event.target_type,
            target_id=event.target_id,
            payload=event.payload,
            ip=event.ip,
            user_agent=event.user_agent,
        ),
    )


@dataclass(frozen=True)
class RequestMeta:
    ip: str | None = None
    user_agent: str = ""

    @classmethod
    def from_request(cls, request: Any) -> "RequestMeta":
        if request is None:
            return cls()
        meta = getattr(request, "META", {})
        return cls(ip=meta.get("REMOTE_ADDR"), user_agent=meta.get("HTTP_USER_AGENT", "")[:300])


def audit_event(
    *,
    action: str,
    actor: Any = None,
    target: Any = None,
    target_type: str = "",
    target_id: Any = "",
    payload: dict | None = None,
    request: Any = None,
) -> AuditEvent:
    """The event ``audit_record`` appends, not yet chained (no seq, no hashes)."""
    if target is not None:
        target_type = target_type or target._meta.label
        target_id = target_id or target.pk
    user = actor if getattr(actor, "is_authenticated", False) else None
    actor_name = user.get_username() if user else (str(actor) if actor else "system")
    meta = RequestMeta.from_request(request)
    clean = _as_jsonb_returns(json.loads(json.dumps(_scrub(payload or {}), cls=DjangoJSONEncoder)))
    return AuditEvent(
        created_at=timezone.now(),
        actor_user=user,
        actor=actor_name[:150],
        action=action,
        target_type=target_type,
        target_id=str(target_id)[:100],
        payload=clean,
        ip=meta.ip,
        user_agent=meta.user_agent,
    )


def audit_record(
    *,
    action: str,
    actor: Any = None,
    target: Any = None,
    target_type: str = "",
    target_id: Any = "",
    payload: dict | None = None,
    request: Any = None,
) -> AuditEvent:
    """Append one event. Joins the caller's transaction (so it commits or rolls back with
    the change it records); the chain head row is locked to keep the chain linear.
    No savepoint: a failed audit write dooms the caller's transaction, it cannot be
    caught and carried on from."""
    event = audit_event(
        action=action, actor=actor, target=target, target_type=target_type,
        target_id=target_id, payload=payload, request=request,
    )  # fmt: skip
    with transaction.atomic(savepoint=False):
        connection = transaction.get_connection()
        if connection.vendor == "postgresql" and _append_postgresql(connection, event):
            return event
        if connection.vendor == "sqlite" and _append_sqlite(connection, event):
            return event
        head, _ = AuditChainHead.objects.select_for_update().get_or_create(id=1)
        event.seq, event.prev_hash = head.seq + 1, head.hash
        event.hash = event_hash(event)
        event.save(force_insert=True)
        head.seq, head.prev_hash, head.hash = event.seq, event.prev_hash, event.hash
        head.save(update_fields=["seq", "prev_hash", "hash"])
    return event


# SQLite (one writer at a time: the head needs no row lock): the head read, the event
# inserted and the head advanced by three fixed statements; the hash computed here.
_SQLITE_HEAD_SQL = f"SELECT seq, hash FROM {AuditChainHead._meta.db_table} WHERE id = 1"
_SQLITE_INSERT_SQL = f"""
INSERT INTO {AuditEvent._meta.db_table}
    (seq, created_at, actor_user_id, actor, action, target_type, target_id, payload,
     ip, user_agent, prev_hash, hash)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
"""
_SQLITE_ADVANCE_SQL = (
    f"UPDATE {AuditChainHead._meta.db_table} SET seq = %s, prev_hash = %s, hash = %s WHERE id = 1"
)
_PAYLOAD = AuditEvent._meta.get_field("payload")


def _append_sqlite(connection: Any, event: AuditEvent) -> bool:
    """Append ``event`` (seq and hashes filled in); False when there is no head row yet.
    The statements run through ``trading.rows.execute`` (SQLite's cursor without Django's
    per-statement rewrite), the creation time adapted by ``trading.rows.adapt_datetime``."""
    from trading.rows import adapt_datetime, execute

    with connection.cursor() as cursor:
        execute(cursor, _SQLITE_HEAD_SQL, ())
        head = cursor.fetchone()
        if head is None:
            return False
        event.seq, event.prev_hash = head[0] + 1, head[1]
        event.hash = event_hash(event)
        payload = _PAYLOAD.get_db_prep_save(event.payload, connection)
        created_at = adapt_datetime(connection, event.created_at)
        execute(
            cursor,
            _SQLITE_INSERT_SQL,
            [
                event.seq, created_at, event.actor_user_id, event.actor, event.action,
                event.target_type, event.target_id, payload, event.ip, event.user_agent,
                event.prev_hash, event.hash,
            ],
        )  # fmt: skip
        (event.pk,) = cursor.fetchone()
        execute(cursor, _SQLITE_ADVANCE_SQL, [event.seq, event.prev_hash, event.hash])
    event._state.adding = False
    event._state.db = connection.alias
    return True


# PostgreSQL: one statement advances the chain head (locking its row until the
# transaction ends), hashes the event with the seq it assigns, and inserts the event: one
# round trip, and the lock is taken no earlier than the audit write itself (audit writes
# sit on every money path and on ingestion; the head is where concurrent writers queue).
# The hash is sha256(prev_hash + canonical JSON) as ``event_hash`` computes it.
# ``{when}``: an SQL condition the append waits on (another CTE's outcome, when a caller
# embeds these CTEs in its own statement: ``audit_append_ctes``).
_PG_APPEND_CTES = f"""
audit_head AS (
    UPDATE {AuditChainHead._meta.db_table}
    SET prev_hash = hash,
        seq = seq + 1,
        hash = encode(sha256(convert_to(hash || {{canonical}}, 'UTF8')), 'hex')
    WHERE id = 1 AND {{when}}
    RETURNING seq, prev_hash, hash
), audit_event AS (
    INSERT INTO {AuditEvent._meta.db_table}
        (seq, created_at, actor_user_id, actor, action, target_type, target_id, payload,
         ip, user_agent, prev_hash, hash)
    SELECT h.seq, %s, %s, %s, %s, %s, %s, ({{payload}})::jsonb, %s::inet, %s, h.prev_hash, h.hash
    FROM audit_head h
    RETURNING id, seq, prev_hash, hash
)"""
# The canonical JSON hashed: the text before the seq, the seq, the text after it.
_PG_CANONICAL = "{before} || (seq + 1)::text || %s"
_PG_APPEND_SQL = (
    f"WITH {_PG_APPEND_CTES.format(when='TRUE', canonical=_PG_CANONICAL.format(before='%s'), payload='%s')}"
    " SELECT id, seq, prev_hash, hash FROM audit_event"
)
AUDIT_HEAD_EXISTS = f"EXISTS (SELECT 1 FROM {AuditChainHead._meta.db_table} WHERE id = 1)"


def _filled_in(text: str, filled: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` (JSON holding each ``filled`` member's placeholder) as an SQL expression:
    its pieces as parameters, the placeholders replaced by their SQL expressions' text."""
    quoted = {k: json.dumps(_placeholder(k)) for k in filled}
    sql, pieces, start = [], [], 0
    for at, key in sorted((text.index(q), k) for k, q in quoted.items()):
        pieces.append(text[start:at])
        sql += ["%s", f"({filled[key]})::text"]
        start = at + len(quoted[key])
    pieces.append(text[start:])
    return " || ".join([*sql, "%s"]), pieces


def _placeholder(member: str) -> str:
    return f"\x00audit:{member}\x00"


def audit_append_ctes(
    event: AuditEvent, *, when: str, filled: dict[str, str] | None = None
) -> tuple[str, list[Any]]:
    """PostgreSQL: the CTEs ``audit_head`` and ``audit_event`` that append ``event`` when
    the SQL condition ``when`` holds, and their parameters, for a caller to run in the
    statement that makes the change they record; ``audit_event`` returns (id, seq,
    prev_hash, hash) for ``audit_appended``. Nothing is appended without a head row:
    callers condition their change on ``AUDIT_HEAD_EXISTS`` too.

    ``filled``: top-level payload members whose values the statement makes (the ids of
    the rows it inserts), member -> SQL expression of a number: the payload stored and the
    text hashed hold what the statement makes in their place. The caller then sets them
    in ``event.payload`` from what the statement returns."""
    if filled:
        event.payload = {**event.payload, **{k: _placeholder(k) for k in filled}}
    before, after = canonical_around_seq(
        created_at=event.created_at,
        actor=event.actor,
        actor_user_id=event.actor_user_id,
        action=event.action,
        target_type=event.target_type,
        target_id=event.target_id,
        payload=event.payload,
        ip=event.ip,
        user_agent=event.user_agent,
    )
    payload = json.dumps(event.payload, cls=DjangoJSONEncoder)
    canonical, before_pieces = _filled_in(before, filled or {})
    payload_sql, payload_pieces = _filled_in(payload, filled or {})
    params = [
        *before_pieces, after, event.created_at, event.actor_user_id, event.actor,
        event.action, event.target_type, event.target_id, *payload_pieces, event.ip,
        event.user_agent,
    ]  # fmt: skip
    sql = _PG_APPEND_CTES.format(
        when=when, canonical=_PG_CANONICAL.format(before=canonical), payload=payload_sql
    )
    return sql, params


def audit_appended(event: AuditEvent, row: Any, alias: str = "default") -> AuditEvent:
    """``event`` as stored: (id, seq, prev_hash, hash) from ``audit_event``."""
    event.pk, event.seq, event.prev_hash, event.hash = row
    event._state.adding = False
    event._state.db = alias
    return event


def _append_postgresql(connection: Any, event: AuditEvent) -> bool:
    """Append ``event`` (seq and hashes filled in); False when there is no head row yet."""
    _, params = audit_append_ctes(event, when="TRUE")
    with connection.cursor() as cursor:
        cursor.execute(_PG_APPEND_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return False
    audit_appended(event, row, connection.alias)
    return True


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    event_id: int
    reason: str


def audit_verify(events: Iterable[AuditEvent] | None = None) -> ChainBreak | None:
    """Walk the chain in order; return the first break, or None when it holds."""
    prev = GENESIS
    expected_seq = 1
    qs = events if events is not None else AuditEvent.objects.order_by("seq").iterator(2000)
    for event in qs:
        if event.seq != expected_seq:
            return ChainBreak(
                event.seq, event.pk, f"expected seq {expected_seq}, found {event.seq}"
            )
        if event.prev_hash != prev:
            return ChainBreak(event.seq, event.pk, "prev_hash does not match the previous event")
        if event_hash(event) != event.hash:
            return ChainBreak(event.seq, event.pk, "hash does not match the event's content")
        prev = event.hash
        expected_seq += 1
    if events is not None:
        return None
    problem = head_problem(AuditChainHead.objects.filter(id=1).first(), expected_seq - 1, prev)
    return ChainBreak(expected_seq, 0, problem) if problem else None


def head_problem(head: AuditChainHead | None, last_seq: int, last_hash: str) -> str | None:
    """Why the chain's head row does not end the chain whose last event is ``last_seq``
    (0: none) with ``last_hash``, or None."""
    if head is None:  # the next audit record would restart at seq 1 and fail
        return "the chain's head row is missing" if last_seq else None
    if head.seq != last_seq:
        return f"chain ends at seq {last_seq} but head is {head.seq}"
    if last_seq and head.hash != last_hash:
        return "the head's hash is not the last event's (the last event rewritten?)"
    return None
