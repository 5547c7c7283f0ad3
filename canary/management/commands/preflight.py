"""`python manage.py preflight [--deployment NAME|ID] [--json PATH] [--only CHECK ...]`.

Runs the pre-flight checks, prints a table, writes the JSON report (var/preflight/ unless
--json) and stores a PreflightRun for gate #1. Exit 0 for GO, 1 for NO-GO. Never a
traceback: anything unexpected is a NO-GO with its reason.
"""

import sys
import textwrap

from django.core.management.base import BaseCommand, CommandError

from canary.preflight import FAIL, GO, REGISTRY, preflight_run
from trading.models import Deployment

COLUMNS = "{name:<20} {status:<5} {critical:<5} {duration:>9}  {detail}"


class Command(BaseCommand):
    help = "GO/NO-GO pre-flight check of everything the strategy needs."

    def add_arguments(self, parser):
        parser.add_argument("--deployment", help="deployment name or id (default: the only one)")
        parser.add_argument("--json", dest="json_path", help="where to write the JSON report")
        parser.add_argument("--only", nargs="+", choices=sorted(REGISTRY), help="run these checks")
        parser.add_argument("--actor", default="cli:preflight", help="who runs it (audit)")

    def _deployment(self, ref):
        if not ref:
            return None
        query = Deployment.objects.filter(pk=int(ref)) if ref.isdigit() else None
        found = (query.first() if query is not None else None) or Deployment.objects.filter(
            name=ref
        ).first()
        if found is None:
            raise CommandError(f"no deployment {ref!r}")
        return found

    def handle(self, *args, **options):
        try:
            run = preflight_run(
                actor=options["actor"],
                deployment=self._deployment(options["deployment"]),
                json_path=options["json_path"],
                names=options["only"],
            )
        except CommandError:
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback: NO-GO with the reason
            self.stderr.write(f"NO-GO: pre-flight could not run: {type(exc).__name__}: {exc}")
            sys.exit(1)
        self._table(run)
        if run.decision != GO:
            sys.exit(1)

    def _table(self, run):
        self.stdout.write(
            COLUMNS.format(
                name="CHECK", status="STAT", critical="CRIT", duration="TIME", detail="DETAIL"
            )
        )
        for check in run.checks:
            detail = textwrap.shorten(check["detail"], width=110, placeholder="...")
            line = COLUMNS.format(
                name=check["name"],
                status=check["status"],
                critical="yes" if check["critical"] else "no",
                duration=f"{check['duration_ms']:.0f} ms",
                detail=detail,
            )
            style = self.style.ERROR if check["status"] == FAIL else self.style.SUCCESS
            self.stdout.write(
                style(line) if check["status"] != "WARN" else self.style.WARNING(line)
            )
        stored = (
            f"stored as PreflightRun {run.pk}" if run.pk else "NOT stored: database unavailable"
        )
        total = (run.ended_at - run.started_at).total_seconds()
        self.stdout.write(
            f"\nDECISION: {run.decision} in {total:.2f} s; report {run.report_path}; {stored}"
        )
