"""audit_verify and audit_export, through call_command and as real processes."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils.dateparse import parse_datetime

from audit.management.commands.audit_export import FIELDS
from audit.models import AuditEvent
from audit.services import audit_record, event_hash
from tests.audit.test_chain import database_url, tamper

ROOT = Path(__file__).resolve().parents[2]
DAY1 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY2 = datetime(2025, 3, 2, 12, 0, tzinfo=UTC)
DAY3 = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)


def run(name: str, *args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def dated_events() -> list[AuditEvent]:
    """One event a day over three days, two actions."""
    events = []
    for moment, action in ((DAY1, "rollout.promote"), (DAY2, "alert.ack"), (DAY3, "alert.ack")):
        with time_machine.travel(moment, tick=False):
            events.append(
                audit_record(
                    action=action,
                    actor="ops",
                    target_type="canary.Rollout",
                    target_id=7,
                    payload={"day": moment.day, "note": 'naïve, "quoted"\nline'},
                )
            )
    return events


# --- audit_verify ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_verify_on_an_empty_chain():
    out, err = run("audit_verify")

    assert out == "audit chain holds: 0 events, head 000000000000\n"
    assert err == ""


@pytest.mark.django_db
def test_verify_reports_count_and_head_when_the_chain_holds(dated_events):
    out, _ = run("audit_verify")

    assert out == f"audit chain holds: 3 events, head {dated_events[-1].hash[:12]}\n"


@pytest.mark.django_db
def test_verify_exits_1_naming_the_first_broken_event(dated_events):
    tamper("UPDATE audit_auditevent SET actor = %s WHERE seq = %s", ["mallory", 2])
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command("audit_verify", stdout=out, stderr=err)

    assert exit_info.value.code == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (
        f"audit chain broken at seq 2 (event id {dated_events[1].pk}): "
        "hash does not match the event's content\n"
    )


@pytest.mark.django_db
def test_verify_names_a_missing_tail_through_the_head(dated_events):
    tamper("DELETE FROM audit_auditevent WHERE seq = %s", [3])
    err = io.StringIO()

    with pytest.raises(SystemExit) as exit_info:
        call_command("audit_verify", stdout=io.StringIO(), stderr=err)

    assert exit_info.value.code == 1
    assert "seq 3 (no such event): chain ends at seq 2 but head is 3" in err.getvalue()


def manage(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {
        "DATABASE_URL": database_url(),
        "DJANGO_SETTINGS_MODULE": "config.settings_test",
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.django_db(transaction=True)
def test_verify_process_exit_codes():
    if connection.settings_dict["NAME"] == ":memory:":
        pytest.skip("an in-memory SQLite database cannot be shared with other processes")
    events = [audit_record(action="test.step", actor="tester") for _ in range(3)]

    held = manage("audit_verify")
    assert (held.returncode, held.stderr) == (0, "")
    assert held.stdout == f"audit chain holds: 3 events, head {events[-1].hash[:12]}\n"

    tamper("UPDATE audit_auditevent SET target_id = %s WHERE seq = %s", ["x", 1])
    broken = manage("audit_verify")
    assert (broken.returncode, broken.stdout) == (1, "")
    assert f"seq 1 (event id {events[0].pk})" in broken.stderr


# --- audit_export -------------------------------------------------------------------------


def exported_jsonl(*args: str) -> list[dict]:
    out, _ = run("audit_export", "--format", "jsonl", *args)
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.django_db
def test_export_jsonl_has_every_field_in_seq_order(dated_events):
    rows = exported_jsonl()

    assert [row["seq"] for row in rows] == [1, 2, 3]
    assert all(tuple(row) == FIELDS for row in rows)
    first, event = rows[0], dated_events[0]
    assert first["id"] == event.pk
    assert first["created_at"] == "2025-03-01T12:00:00.000000+00:00"
    assert (first["actor"], first["action"]) == ("ops", "rollout.promote")
    assert (first["target_type"], first["target_id"]) == ("canary.Rollout", "7")
    assert first["payload"] == {"day": 1, "note": 'naïve, "quoted"\nline'}
    assert [(r["prev_hash"], r["hash"]) for r in rows] == [
        (e.prev_hash, e.hash) for e in dated_events
    ]


@pytest.mark.django_db
def test_export_jsonl_lines_can_be_rehashed_independently(dated_events):
    for row in exported_jsonl():
        event = AuditEvent(
            **{k: v for k, v in row.items() if k not in ("id", "created_at")},
            created_at=parse_datetime(row["created_at"]),
        )
        assert event_hash(event) == row["hash"]


@pytest.mark.django_db
def test_export_csv_has_a_header_and_json_payloads(dated_events):
    out, _ = run("audit_export", "--format", "csv")

    reader = csv.DictReader(io.StringIO(out, newline=""))
    rows = list(reader)
    assert tuple(reader.fieldnames or ()) == FIELDS
    assert [row["seq"] for row in rows] == ["1", "2", "3"]
    assert [row["hash"] for row in rows] == [e.hash for e in dated_events]
    assert json.loads(rows[0]["payload"]) == {"day": 1, "note": 'naïve, "quoted"\nline'}
    assert rows[0]["ip"] == ""


@pytest.mark.django_db
def test_export_csv_of_nothing_is_the_header_alone():
    out, _ = run("audit_export", "--format", "csv")

    assert out.splitlines() == [",".join(FIELDS)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "days"),
    [
        (("--since", "2025-03-02"), [2, 3]),
        (("--until", "2025-03-02"), [1]),
        (("--since", "2025-03-02T00:00:00+00:00", "--until", "2025-03-03"), [2]),
        (("--since", "2025-03-02T12:00:00"), [2, 3]),
        (("--until", "2025-03-02T13:00:00+01:00"), [1]),
        (("--action", "alert.ack"), [2, 3]),
        (("--action", "alert.ack", "--until", "2025-03-03"), [2]),
        (("--action", "no.such.action"), []),
    ],
)
def test_export_filters(dated_events, args, days):
    assert [row["payload"]["day"] for row in exported_jsonl(*args)] == days


@pytest.mark.django_db
@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2025-13-01", "2025-02-30T10:00"])
def test_export_rejects_a_bad_date_naming_the_option(option, value):
    with pytest.raises(CommandError, match=f"^{option}: '{value}' is not"):
        call_command("audit_export", option, value, stdout=io.StringIO())


@pytest.mark.django_db
def test_export_rejects_an_empty_window():
    with pytest.raises(CommandError, match="--since must be earlier than --until"):
        call_command(
            "audit_export", "--since", "2025-03-02", "--until", "2025-03-01", stdout=io.StringIO()
        )


@pytest.mark.django_db
def test_export_to_a_file(dated_events, tmp_path):
    path = tmp_path / "audit.jsonl"

    out, _ = run("audit_export", "--format", "jsonl", "--output", str(path))

    assert out == f"exported 3 events to {path}\n"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["hash"] for line in lines] == [e.hash for e in dated_events]


@pytest.mark.django_db
def test_export_to_an_unwritable_path_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="--output: cannot write"):
        call_command(
            "audit_export", "--output", str(tmp_path / "missing" / "x.csv"), stdout=io.StringIO()
        )
