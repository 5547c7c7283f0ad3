"""GET /health: 200 only when every component is fine; 503 with the failing one named."""

import time

import pytest

from canary import health
from canary.heartbeat import KEY_BEAT, KEY_WORKER


@pytest.fixture
def fresh_heartbeats(redis_url):
    from canary.heartbeat import mark

    mark(KEY_WORKER)
    mark(KEY_BEAT)


@pytest.mark.django_db
def test_healthy_when_all_components_answer(client, fresh_heartbeats):
    response = client.get("/health")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["components"]) == {"database", "redis", "channel_layer", "worker", "beat"}
    assert all(c["ok"] for c in body["components"].values())


@pytest.mark.django_db
def test_stale_beat_heartbeat_gives_503(client, redis_url):
    from canary.heartbeat import mark

    mark(KEY_WORKER)
    mark(KEY_BEAT, now=time.time() - 3600)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["components"]["beat"]["ok"] is False
    assert response.json()["components"]["worker"]["ok"] is True


@pytest.mark.django_db
def test_failing_component_gives_503_without_traceback(client, monkeypatch, fresh_heartbeats):
    def broken():
        raise RuntimeError("connection refused")

    monkeypatch.setitem(health.CHECKS, "database", broken)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["components"]["database"] == {
        "ok": False,
        "error": "RuntimeError: connection refused",
        "ms": response.json()["components"]["database"]["ms"],
    }
    assert "Traceback" not in response.content.decode()


@pytest.mark.django_db
def test_unreachable_redis_gives_503(client, settings):
    import redis

    from canary import heartbeat

    heartbeat.redis_client.cache_clear()
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    try:
        response = client.get("/health")
    finally:
        heartbeat.redis_client.cache_clear()
    assert response.status_code == 503
    components = response.json()["components"]
    assert components["redis"]["ok"] is False
    assert "ConnectionError" in components["redis"][
        "error"
    ] or redis.ConnectionError.__name__ in str(components)
