"""The hash chain: linking, tamper detection, the append-only triggers, secret scrubbing
and concurrent writers in separate OS processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from django.contrib.auth.models import Group
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError

from audit.models import AuditChainHead, AuditEvent
from audit.services import GENESIS, audit_record, audit_verify, event_hash
from audit.triggers import suspended

ROOT = Path(__file__).resolve().parents[2]


def record_events(count: int) -> list[AuditEvent]:
    return [
        audit_record(action="test.step", actor="tester", payload={"step": i})
        for i in range(1, count + 1)
    ]


def tamper(sql: str, params: list | tuple = ()) -> None:
    """Run SQL against the audit table with its append-only triggers dropped."""
    with transaction.atomic(), suspended(connection), connection.cursor() as cursor:
        cursor.execute(sql, params)


def rewrite_with_its_hash(seq: int) -> None:
    """Edit event ``seq``'s payload and recompute its own hash (triggers dropped)."""
    with transaction.atomic(), suspended(connection):
        victim = AuditEvent.objects.get(seq=seq)
        victim.payload = {"step": 999}
        victim.hash = event_hash(victim)
        AuditEvent.objects.filter(pk=victim.pk).update(payload=victim.payload, hash=victim.hash)


# --- a sound chain ------------------------------------------------------------------------


@pytest.mark.django_db
def test_events_are_linked_from_genesis_and_head_follows():
    events = record_events(4)

    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0].prev_hash == GENESIS
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    stored = list(AuditEvent.objects.all())
    assert [event_hash(e) for e in stored] == [e.hash for e in events]
    head = AuditChainHead.objects.get(id=1)
    assert (head.seq, head.hash) == (4, events[-1].hash)
    assert audit_verify() is None


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"seq": 7, "nested": {"seq": [1, 2]}, "z": None},
        {"text": 'caf\u00e9 \u2603 "quoted" back\\slash % %s', "f": 1e-05, "n": -0.0},
        {"big": 10**30, "list": [1.5, "x", {"b": 1, "a": 2}], "true": True},
    ],
)
def test_canonical_text_is_the_sorted_compact_json_of_the_whole_event(payload):
    from datetime import UTC, datetime

    from django.core.serializers.json import DjangoJSONEncoder

    from audit.services import canonical_fields

    fields = {
        "created_at": datetime(2026, 11, 21, 15, 0, 0, 123456, tzinfo=UTC),
        "actor": "tester \u00e9",
        "actor_user_id": 3,
        "action": "test.canonical",
        "target_type": "trading.Order",
        "target_id": "41",
        "payload": payload,
        "ip": "127.0.0.1",
        "user_agent": "ua/1.0",
    }
    whole = {**fields, "seq": 12345, "created_at": "2026-11-21T15:00:00.123456+00:00"}
    expected = json.dumps(whole, sort_keys=True, separators=(",", ":"), cls=DjangoJSONEncoder)

    assert canonical_fields(seq=12345, **fields) == expected


@pytest.mark.django_db
def test_the_database_computed_hash_matches_the_python_one_for_awkward_payloads():
    """On PostgreSQL the head's UPDATE hashes the event; verification recomputes it in Python."""
    payloads = [
        {"text": 'caf\u00e9 \u2603 "q" \\ % %s %(x)s', "seq": 1},
        {"f": 0.1 + 0.2, "tiny": 1e-300, "neg": -12.5, "nested": {"b": [1, {"a": None}]}},
        # numbers jsonb writes back otherwise: a negative zero (the slippage of a sell
        # filled at its reference), floats written with a positive exponent
        {"zero": -0.0, "big": 1e16, "bigger": [1.2345e20, -3e300], "small": 1.5e-7},
    ]
    events = [
        audit_record(action="test.awkward", actor="t\u00e9ster", payload=p, target_id="x'y")
        for p in payloads
    ]

    stored = list(AuditEvent.objects.filter(action="test.awkward").order_by("seq"))
    assert [e.hash for e in stored] == [e.hash for e in events]
    assert [event_hash(e) for e in stored] == [e.hash for e in events]
    assert AuditChainHead.objects.get(id=1).prev_hash == events[-2].hash
    assert audit_verify() is None


@pytest.mark.django_db
def test_event_joins_the_callers_transaction_and_rolls_back_with_it():
    record_events(1)

    with pytest.raises(RuntimeError), transaction.atomic():
        Group.objects.create(name="will-roll-back")
        audit_record(action="group.create", actor="tester", payload={"name": "x"})
        raise RuntimeError("service failed after auditing")

    assert list(AuditEvent.objects.values_list("seq", flat=True)) == [1]
    assert AuditChainHead.objects.get(id=1).seq == 1
    assert audit_record(action="test.after", actor="tester").seq == 2
    assert audit_verify() is None


