"""Canary lifecycle tasks: the monitor that evaluates gates and drives phases.

Beat schedules ``canary.monitor`` every CANARY_MONITOR_INTERVAL_S (default 10 s); a tick
that waited longer than one interval in the queue expires instead of piling up.
"""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from .monitor import monitor_all


@shared_task(
    name="canary.monitor",
    acks_late=True,
    ignore_result=True,
    time_limit=60,
    soft_time_limit=50,
)
def monitor() -> list[dict]:
    return [result.to_dict() for result in monitor_all(now=timezone.now())]
