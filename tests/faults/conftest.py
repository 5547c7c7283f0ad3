"""Fixtures of the fault tests: the test process pointed at a private Redis, deployments
with ids no other suite uses, safety directories of their own. And the session-wide
watch for secrets in the logs (tests/faults/secrets_watch.py), installed as soon as this
directory is collected; its test is moved to the very end of the session."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.safety.conftest import _forget_redis_keys

from .secrets_watch import SecretWatch

SECRETS_TEST = "tests/faults/test_secrets.py::test_no_secret_reaches_the_logs_of_this_run"
WATCH = pytest.StashKey[SecretWatch]()


def pytest_configure(config: pytest.Config) -> None:
    from .harness import ROOT

    watch = SecretWatch(ROOT)
    watch.install()
    watch.add_settings()
    config.stash[WATCH] = watch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [item for item in items if item.nodeid == SECRETS_TEST]
    for item in last:
        items.remove(item)
    items.extend(last)


@pytest.fixture
def secret_watch(request) -> SecretWatch:
    return request.config.stash[WATCH]


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def point_redis(settings) -> Iterator[Callable[[str], None]]:
    """Point this process's Redis clients (kill switch, heartbeats, safety keys) at `url`;
    back to the suite's Redis afterwards."""
    from canary.heartbeat import redis_client

    def point(url: str) -> None:
        settings.REDIS_URL = url
        redis_client.cache_clear()

    yield point
    redis_client.cache_clear()


@pytest.fixture
def safety_tmp(settings, tmp_path) -> Iterator[Any]:
    settings.SAFETY_BACKUP_DIR = tmp_path / "backups"
    settings.SAFETY_JOURNAL_DIR = tmp_path / "journal"
    settings.SAFETY_PREFLIGHT_DIR = tmp_path / "preflight"
    settings.SAFETY_REDIS_PREFIX = f"faults-{uuid.uuid4().hex[:8]}"
    settings.SAFETY_ORDER_GRACE_S = 0.0
    settings.SAFETY_FLAT_CHECK_PAUSE_S = 0.0
    yield tmp_path
    _forget_redis_keys(f"{settings.SAFETY_REDIS_PREFIX}:*")


@pytest.fixture
def deployment_factory(db) -> Iterator[Callable[..., Any]]:
    from trading.models import Deployment, KillSwitch

    made: list[int] = []

    def make(symbols: tuple[str, ...] = ("ETH/BTC",), **extra: Any) -> Deployment:
        pk = random.randint(10**8, 2 * 10**9)
        fields: dict[str, Any] = {
            "name": f"faults-{pk}",
            "exchange": "paper",
            "symbols": list(symbols),
            "timeframe": "5m",
            "full_order_notional": 0.1,
            "allocation": 0.1,
            "kill_switch": KillSwitch.ACTIVE,
            "starting_cash": 1.0,
            "cash": 1.0,
            "quote_currency": "BTC",
        }
        fields.update(extra)
        made.append(pk)
        return Deployment.objects.create(id=pk, **fields)

    yield make
    _forget_redis_keys(*(f"killswitch:{pk}" for pk in made))
