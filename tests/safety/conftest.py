"""Fixtures of the safety tests: private directories and Redis namespace per test,
deployments with ids that no other suite uses (the kill switch keys are global)."""

from __future__ import annotations

import random
import uuid

import pytest


@pytest.fixture(autouse=True)
def safety_dirs(settings, tmp_path):
    settings.SAFETY_BACKUP_DIR = tmp_path / "backups"
    settings.SAFETY_JOURNAL_DIR = tmp_path / "journal"
    settings.SAFETY_PREFLIGHT_DIR = tmp_path / "preflight"
    settings.SAFETY_REDIS_PREFIX = f"safety-test-{uuid.uuid4().hex[:8]}"
    settings.SAFETY_ORDER_GRACE_S = 0.0
    settings.SAFETY_FLAT_CHECK_PAUSE_S = 0.0
    yield tmp_path
    _forget_redis_keys(f"{settings.SAFETY_REDIS_PREFIX}:*")


def _forget_redis_keys(*patterns: str) -> None:
    import redis
    from django.conf import settings

    try:
        client = redis.Redis.from_url(
            settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1
        )
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=500))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass


@pytest.fixture
def make_deployment():
    from trading.models import Deployment, KillSwitch

    def make(symbols=("ETH/BTC",), **extra):
        pk = random.randint(10**8, 2 * 10**9)
        fields = {
            "name": f"dep-{pk}",
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

    made: list[int] = []
    yield make
    _forget_redis_keys(*(f"killswitch:{pk}" for pk in made))