@pytest.mark.django_db
def test_a_failed_audit_write_cannot_be_swallowed_by_the_caller():
    record_events(2)
    AuditChainHead.objects.filter(id=1).update(seq=1)  # the next seq (2) is taken

    with pytest.raises(TransactionManagementError), transaction.atomic():
        Group.objects.create(name="unaudited")
        with contextlib.suppress(IntegrityError):
            audit_record(action="group.create", actor="tester")
        Group.objects.create(name="carrying-on-regardless")

    assert not Group.objects.filter(name__in=["unaudited", "carrying-on-regardless"]).exists()


@pytest.mark.django_db
def test_target_and_actor_user_are_recorded(make_user):
    alice = make_user("alice", "Ops")
    group = Group.objects.get(name="Ops")

    event = audit_record(action="group.touch", actor=alice, target=group)

    assert (event.actor, event.actor_user_id) == ("alice", alice.pk)
    assert (event.target_type, event.target_id) == ("auth.Group", str(group.pk))
    assert audit_verify() is None


@pytest.mark.django_db
def test_secrets_in_payload_are_scrubbed():
    payload = {
        "password": "hunter2-pw",
        "client_secret": "s3cr3t-value",
        "nested": {"API_KEY": "key-value", "keep": 1},
        "items": [{"Token": "tok-value"}, {"name": "visible"}],
        "authorization": "Bearer abc-value",
    }

    event = audit_record(action="test.secrets", actor="tester", payload=payload)

    stored = AuditEvent.objects.get(pk=event.pk).payload
    assert stored == {
        "password": "***",
        "client_secret": "***",
        "nested": {"API_KEY": "***", "keep": 1},
        "items": [{"Token": "***"}, {"name": "visible"}],
        "authorization": "***",
    }
    text = json.dumps(stored)
    for secret in ("hunter2-pw", "s3cr3t-value", "key-value", "tok-value", "abc-value"):
        assert secret not in text
    assert audit_verify() is None


# --- tampering is detected ------------------------------------------------------------------


@pytest.mark.django_db
def test_verify_detects_an_edited_payload():
    events = record_events(5)
    tamper(
        "UPDATE audit_auditevent SET payload = %s WHERE seq = %s",
        [json.dumps({"step": 999}), 3],
    )

    broken = audit_verify()

    assert broken is not None
    assert (broken.seq, broken.event_id) == (3, events[2].pk)
    assert "hash does not match" in broken.reason


@pytest.mark.django_db
def test_verify_detects_an_edit_whose_hash_was_recomputed_at_the_next_event():
    record_events(5)
    rewrite_with_its_hash(3)

    broken = audit_verify()

    assert broken is not None
    assert broken.seq == 4
    assert "prev_hash" in broken.reason


@pytest.mark.django_db
def test_verify_detects_a_deleted_event():
    record_events(5)
    tamper("DELETE FROM audit_auditevent WHERE seq = %s", [3])

    broken = audit_verify()

    assert broken is not None
    assert broken.seq == 4
    assert "expected seq 3, found 4" in broken.reason


@pytest.mark.django_db
def test_verify_detects_a_deleted_last_event_through_the_head():
    record_events(5)
    tamper("DELETE FROM audit_auditevent WHERE seq = %s", [5])

    broken = audit_verify()

    assert broken is not None
    assert broken.seq == 5
    assert "head is 5" in broken.reason


@pytest.mark.django_db
def test_verify_detects_a_rewritten_last_event_through_the_heads_hash():
    record_events(5)
    rewrite_with_its_hash(5)

    broken = audit_verify()

    assert broken is not None
    assert broken.seq == 6
    assert "head's hash" in broken.reason


@pytest.mark.django_db
def test_verify_detects_a_missing_head():
    record_events(3)
    AuditChainHead.objects.all().delete()

    broken = audit_verify()

    assert broken is not None
    assert "head row is missing" in broken.reason


@pytest.mark.django_db
def test_verify_detects_two_reordered_events():
    record_events(5)
    with transaction.atomic(), suspended(connection):
        AuditEvent.objects.filter(seq=2).update(seq=-2)
        AuditEvent.objects.filter(seq=3).update(seq=2)
        AuditEvent.objects.filter(seq=-2).update(seq=3)

    assert list(AuditEvent.objects.values_list("seq", flat=True)) == [1, 2, 3, 4, 5]
    broken = audit_verify()

    assert broken is not None
    assert broken.seq == 2
    assert "prev_hash" in broken.reason


@pytest.mark.django_db
def test_triggers_are_back_after_tampering():
    record_events(2)
    tamper("UPDATE audit_auditevent SET actor = %s WHERE seq = %s", ["mallory", 1])

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(seq=2).update(actor="mallory")


# --- the append-only triggers -------------------------------------------------------------


@pytest.mark.django_db
def test_trigger_refuses_a_queryset_update():
    record_events(2)

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(seq=1).update(payload={"step": 0})

    assert AuditEvent.objects.get(seq=1).payload == {"step": 1}


