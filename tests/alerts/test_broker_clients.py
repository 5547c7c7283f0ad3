"""Kombu's Redis channels keep one client per connection pool (config.celery): tasks are
published through it, and a channel that lost its pool builds a new one."""

import pytest


@pytest.fixture
def channel(redis_url):
    from kombu import Connection

    with Connection(redis_url) as conn:
        chan = conn.default_channel
        yield chan


def test_a_channel_publishes_through_one_client_per_pool(channel):
    from kombu import Exchange, Producer, Queue

    queue = Queue("test-broker-clients", Exchange("test-broker-clients"), "k")
    producer = Producer(channel)
    queue(channel).declare()
    try:
        with channel.conn_or_acquire() as first:
            pass
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="k")
        with channel.conn_or_acquire() as again:
            assert again is first
        assert channel.client is not first  # the consuming client is its own
        got = [queue(channel).get(no_ack=True).payload["n"] for _ in range(3)]
        assert got == [0, 1, 2]

        channel._disconnect_pools()  # as after a lost connection or a fork
        with channel.conn_or_acquire() as renewed:
            assert renewed is not first
            assert renewed.connection_pool is channel.pool
            assert renewed.ping()
    finally:
        queue(channel).delete()
