"""Every registered task can be sent with the configured limits (a task whose own hard
limit is below a soft limit is refused by Celery at apply time, silently in beat)."""

import pytest

from config.celery import app


def _project_tasks():
    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def test_project_tasks_are_registered():
    names = set(_project_tasks())
    assert {"canary.heartbeat", "alerts.process_candles", "canary.monitor"} <= names


def test_time_limits_are_consistent():
    default_hard = app.conf.task_time_limit
    default_soft = app.conf.task_soft_time_limit
    for name, task in _project_tasks().items():
        hard = task.time_limit if task.time_limit is not None else default_hard
        soft = task.soft_time_limit if task.soft_time_limit is not None else default_soft
        if hard is not None and soft is not None:
            assert soft <= hard, f"{name}: soft limit {soft} > hard limit {hard}"


def test_the_worker_retries_the_broker_for_ever():
    """Celery's default gives up after 100 reconnection attempts and the worker exits,
    taking the watchdogs and the rollback with it during a long Redis outage."""
    assert app.conf.broker_connection_max_retries is None
    assert app.conf.broker_connection_retry_on_startup is True


def test_heartbeat_task_runs_and_marks_the_worker(redis_url):
    from canary.heartbeat import KEY_WORKER, last_seen, redis_client

    redis_client().delete(KEY_WORKER)
    app.tasks["canary.heartbeat"].apply_async().get()
    assert last_seen(KEY_WORKER) is not None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("entry", "interval"),
    [
        ("safety-watchdogs", "SAFETY_WATCHDOG_INTERVAL_S"),
        ("canary-monitor", "CANARY_MONITOR_INTERVAL_S"),
        ("alerts-sweep-deliveries", "ALERTS_SWEEP_INTERVAL_S"),
    ],
)
def test_frequent_ticks_expire_in_the_database_scheduler(entry, interval):
    """Beat copies the schedule into django_celery_beat's table, which keeps only
    ``expire_seconds``: a tick that waited longer than its interval behind a busy or stopped
    worker expires instead of piling up ahead of the rollbacks a starting worker resumes."""
    from django.conf import settings
    from django_celery_beat.schedulers import ModelEntry

    stored = ModelEntry.from_entry(entry, app=app, **settings.CELERY_BEAT_SCHEDULE[entry])
    assert stored.model.expire_seconds == max(getattr(settings, interval), 1.0)
    assert stored.options.get("expires") == max(getattr(settings, interval), 1.0)
