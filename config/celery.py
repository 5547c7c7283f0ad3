import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("config")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def reuse_redis_clients() -> None:
    """Kombu's Redis channel builds a new redis.Redis client (over the channel's one
    connection pool) for each message it publishes, acknowledges or restores; building
    one sets up some 170 response callbacks, about 0.1 ms of CPU, several times per task
    sent and per task run. Each channel now keeps its client for as long as it keeps
    that pool (a channel whose connection is lost or that is forked gets a new pool,
    and so a new client). The asynchronous (consuming) clients are untouched."""
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel._create_client, "reuses_clients", False):
        return
    build = channel._create_client

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return build(self, asynchronous=True)
        pool = self.pool
        kept = self.__dict__.get("_kept_client")
        if kept is None or kept[0] is not pool:
            kept = self.__dict__["_kept_client"] = (pool, build(self))
        return kept[1]

    _create_client.reuses_clients = True  # type: ignore[attr-defined]
    channel._create_client = _create_client


reuse_redis_clients()


@worker_init.connect
def persistent_database_connections(**kwargs: Any) -> None:
    """A worker keeps its database connections across tasks (CELERY_DB_REUSE_MAX stops
    Celery's Django fixup from closing them after each task) for
    CELERY_WORKER_DB_CONN_MAX_AGE seconds. Before and after each task, Django's own check
    closes a connection that is too old, broken by an error, or left outside autocommit;
    a health check (CONN_HEALTH_CHECKS) then tests it on the task's first query, so a
    restarted database costs one reconnection. Runs in the worker's main process, before
    the pool processes are forked; one connection per pool process."""
    from django.conf import settings
    from django.db import connections

    max_age = getattr(settings, "CELERY_WORKER_DB_CONN_MAX_AGE", 0)
    if not max_age or not settings.CELERY_DB_REUSE_MAX:
        return
    for alias in connections:
        connections[alias].settings_dict["CONN_MAX_AGE"] = max_age
    task_prerun.connect(_close_old_connections, weak=False)
    task_postrun.connect(_close_old_connections, weak=False)


def _close_old_connections(sender: Any = None, **kwargs: Any) -> None:
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return  # runs inside the caller's connection and transaction
    from django.db import close_old_connections

    close_old_connections()
