"""A small world for the permission matrix: people in each role, rollouts in the state each
action needs, a completed rollback with a backup, an alert; each built on demand."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.utils import timezone

SETUP = "test-setup"
GOOD_EVIDENCE = {"smc_alignment_pct": 85.0, "reward_risk": 3.5, "liquidation_sweep_errors": 0}
SHORT_PLAN = [
    {"allocation": 0.1, "min_duration_s": 60, "extension_s": 30},
    {"allocation": 1.0, "min_duration_s": 120, "extension_s": 30},
]


@pytest.fixture(autouse=True)
def _isolated(settings, tmp_path):
    """Fast password hashing, private pre-flight/backup folders and Redis namespace, and a
    clean throttle cache (SQLite reuses user ids after each test's rollback)."""
    from django.core.cache import cache

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.SAFETY_PREFLIGHT_DIR = tmp_path / "preflight"
    settings.SAFETY_BACKUP_DIR = tmp_path / "backups"
    settings.SAFETY_REDIS_PREFIX = f"perms-test-{uuid.uuid4().hex[:8]}"
    cache.clear()
    yield
    cache.clear()


@dataclass
class Scene:
    make_user: Any
    deployments: list[int] = field(default_factory=list)
    _helpers: dict[str, Any] = field(default_factory=dict)

    def helper(self, role: str) -> Any:
        if role not in self._helpers:
            self._helpers[role] = self.make_user(f"helper-{role.lower()}", role)
        return self._helpers[role]

    def deployment(self) -> Any:
        from trading.models import Deployment

        pk = random.randint(10**8, 2 * 10**9)
        self.deployments.append(pk)
        return Deployment.objects.create(
            id=pk,
            name=f"perm-{pk}",
            exchange="paper",
            symbols=["ETH/BTC"],
            timeframe="5m",
            params={"min_score": 3},
            full_order_notional=1.0,
            starting_cash=10.0,
            cash=10.0,
        )

    def pending(self) -> Any:
        from canary import services

        return services.rollout_create(
            deployment=self.deployment(), name="canary", actor=SETUP, plan=SHORT_PLAN
        )

    def approved(self) -> Any:
        from canary import services
        from canary.models import PreflightRun

        rollout = self.pending()
        services.approval_record(
            rollout=rollout, role="alpha", actor=self.helper("Alpha"), evidence=GOOD_EVIDENCE
        )
        services.approval_record(rollout=rollout, role="planner", actor=self.helper("Planner"))
        now = timezone.now()
        PreflightRun.objects.create(started_at=now, ended_at=now, decision="GO", checks=[])
        return rollout

    def running(self) -> Any:
        from canary import services

        return services.rollout_start(rollout=self.approved(), actor=SETUP)

    def paused(self) -> Any:
        from canary import services

        return services.rollout_pause(rollout=self.running(), actor=SETUP, reason="setup")

    def completed_rollback(self) -> tuple[Any, Any]:
        from canary.models import Backup, Rollback, RollbackState

        now = timezone.now()
        rollback = Rollback.objects.create(
            deployment=self.deployment(),
            trigger="gate",
            cause="setup",
            requested_by=SETUP,
            state=RollbackState.COMPLETED,
            started_at=now,
            stage1_ended_at=now,
            ended_at=now,
            report={"runs": 1},
        )
        backup = Backup.objects.create(
            created_at=now, engine="sqlite", path="/nonexistent/b.sqlite3", size_bytes=1, sha256="0"
        )
        return rollback, backup

    def alert(self) -> Any:
        from alerts.models import Alert

        return Alert.objects.create(
            detector="volatility",
            symbol="ETH/BTC",
            dedupe_key=f"perm-{uuid.uuid4().hex}",
            detected_at=timezone.now(),
        )


@pytest.fixture
def scene(make_user, redis_cleanup):
    made = Scene(make_user)
    yield made
    redis_cleanup(made.deployments)


@pytest.fixture
def redis_cleanup():
    def forget(deployment_ids: list[int]) -> None:
        import redis
        from django.conf import settings

        from canary import killswitch

        try:
            client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1
            )
            keys = [killswitch.key(pk) for pk in deployment_ids]
            keys += list(client.scan_iter(match=f"{settings.SAFETY_REDIS_PREFIX}:*", count=500))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass

    return forget


@pytest.fixture
def fake_restore(monkeypatch):
    """Stage 3 without overwriting the test database: the file restore is the boundary."""
    from canary import backup

    def restore_file(*, backup: Any = None, path: Any = None, probe: Any = None) -> Any:
        integrity = backup_module.IntegrityReport(ok=True, tables=1, rows=1)
        verify = backup_module.VerifyResult(True, "ok", "b.sqlite3", "sqlite", "0", integrity)
        return backup_module.RestoreResult("b.sqlite3", "sqlite", verify, integrity, 0, {})

    backup_module = backup
    monkeypatch.setattr(backup, "backup_restore_file", restore_file)
