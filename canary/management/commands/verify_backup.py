"""`python manage.py verify_backup [--backup ID | --path FILE | --latest]`.

Checks the file against its sidecar and row (size, sha256, engine), restores it into a
scratch database and runs the integrity check there. Exit 0 when it passes, 1 otherwise.
"""

import json
import sys

from django.core.management.base import BaseCommand, CommandError

from canary.backup import backup_verify, latest_backup
from canary.models import Backup


class Command(BaseCommand):
    help = "Verify a backup: checksum, engine, and a restore into a scratch database."

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--backup", type=int, help="Backup id")
        which.add_argument("--path", help="backup file (works without its database row)")
        which.add_argument("--latest", action="store_true", help="the newest backup (default)")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, **options):
        backup, path = None, options["path"]
        if options["backup"] is not None:
            backup = Backup.objects.filter(pk=options["backup"]).first()
            if backup is None:
                raise CommandError(f"no backup with id {options['backup']}")
        elif path is None:
            backup = latest_backup()
            if backup is None:
                raise CommandError("no backup of this database engine exists")
        result = backup_verify(backup=backup, path=path, actor="cli:verify_backup")
        if options["json"]:
            self.stdout.write(json.dumps(result.as_dict(), indent=2))
        else:
            self.stdout.write(f"{'OK' if result.ok else 'FAILED'}: {result.path}: {result.reason}")
        if not result.ok:
            sys.exit(1)
