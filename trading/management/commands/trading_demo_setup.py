"""Create the demo paper deployment on a fresh machine, so that `make run` shows signals,
paper orders, positions and equity moving with the CSV replay."""

from __future__ import annotations

import redis
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from audit.services import audit_record
from canary import killswitch
from trading.models import Deployment, KillSwitch

ACTOR = "trading_demo_setup"


class Command(BaseCommand):
    help = (
        "Create a demo paper Deployment (only when no deployment exists) trading the replayed "
        "CSV candles at the first canary allocation, with its kill switch ACTIVE."
    )

    def add_arguments(self, parser):
        parser.add_argument("--name", default="demo-paper")
        parser.add_argument("--symbols", default="ETH/BTC,LTC/BTC")
        parser.add_argument("--timeframe", default="5m")
        parser.add_argument("--cash", type=float, default=1.0, help="starting cash (quote)")
        parser.add_argument("--quote", default="BTC")
        parser.add_argument("--notional", type=float, default=0.1, help="full order size")
        parser.add_argument("--allocation", type=float, default=0.10)

    def handle(self, *args, **opts):
        existing = Deployment.objects.order_by("pk").first()
        if existing is not None:
            self._ensure_switch(existing)
            self.stdout.write(f"deployment {existing.name!r} exists; nothing created")
            return
        if not 0 <= opts["allocation"] <= 1 or opts["notional"] <= 0 or opts["cash"] <= 0:
            raise CommandError("need 0 <= allocation <= 1, notional > 0 and cash > 0")
        with transaction.atomic():
            deployment = Deployment.objects.create(
                name=opts["name"],
                exchange="paper",
                symbols=[s.strip() for s in opts["symbols"].split(",") if s.strip()],
                timeframe=opts["timeframe"],
                params={},
                full_order_notional=opts["notional"],
                allocation=opts["allocation"],
                starting_cash=opts["cash"],
                cash=opts["cash"],
                quote_currency=opts["quote"],
            )
            audit_record(
                action="deployment.create",
                actor=ACTOR,
                target=deployment,
                payload={
                    "exchange": "paper",
                    "symbols": deployment.symbols,
                    "allocation": deployment.allocation,
                    "full_order_notional": deployment.full_order_notional,
                    "starting_cash": deployment.starting_cash,
                },
            )
        self._activate(deployment)
        self.stdout.write(
            f"created paper deployment {deployment.name!r}: {', '.join(deployment.symbols)} "
            f"{deployment.timeframe}, {deployment.allocation:.0%} of "
            f"{deployment.full_order_notional} {deployment.quote_currency} per order"
        )

    def _activate(self, deployment: Deployment) -> None:
        try:
            killswitch.set_state(
                deployment=deployment,
                state=KillSwitch.ACTIVE,
                actor=ACTOR,
                reason="demo paper deployment",
            )
        except redis.RedisError as exc:
            self.stderr.write(f"kill switch not set (Redis: {exc}): the demo will not trade")

    def _ensure_switch(self, deployment: Deployment) -> None:
        """A paper demo whose Redis flag was lost gets its database mirror back."""
        if deployment.exchange != "paper":
            return
        try:
            killswitch.read_state(deployment.pk)
        except killswitch.KillSwitchUnreadable:
            try:
                killswitch.write_redis(deployment.pk, KillSwitch(deployment.kill_switch))
            except redis.RedisError as exc:
                self.stderr.write(f"kill switch not restored (Redis: {exc})")
