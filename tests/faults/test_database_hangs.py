"""A database server that stops answering without refusing (frozen, a dropped network
path): the watchdog's check must call it down within its soft time limit, so that the
failed ticks that start the offline rollback are counted. (A refused connection, the
quick case, is tests/faults/test_database_down.py.)"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
from django.db import connection

from canary.watchdogs import db_available
from config.celery import app

from .harness import restored_connection

pytestmark = pytest.mark.django_db(transaction=True)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections are taken by the kernel and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@contextlib.contextmanager
def database_at(port: int) -> Iterator[None]:
    with restored_connection():
        connection.close()
        connection.settings_dict.update(HOST="127.0.0.1", PORT=port)
        yield


def test_a_database_that_does_not_answer_is_down_within_the_watchdogs_limit():
    if connection.vendor != "postgresql":
        pytest.skip("libpq's connection timeouts: PostgreSQL only")
    app.loader.import_default_modules()
    options = connection.settings_dict["OPTIONS"]
    soft_limit = app.tasks["canary.watchdogs"].soft_time_limit
    assert 0 < options["connect_timeout"] < soft_limit
    assert 0 < options["tcp_user_timeout"] / 1000 < soft_limit
    with silent_server() as port, database_at(port):
        assert db_available() is False
    assert db_available() is True
