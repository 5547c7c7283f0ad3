"""Thin tasks: ids in, a service call, retries decided by the service's outcome."""

import logging
import threading
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.db import DatabaseError, connection

from .services import (
    candles_process,
    candles_process_pending,
    deliveries_sweep,
    delivery_send,
    pending_streams,
    queue_run_anyway,
)

log = logging.getLogger(__name__)


@shared_task(
    name="alerts.process_candles", bind=True, acks_late=True, time_limit=120, soft_time_limit=100
)
def process_candles(self: Any, candle_ids: list[int], pending: bool = False) -> int:
    """The streams of these candles; ``pending``: every stream with pending candles (the
    run queued by candles_queue, which takes candles stored after these too). Run eagerly
    (in the request that stored them) it does not wait for more."""
    if pending:
        linger_s = 0.0 if self.request.is_eager else None
        return len(candles_process_pending(linger_s=linger_s, run_id=self.request.id))
    return len(candles_process(candle_ids=candle_ids))


@shared_task(name="alerts.deliver", acks_late=True, time_limit=60, soft_time_limit=45)
def deliver(delivery_id: int) -> str:
    """One queued delivery (email, webhook). A transient failure re-queues this task with
    exponential backoff; one channel's failures never hold up another's tasks."""
    outcome = delivery_send(delivery_id=delivery_id)
    if outcome.retry_in is not None:
        deliver.apply_async((delivery_id,), countdown=outcome.retry_in)
    return outcome.status


@shared_task(name="alerts.sweep_deliveries", time_limit=60, soft_time_limit=50)
def sweep_deliveries() -> int:
    """Beat, every ALERTS_SWEEP_INTERVAL_S: queue again the deliveries whose task was lost."""
    return len(deliveries_sweep())


def sweep_at_worker_start(sender: Any = None, **kwargs: Any) -> None:
    """Celery worker_ready: one sweep at once (in a thread: a database that is down must not
    hold the worker's start), for the deliveries a dead predecessor left behind, and a
    candle-processing run if candles are pending, whatever holds the flag (a run killed
    with its flag held would otherwise hold off the next one until the flag expires; a run
    still going takes the flag back and the one sent here ends, queue_run_anyway)."""
    threading.Thread(target=_sweep_once, name="deliveries-sweep", daemon=True).start()


def _sweep_once() -> None:
    try:
        deliveries_sweep()
        if pending_streams():
            queue_run_anyway()
    except DatabaseError as exc:
        log.error("worker start: deliveries not swept, database unavailable: %s", exc)
    except Exception:
        log.exception("worker start: deliveries not swept or pending candles not queued")
    finally:
        connection.close()


worker_ready.connect(sweep_at_worker_start, weak=False)
