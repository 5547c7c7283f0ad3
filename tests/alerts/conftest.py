import copy
import uuid

import pytest


@pytest.fixture(autouse=True)
def _own_alert_channels(settings):
    """A channel-layer prefix of each test's own: the WebSocket presence registry and the
    alert broadcast are Redis keys, which other runs on the same Redis also write."""
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    layers["default"].setdefault("CONFIG", {})["prefix"] = f"test-{uuid.uuid4().hex[:8]}"
    settings.CHANNEL_LAYERS = layers


@pytest.fixture
def ingest(db, django_capture_on_commit_callbacks):
    """Store candles through the real ingestion service and run what it queues on commit
    (eager Celery: processing, then deliveries)."""
    from trading.services import candles_ingest

    def run(items: list[dict]):
        with django_capture_on_commit_callbacks(execute=True):
            return candles_ingest(items=items, actor="test")

    return run


@pytest.fixture
def alert_settings(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.ALERTS_WEBHOOK_URLS = []
    settings.ALERTS_RATE_LIMIT_S = 60.0
    settings.ALERTS_PENDING_LIMIT = 100
    return settings
