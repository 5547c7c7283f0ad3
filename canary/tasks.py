"""Celery tasks of the canary app. Thin: each loads by id and calls a service.

Lifecycle tasks live in canary/monitor_tasks.py, safety tasks (pre-flight, rollback,
watchdogs, backups) in canary/safety_tasks.py; both are imported here so that Celery's
autodiscovery registers them.
"""

from celery import shared_task

from . import monitor_tasks, safety_tasks  # noqa: F401
from .heartbeat import KEY_WORKER, mark


@shared_task(name="canary.heartbeat", ignore_result=True, time_limit=10, soft_time_limit=8)
def heartbeat() -> None:
    mark(KEY_WORKER)
