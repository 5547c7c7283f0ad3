"""The web process must not hold one database connection per request it served: under
ASGI each request's ORM work runs on a thread of its own, so a persistent connection
(CONN_MAX_AGE > 0) is never reused and stays open until garbage-collected (Django ticket
#33497), until the garbage collector happens to close it. Bounded: 30 requests; the
connections are counted from /proc after each one."""

from __future__ import annotations

import pytest

from tests.faults.harness import private_stack

from .clients import database_handles

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
REQUESTS = 30


def _vendor() -> str:
    from django.db import connection

    return connection.vendor


def test_the_web_process_does_not_keep_a_connection_per_request(redis_url):
    from django.db import connection

    database = connection.settings_dict["NAME"]
    name = str(database) if connection.vendor == "sqlite" else "postgresql"
    with private_stack(worker=False, persistent=True) as (live, _):
        web = live.stack.procs["web"].pid
        for _ in range(3):
            live.request("GET", "/health")
        before = database_handles(web, name)
        held = []
        for _ in range(REQUESTS):
            live.request("GET", "/health")
            held.append(database_handles(web, name))
    print(
        f"\nweb process database connections: {before}, then up to {max(held)} over {REQUESTS} requests"
    )
    assert max(held) - before <= 2, f"up to {max(held) - before} more connections"
