"""Thin tasks: ids in, a service call, retries decided by the service's outcome."""

from celery import shared_task

from .services import candles_process, delivery_send


@shared_task(name="alerts.process_candles", acks_late=True, time_limit=120, soft_time_limit=100)
def process_candles(candle_ids: list[int]) -> int:
    return len(candles_process(candle_ids=candle_ids))


@shared_task(name="alerts.deliver", acks_late=True, time_limit=60, soft_time_limit=45)
def deliver(delivery_id: int) -> str:
    """One queued delivery (email, webhook). A transient failure re-queues this task with
    exponential backoff; one channel's failures never hold up another's tasks."""
    outcome = delivery_send(delivery_id=delivery_id)
    if outcome.retry_in is not None:
        deliver.apply_async((delivery_id,), countdown=outcome.retry_in)
    return outcome.status
