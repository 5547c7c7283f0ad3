"""`python manage.py backup_db [--note TEXT] [--keep N]`: back up the database now."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from canary.backup import BackupError, backup_create, retention_apply


class Command(BaseCommand):
    help = "Back up the database (SQLite online backup / pg_dump -Fc) with a checksum sidecar."

    def add_arguments(self, parser):
        parser.add_argument("--note", default="manual", help="free text kept with the backup")
        parser.add_argument(
            "--keep", type=int, default=None, help="backups to keep (default SAFETY_BACKUP_KEEP)"
        )

    def handle(self, *args, **options):
        try:
            backup = backup_create(actor="cli:backup_db", note=options["note"])
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        if options["keep"] is not None and options["keep"] != settings.SAFETY_BACKUP_KEEP:
            retention_apply(keep=options["keep"])
        self.stdout.write(
            f"backup {backup.pk}: {backup.path} ({backup.size_bytes} bytes, sha256 {backup.sha256})"
        )
