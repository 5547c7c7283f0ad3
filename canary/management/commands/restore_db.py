"""`python manage.py restore_db --backup ID [--reason TEXT] [--user NAME] [--rollback ID]`.

Verifies the backup first (refusing, with the reason, before anything is overwritten),
restores it over the live database, then runs the integrity check. With --rollback the
restore is stage 3 of that rollback (the user must hold audit.restore_database).
"""

import getpass
import sys

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from audit.services import audit_record
from canary.backup import BackupError, BackupRefused, backup_restore_file
from canary.models import Backup, Rollback
from canary.rollback import RollbackDenied, rollback_restore


class Command(BaseCommand):
    help = "Restore a verified backup over the live database, then check its integrity."

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--backup", type=int, help="Backup id")
        which.add_argument("--path", help="backup file (when its row is gone)")
        parser.add_argument("--reason", default="", help="why (required with --rollback)")
        parser.add_argument("--user", help="user performing the restore (permission checked)")
        parser.add_argument("--rollback", type=int, help="run as stage 3 of this rollback")

    def _user(self, name):
        if not name:
            return None
        user = get_user_model().objects.filter(username=name).first()
        if user is None:
            raise CommandError(f"no user {name!r}")
        if not user.has_perm("audit.restore_database"):
            raise CommandError(f"{name} lacks the permission audit.restore_database")
        return user

    def handle(self, *args, **options):
        backup = None
        if options["backup"] is not None:
            backup = Backup.objects.filter(pk=options["backup"]).first()
            if backup is None:
                raise CommandError(f"no backup with id {options['backup']}")
        user = self._user(options["user"])
        if options["rollback"] is not None:
            return self._stage3(options, backup, user)
        actor = user or f"cli:{getpass.getuser()}"
        try:
            result = backup_restore_file(backup=backup, path=options["path"])
        except (BackupRefused, BackupError) as exc:
            self.stderr.write(f"REFUSED: {exc}")
            sys.exit(1)
        with transaction.atomic():
            audit_record(
                action="backup.restored",
                actor=actor,
                target_type="backup.file",
                target_id=result.as_dict()["file"],
                payload=result.as_dict() | {"reason": options["reason"][:300]},
            )
        self._report(result.integrity.ok, result.integrity.problems, result.integrity.notes)

    def _stage3(self, options, backup, user):
        rollback = Rollback.objects.filter(pk=options["rollback"]).first()
        if rollback is None or backup is None or user is None:
            raise CommandError("--rollback needs an existing rollback, --backup ID and --user")
        try:
            rollback = rollback_restore(
                rollback=rollback, backup=backup, actor=user, reason=options["reason"]
            )
        except (BackupRefused, BackupError, RollbackDenied) as exc:
            self.stderr.write(f"REFUSED: {exc}")
            sys.exit(1)
        integrity = rollback.report.get("restore", {}).get("integrity", {})
        self._report(integrity.get("ok", False), integrity.get("problems", []), [])

    def _report(self, ok, problems, notes):
        for note in notes:
            self.stdout.write(f"note: {note}")
        if not ok:
            self.stderr.write("integrity check FAILED: " + "; ".join(problems))
            sys.exit(1)
        self.stdout.write("restored; integrity check passed")