@pytest.mark.django_db
def test_trigger_refuses_saving_a_changed_instance():
    event = record_events(1)[0]
    event.action = "test.rewritten"

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        event.save()

    assert AuditEvent.objects.get(pk=event.pk).action == "test.step"


@pytest.mark.django_db
def test_trigger_refuses_an_insert_that_replaces_an_event():
    """SQLite's INSERT OR REPLACE deletes the conflicting row without its delete trigger;
    PostgreSQL's ON CONFLICT DO UPDATE is an update."""
    record_events(3)
    columns = (
        "id, seq, created_at, actor_user_id, actor, action, target_type, target_id, payload, "
        "ip, user_agent, prev_hash, hash"
    )
    forged = columns.replace("actor,", "'mallory',", 1)
    if connection.vendor == "sqlite":
        sql = f"INSERT OR REPLACE INTO audit_auditevent ({columns}) SELECT {forged} FROM audit_auditevent WHERE seq = 3"
    else:
        sql = (
            f"INSERT INTO audit_auditevent ({columns}) SELECT {forged} FROM audit_auditevent"
            " WHERE seq = 3 ON CONFLICT (seq) DO UPDATE SET actor = EXCLUDED.actor"
        )

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        connection.cursor().execute(sql)

    assert AuditEvent.objects.get(seq=3).actor == "tester"
    assert audit_verify() is None


@pytest.mark.django_db
def test_trigger_refuses_deletes():
    events = record_events(2)

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        events[0].delete()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.all().delete()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        connection.cursor().execute("DELETE FROM audit_auditevent")

    assert AuditEvent.objects.count() == 2
    assert audit_verify() is None


@pytest.mark.django_db
def test_trigger_refuses_truncate_on_postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("TRUNCATE exists on PostgreSQL only")
    record_events(1)

    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        connection.cursor().execute("TRUNCATE audit_auditevent")

    assert AuditEvent.objects.count() == 1


# --- concurrent writers ---------------------------------------------------------------------

PROCESSES = 4
EVENTS_EACH = 50
SUBPROCESS_TIMEOUT_S = 60

WRITER = """
import os, sys, time
import django
django.setup()
from audit.services import audit_record
name, count, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
deadline = time.monotonic() + 30
while not os.path.exists(gate):
    if time.monotonic() > deadline:
        sys.exit("gate never opened")
    time.sleep(0.005)
for i in range(count):
    audit_record(action="test.concurrent", actor=name, payload={"i": i})
    time.sleep(0.002)  # let the other writers at the lock (SQLite's busy wait backs off)
print("done", flush=True)
"""


def database_url() -> str:
    """The URL of the database this test runs against, for the writer processes."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    if connection.vendor == "postgresql":
        auth = quote(db["USER"] or "postgres")
        if db["PASSWORD"]:
            auth += ":" + quote(db["PASSWORD"])
        host = db["HOST"] or "127.0.0.1"
        return f"postgres://{auth}@{host}:{db['PORT'] or 5432}/{db['NAME']}"
    raise NotImplementedError(connection.vendor)


def start_writers(gate: Path) -> list[subprocess.Popen]:
    env = os.environ | {
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
        "PYTHONPATH": str(ROOT),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, f"writer-{n}", str(EVENTS_EACH), str(gate)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]


def finish(writers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for proc in writers:
        try:
            out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append((proc.returncode, out, err))
    return results


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_in_separate_processes_keep_one_linear_chain(tmp_path):
    if connection.vendor == "sqlite" and connection.settings_dict["NAME"] == ":memory:":
        pytest.skip("an in-memory SQLite database cannot be shared with other processes")
    AuditChainHead.objects.get_or_create(id=1)
    assert AuditEvent.objects.count() == 0
    gate = tmp_path / "go"

    writers = start_writers(gate)
    try:
        ready = [proc.stdout.readline().strip() if proc.stdout else "" for proc in writers]
        gate.touch()
    finally:
        results = finish(writers)

    assert ready == ["ready"] * PROCESSES, f"writers did not start: {results}"
    for code, out, err in results:
        assert code == 0, f"writer failed ({code}):\n{out}\n{err}"
    total = PROCESSES * EVENTS_EACH
    assert list(AuditEvent.objects.values_list("seq", flat=True)) == list(range(1, total + 1))
    assert audit_verify() is None
    assert AuditChainHead.objects.get(id=1).seq == total
    actors = list(AuditEvent.objects.values_list("actor", flat=True))
    assert sorted(set(actors)) == [f"writer-{n}" for n in range(PROCESSES)]
    assert all(actors.count(f"writer-{n}") == EVENTS_EACH for n in range(PROCESSES))
    switches = sum(a != b for a, b in zip(actors, actors[1:], strict=False))
    assert switches >= PROCESSES, f"the writers ran one after another ({switches} switches)"
