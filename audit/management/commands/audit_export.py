"""`python manage.py audit_export`: stream audit events in seq order as JSON lines or CSV."""

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, Protocol

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from audit.models import AuditEvent

FIELDS = (
    "id",
    "seq",
    "created_at",
    "actor_user_id",
    "actor",
    "action",
    "target_type",
    "target_id",
    "payload",
    "ip",
    "user_agent",
    "prev_hash",
    "hash",
)
CHUNK = 2000


class Writable(Protocol):
    def write(self, text: str, /) -> object: ...


def parse_instant(option: str, value: str) -> datetime:
    """An ISO 8601 datetime or date; naive values are UTC, a date means its midnight."""
    try:
        moment = parse_datetime(value)
        if moment is None:
            day = parse_date(value)
            moment = datetime.combine(day, time.min) if day else None
    except ValueError as exc:
        raise CommandError(f"{option}: {value!r} is not a valid date or datetime ({exc})") from exc
    if moment is None:
        raise CommandError(
            f"{option}: {value!r} is not an ISO 8601 date or datetime "
            "(e.g. 2025-01-31 or 2025-01-31T14:00:00+00:00)"
        )
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


def select_events(
    *, since: datetime | None, until: datetime | None, action: str | None
) -> QuerySet[AuditEvent]:
    """Events with since <= created_at < until, optionally of one action, in seq order."""
    qs = AuditEvent.objects.order_by("seq")
    if since is not None:
        qs = qs.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    if action:
        qs = qs.filter(action=action)
    return qs


def iter_rows(qs: QuerySet[AuditEvent]) -> Iterator[dict[str, Any]]:
    for row in qs.values(*FIELDS).iterator(chunk_size=CHUNK):
        row["created_at"] = row["created_at"].isoformat(timespec="microseconds")
        yield row


def write_jsonl(rows: Iterator[dict[str, Any]], out: Writable) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row, cls=DjangoJSONEncoder, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(rows: Iterator[dict[str, Any]], out: Writable) -> int:
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    count = 0
    for row in rows:
        payload = json.dumps(row["payload"], cls=DjangoJSONEncoder, sort_keys=True)
        writer.writerow(row | {"payload": payload})
        count += 1
    return count


WRITERS = {"jsonl": write_jsonl, "csv": write_csv}


class _StdoutSink:
    """A file-like view of the command's stdout that adds no line endings of its own."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> None:
        self.wrapper.write(text, ending="")


class Command(BaseCommand):
    help = (
        "Export audit events in seq order (streamed). --since is inclusive, --until "
        "exclusive; naive times are UTC."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=sorted(WRITERS), default="jsonl")
        parser.add_argument("--since", help="ISO 8601 date or datetime (inclusive)")
        parser.add_argument("--until", help="ISO 8601 date or datetime (exclusive)")
        parser.add_argument("--action", help="Only events with exactly this action")
        parser.add_argument("--output", type=Path, help="Write here instead of stdout")

    def handle(self, *args: object, **options: Any) -> None:
        since = parse_instant("--since", options["since"]) if options["since"] else None
        until = parse_instant("--until", options["until"]) if options["until"] else None
        if since and until and since >= until:
            raise CommandError("--since must be earlier than --until")
        rows = iter_rows(select_events(since=since, until=until, action=options["action"]))
        write = WRITERS[options["format"]]
        with self._open(options["output"]) as out:
            count = write(rows, out)
        if options["output"]:
            self.stdout.write(f"exported {count} events to {options['output']}")

    @contextmanager
    def _open(self, path: Path | None) -> Iterator[Writable]:
        if path is None:
            yield _StdoutSink(self.stdout)
            return
        try:
            handle = path.open("w", encoding="utf-8", newline="")
        except OSError as exc:
            raise CommandError(f"--output: cannot write {path}: {exc}") from exc
        with handle:
            yield handle
