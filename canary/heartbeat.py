"""Heartbeats of the worker and the beat, kept in Redis.

The beat marks itself each time it publishes a task (signal in the beat process);
the worker marks itself when it runs the `canary.heartbeat` task that the beat
schedules every HEARTBEAT_INTERVAL_S.
"""

import contextlib
import time
from functools import lru_cache

import redis
from celery.signals import beat_init, before_task_publish
from django.conf import settings

KEY_WORKER = "hb:worker"
KEY_BEAT = "hb:beat"
_in_beat = False


@lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)


def mark(key: str, now: float | None = None) -> None:
    redis_client().set(key, repr(now if now is not None else time.time()), ex=3600)


def last_seen(key: str) -> float | None:
    raw = redis_client().get(key)
    return float(raw) if raw is not None else None


@beat_init.connect
def _on_beat_init(sender=None, **kwargs) -> None:
    global _in_beat
    _in_beat = True
    with contextlib.suppress(redis.RedisError):
        mark(KEY_BEAT)


@before_task_publish.connect
def _on_publish(sender=None, **kwargs) -> None:
    if not _in_beat:
        return
    with contextlib.suppress(redis.RedisError):
        mark(KEY_BEAT)
