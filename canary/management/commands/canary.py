"""``python manage.py canary <status|start|pause|resume|promote|rollback|export|evaluate>``

ROLLOUT is an id or a name; when left out, the one rollout that is not finished. Actions
are taken as ``--user USERNAME`` (that person's permissions apply, the audit trail names
them); a refused action prints its reason and exits with status 1.

``canary evaluate [--phase N] [--thresholds PATH | --rollout ROLLOUT] [FILE|-]`` reads
JSON lines of metrics and writes one JSON line each: the verdict and its reasons, or an
error naming the field (exit status 1 when a line was rejected, 2 on unusable arguments).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from canary import evaluate_cli, services
from canary.models import Rollout, RolloutState

ACTIONS = ("start", "pause", "resume", "promote", "rollback")
FINISHED = (RolloutState.ROLLED_BACK,)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(timedelta(seconds=round(seconds)))


class Command(BaseCommand):
    help = "Canary rollouts: status, lifecycle actions, export, and metrics evaluation."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", required=True)
        status = sub.add_parser(
            "status", help="phase, time, metrics against bounds, verdicts, alerts"
        )
        status.add_argument("rollout", nargs="?", help="id or name (default: every active rollout)")
        status.add_argument("--json", action="store_true", help="print the status as JSON")
        for name in ACTIONS:
            action = sub.add_parser(name, help=f"{name} a rollout")
            action.add_argument("rollout", nargs="?", help="id or name")
            action.add_argument("--user", required=True, help="the person taking the action")
            action.add_argument(
                "--reason", default="", help="why (required to promote, pause, roll back)"
            )
        export = sub.add_parser("export", help="phases, metrics, evaluations and decisions as JSON")
        export.add_argument("rollout", nargs="?", help="id or name")
        export.add_argument("--output", default="-", help="file to write, '-' for stdout")
        evaluate = sub.add_parser("evaluate", help="JSON-lines metrics in, verdicts out")
        evaluate_cli.add_arguments(evaluate)
        evaluate.add_argument(
            "file", nargs="?", default=None, help="JSON-lines file, '-' for stdin"
        )
        evaluate.add_argument("--rollout", default=None, help="use this rollout's thresholds")

    def handle(self, *args: Any, subcommand: str, **options: Any) -> None:
        handler: Callable[[dict[str, Any]], None] = {
            "status": self._status,
            "export": self._export,
            "evaluate": self._evaluate,
        }.get(subcommand, self._action)
        handler({**options, "subcommand": subcommand})

    # --- rollouts and people ------------------------------------------------------------

    def _rollout(self, ref: str | None, *, allow_pending: bool = True) -> Rollout:
        queryset = Rollout.objects.select_related("deployment")
        if ref:
            found = queryset.filter(pk=int(ref)) if ref.isdigit() else queryset.filter(name=ref)
            rollouts = list(found)
            if len(rollouts) > 1:
                raise CommandError(f"{len(rollouts)} rollouts are named {ref!r}: use the id")
        else:
            states = [*services.MONITORED_STATES, RolloutState.ROLLING_BACK]
            if allow_pending:
                states.append(RolloutState.PENDING)
            rollouts = list(queryset.filter(state__in=states))
            if len(rollouts) > 1:
                ids = ", ".join(f"{r.pk} ({r.name}, {r.state})" for r in rollouts)
                raise CommandError(f"several rollouts are open, name one: {ids}")
        if not rollouts:
            raise CommandError(f"no rollout {ref!r}" if ref else "no open rollout")
        return rollouts[0]

    def _user(self, username: str) -> Any:
        try:
            return get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist as exc:
            raise CommandError(f"no user {username!r}") from exc

    # --- actions ------------------------------------------------------------------------

    def _action(self, options: dict[str, Any]) -> None:
        op = options["subcommand"]
        rollout = self._rollout(options["rollout"])
        actor = self._user(options["user"])
        reason = options["reason"]
        try:
            if op == "start":
                services.rollout_start(rollout=rollout, actor=actor)
            elif op == "promote":
                services.rollout_promote(rollout=rollout, actor=actor, reason=reason)
            elif op == "pause":
                services.rollout_pause(rollout=rollout, actor=actor, reason=reason)
            elif op == "resume":
                services.rollout_resume(rollout=rollout, actor=actor, reason=reason)
            else:
                rollback = services.rollout_rollback(rollout=rollout, actor=actor, reason=reason)
                self.stdout.write(f"rollback {rollback.pk} ({rollback.state})")
        except services.RolloutError as exc:
            raise CommandError(f"{op} refused: {exc.message}", returncode=1) from exc
        self.stdout.write(
            f"rollout {rollout.pk} {rollout.name}: {rollout.state}, phase {rollout.current_phase}"
        )

    # --- status -------------------------------------------------------------------------

    def _status(self, options: dict[str, Any]) -> None:
        if options["rollout"]:
            rollouts = [self._rollout(options["rollout"])]
        else:
            states = [*services.MONITORED_STATES, RolloutState.ROLLING_BACK, RolloutState.PENDING]
            rollouts = list(Rollout.objects.select_related("deployment").filter(state__in=states))
        statuses = [services.rollout_status(rollout=r) for r in rollouts]
        if options["json"]:
            self.stdout.write(json.dumps(statuses, indent=2, cls=DjangoJSONEncoder))
            return
        if not statuses:
            self.stdout.write("no open rollout")
        for status in statuses:
            self.stdout.write("\n".join(status_lines(status)))

    # --- export -------------------------------------------------------------------------

    def _export(self, options: dict[str, Any]) -> None:
        rollout = self._rollout(options["rollout"])
        text = json.dumps(services.rollout_export(rollout=rollout), indent=2, cls=DjangoJSONEncoder)
        if options["output"] == "-":
            self.stdout.write(text)
            return
        with open(options["output"], "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        self.stderr.write(f"rollout {rollout.pk} exported to {options['output']}")

    # --- evaluate -----------------------------------------------------------------------

    def _evaluate(self, options: dict[str, Any]) -> None:
        if options.get("file"):
            options["input"] = options["file"]
        if options.get("rollout"):
            if options.get("thresholds"):
                raise CommandError("give --thresholds or --rollout, not both", returncode=2)
            rollout = self._rollout(options["rollout"])
            with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as handle:
                json.dump(rollout.thresholds, handle)
                handle.flush()
                status = self._run_evaluate({**options, "thresholds": handle.name})
        else:
            status = self._run_evaluate(options)
        if status:
            raise SystemExit(status)

    def _run_evaluate(self, options: dict[str, Any]) -> int:
        return evaluate_cli.run(options, sys.stdin, self.stdout, self.stderr)


def status_lines(status: dict[str, Any]) -> list[str]:
    """The human form of ``services.rollout_status``."""
    r = status["rollout"]
    lines = [
        f"rollout {r['id']} {r['name']!r} [{r['state']}]"
        + (f" {r['state_reason']}" if r["state_reason"] else "")
        + f"  config v{r['config_version']}{'  REHEARSAL' if r['rehearsal'] else ''}"
    ]
    phase = status["phase"]
    if phase:
        lines.append(
            f"phase {phase['index']}/{r['phases']} at {phase['allocation']:.0%}: "
            f"in phase {_duration(phase['in_phase_s'])}, left {_duration(phase['left_s'])} "
            f"(ends {phase['ends_at']}; {phase['extensions']} extension(s), "
            f"{phase['consecutive_warnings']} WARNING(s) in a row)"
        )
    if status.get("gate"):
        gate = status["gate"]
        lines.append("gate #1: " + ("passed" if gate["ok"] else "; ".join(gate["problems"])))
    if status["metrics"]:
        lines.append(f"metrics at {status['metrics_at']}:")
        lines.append(f"  {'metric':<16}{'value':>14}  {'target':<14}{'fail':<14}state")
        for row in status["metrics"]:
            lines.append(
                f"  {row['metric']:<16}{_value(row['value']):>14}  {row['target']:<14}"
                f"{row['fail']:<14}{row['state']}"
            )
    lines.append("last verdicts:" if status["last_verdicts"] else "last verdicts: none")
    for v in status["last_verdicts"]:
        reasons = "; ".join(v["reasons"])
        lines.append(
            f"  {v['at']}  phase {v['phase']}  {v['verdict']:<12} {v['action']:<13} {reasons}"
        )
    lines.append("open alerts:" if status["open_alerts"] else "open alerts: none")
    for a in status["open_alerts"]:
        lines.append(f"  {a['at']}  [{a['severity']}] {a['message']}")
    return lines


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
