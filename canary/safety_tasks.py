"""Safety tasks: pre-flight, rollback runner, watchdogs, backups. Thin: ids in, services.

canary.rollback_run is acks_late: a task lost with its worker is redelivered by the broker
after the Redis visibility timeout (CELERY_BROKER_TRANSPORT_OPTIONS, 3600 s, above every
time limit here). That is only the backstop: the open rollback is resumed within seconds
at the next worker start (worker_ready) or by the watchdog once its lease expired.
"""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from .beatwatch import start_at_worker_ready, stop_at_worker_shutdown
from .watchdogs import resume_at_worker_start

worker_ready.connect(resume_at_worker_start, weak=False)
# Beat schedules every check, so its own stop is watched from each worker (beatwatch.py).
worker_ready.connect(start_at_worker_ready, weak=False)
worker_shutdown.connect(stop_at_worker_shutdown, weak=False)


@shared_task(
    name="canary.rollback_run",
    acks_late=True,
    ignore_result=True,
    time_limit=900,
    soft_time_limit=870,
)
def rollback_run_task(rollback_id: int) -> None:
    from .rollback import rollback_run

    rollback_run(rollback_id)


@shared_task(name="canary.rollback_offline", acks_late=True, ignore_result=True, time_limit=900)
def rollback_offline_task(deployment_id: int, cause: str) -> None:
    from .rollback import rollback_run_offline

    rollback_run_offline(deployment_id, cause=cause)


@shared_task(name="canary.watchdogs", ignore_result=True, time_limit=60, soft_time_limit=55)
def watchdogs_task() -> None:
    from .watchdogs import watchdogs_tick

    watchdogs_tick()


@shared_task(name="canary.backup_nightly", acks_late=True, ignore_result=True, time_limit=3600)
def backup_nightly_task() -> None:
    from .backup import backup_create

    backup_create(actor="beat", note="nightly")


@shared_task(name="canary.preflight", ignore_result=True, time_limit=300)
def preflight_task(deployment_id: int | None = None, actor: str = "system") -> int:
    from trading.models import Deployment

    from .preflight import preflight_run

    deployment = Deployment.objects.filter(pk=deployment_id).first() if deployment_id else None
    return preflight_run(actor=actor, deployment=deployment).pk
