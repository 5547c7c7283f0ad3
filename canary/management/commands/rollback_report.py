"""`python manage.py rollback_report [--rollback ID] [--json]`: a rollback's report.

Default: the latest rollback. Prints its state, cause, stage-1 timing against the target,
every step with start, end and outcome, the P&L impact and the database snapshot; --json
prints the stored report as is.
"""

import json

from django.core.management.base import BaseCommand, CommandError

from canary.models import Rollback


class Command(BaseCommand):
    help = "Print a rollback's report (steps, timing, P&L impact, snapshot)."

    def add_arguments(self, parser):
        parser.add_argument("--rollback", type=int, help="Rollback id (default: the latest)")
        parser.add_argument("--json", action="store_true", help="the stored JSON report")

    def handle(self, *args, **options):
        qs = Rollback.objects.select_related("deployment")
        rollback = qs.filter(pk=options["rollback"]).first() if options["rollback"] else qs.first()
        if rollback is None:
            raise CommandError("no such rollback")
        if options["json"]:
            self.stdout.write(json.dumps(rollback.report, indent=2, default=str))
            return
        report = rollback.report or {}
        stage1 = report.get("stage1", {})
        self.stdout.write(
            f"rollback {rollback.pk} of {rollback.deployment.name}: {rollback.state}\n"
            f"trigger {rollback.trigger}: {rollback.cause} (by {rollback.requested_by})\n"
            f"stage 1: {stage1.get('from_request_s', '-')} s from request "
            f"(target {stage1.get('target_s', '-')} s, within: {stage1.get('within_target', '-')})"
        )
        for step in rollback.steps.order_by("stage", "id"):
            ended = f"{step.ended_at:%H:%M:%S.%f}"[:-3] if step.ended_at else "-"
            self.stdout.write(
                f"  {step.stage} {step.name:<16} {step.outcome or 'running':<8} "
                f"{step.started_at:%H:%M:%S.%f}"[:-3]
                + f" -> {ended}"
            )
        for key in ("pnl", "backup", "restore"):
            if report.get(key):
                self.stdout.write(f"{key}: {json.dumps(report[key], default=str)}")
