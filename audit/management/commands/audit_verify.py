"""`python manage.py audit_verify`: walk the audit hash chain; exit 1 at the first break."""

from django.core.management.base import BaseCommand
from django.db import connection, transaction

from audit.models import AuditEvent
from audit.services import GENESIS, ChainBreak, audit_verify

HASH_PREFIX = 12


def verify_snapshot() -> tuple[ChainBreak | None, int, str]:
    """Verify the chain and read its last event from one consistent snapshot, so a
    concurrent writer advancing the head mid-walk is not mistaken for a break (when
    called inside a transaction, that transaction's isolation applies).

    On SQLite the transaction is IMMEDIATE (the project's setting): writers wait for the
    walk to finish."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        broken = audit_verify()
        last = AuditEvent.objects.order_by("-seq").values_list("seq", "hash").first()
    seq, head = last if last else (0, GENESIS)
    return broken, seq, head


def describe_break(broken: ChainBreak) -> str:
    where = f"event id {broken.event_id}" if broken.event_id else "no such event"
    return f"audit chain broken at seq {broken.seq} ({where}): {broken.reason}"


class Command(BaseCommand):
    help = "Verify the audit hash chain. Exit 0 when it holds, 1 naming the first break."

    def handle(self, *args: object, **options: object) -> None:
        broken, count, head = verify_snapshot()
        if broken is not None:
            self.stderr.write(describe_break(broken))
            raise SystemExit(1)
        self.stdout.write(f"audit chain holds: {count} events, head {head[:HASH_PREFIX]}")
