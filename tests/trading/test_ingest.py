"""POST /api/v1/market/candles: validation, idempotency, conflicts, and what gets stored."""

import json

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from audit.models import AuditEvent
from trading.models import Candle, MarketStream

URL = "/api/v1/market/candles"


def candle(**overrides):
    base = {
        "exchange": "binance",
        "symbol": "ETH/BTC",
        "timeframe": "5m",
        "open_time_ms": 1515560100000,
        "open": 0.0984,
        "high": 0.0994766,
        "low": 0.09828605,
        "close": 0.0994766,
        "volume": 1820.54,
    }
    return base | overrides


@pytest.fixture
def client(api_token):
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Token {api_token()}")
    return c


def post(client, body):
    return client.post(URL, body, format="json")


@pytest.mark.django_db
def test_requires_token():
    response = APIClient().post(URL, [candle()], format="json")
    assert response.status_code == 401
    assert not Candle.objects.exists()


@pytest.mark.django_db
def test_valid_batch_is_stored_with_close_time_and_stream_freshness(client):
    response = post(client, [candle(), candle(open_time_ms=1515560400000)])
    assert response.status_code == 201, response.json()
    assert response.json()["created"] == 2
    first = Candle.objects.order_by("open_time_ms").first()
    assert first.close_time_ms == 1515560100000 + 300_000 - 1
    stream = MarketStream.objects.get()
    assert stream.last_open_time_ms == 1515560400000
    assert stream.candles_received == 2
    event = AuditEvent.objects.get(action="candles.ingest")
    assert event.actor == "ops"
    assert event.payload["created"] == 2


@pytest.mark.django_db
def test_a_token_is_checked_on_every_request(api_token):
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    key = api_token("feed", "Ops")
    c = APIClient()
    c.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert post(c, [candle()]).status_code == 201
    event = AuditEvent.objects.get(action="candles.ingest")
    assert (event.actor, event.actor_user_id) == ("feed", User.objects.get(username="feed").pk)

    User.objects.filter(username="feed").update(is_active=False)
    response = post(c, [candle(open_time_ms=1515560400000)])
    assert response.status_code == 401
    assert response.json()["detail"] == "User inactive or deleted."

    Token.objects.filter(key=key).delete()
    response = post(c, [candle(open_time_ms=1515560400000)])
    assert response.status_code == 401
    assert response.json()["detail"] == "Invalid token."
    assert Candle.objects.count() == 1


@pytest.mark.django_db
def test_wrapped_form_is_accepted(client):
    assert post(client, {"candles": [candle()]}).status_code == 201


@pytest.mark.django_db
def test_repeated_identical_candle_is_a_noop(client):
    assert post(client, [candle()]).status_code == 201
    response = post(client, [candle()])
    assert response.status_code == 200
    assert response.json() == {"created": 0, "duplicates": 1, "late": 0, "ids": []}
    assert Candle.objects.count() == 1


@pytest.mark.django_db
def test_same_key_with_other_values_is_rejected_and_recorded(client):
    post(client, [candle()])
    response = post(client, [candle(open_time_ms=1515560400000), candle(close=0.099)])
    assert response.status_code == 409
    body = response.json()
    assert body["conflicts"][0]["index"] == 1
    assert body["conflicts"][0]["stored"]["close"] == 0.0994766
    assert body["conflicts"][0]["received"]["close"] == 0.099
    assert Candle.objects.count() == 1, "nothing from the conflicting batch is stored"
    assert AuditEvent.objects.filter(action="candles.conflict").count() == 1


@pytest.mark.django_db
def test_late_candle_is_stored_but_marked(client):
    post(client, [candle(open_time_ms=1515560400000)])
    response = post(client, [candle()])
    assert response.json()["late"] == 1
    assert Candle.objects.get(open_time_ms=1515560100000).late is True


BAD_ITEMS = [
    (candle(open="abc"), "open", "finite number"),
    (candle(high=True), "high", "finite number"),
    (candle(high=0.09, low=0.095, open=0.092, close=0.092), "high", "below low"),
    (candle(open=0.2), "open", "outside [low, high]"),
    (candle(close=0.01), "close", "outside [low, high]"),
    (candle(volume=-1), "volume", "must not be negative"),
    (candle(low=0, open=0.05, close=0.05), "low", "positive"),
    (candle(low=-1.0), "low", "positive"),
    (candle(timeframe="7m"), "timeframe", "unknown timeframe"),
    (candle(open_time_ms="soon"), "open_time_ms", "integer"),
    (candle(open_time_ms=-5), "open_time_ms", "integer"),
    (candle(symbol=""), "symbol", "non-empty"),
    ({k: v for k, v in candle().items() if k != "volume"}, "volume", "required"),
    (candle(extra=1), "extra", "unknown field"),
    ("not an object", "", "JSON object"),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("item", "field", "message"), BAD_ITEMS)
def test_bad_item_rejects_whole_batch_naming_the_problem(client, item, field, message):
    good = candle(open_time_ms=1515560400000)
    response = post(client, [good, item])
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert any(
        e["index"] == 1 and e["field"] == field and message in e["message"] for e in errors
    ), errors
    assert not Candle.objects.exists(), "nothing from an invalid batch is stored"
    assert not AuditEvent.objects.filter(action="candles.ingest").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("literal", "field"), [("NaN", "close"), ("Infinity", "volume"), ("-Infinity", "low")]
)
def test_non_finite_literals_are_named(client, literal, field):
    good = json.dumps(candle(open_time_ms=1515560400000))
    bad = json.dumps(candle()).replace(f'"{field}": {candle()[field]}', f'"{field}": {literal}')
    assert literal in bad
    response = client.generic("POST", URL, f"[{good}, {bad}]", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"index": 1, "field": field, "message": "must be a finite number"}
    ]
    assert not Candle.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["volume", "high"])
def test_an_integer_beyond_a_floats_range_is_named(client, field):
    """JSON reads 1 followed by 400 zeros as an int that float() cannot convert."""
    good = json.dumps(candle(open_time_ms=1515560400000))
    bad = json.dumps(candle()).replace(f'"{field}": {candle()[field]}', f'"{field}": 1{"0" * 400}')
    response = client.generic("POST", URL, f"[{good}, {bad}]", content_type="application/json")
    assert response.status_code == 400
    assert [(e["index"], e["field"]) for e in response.json()["errors"]] == [(1, field)]
    assert not Candle.objects.exists()


@pytest.mark.django_db
def test_every_offending_item_gets_an_error(client):
    response = post(
        client, [candle(open="x"), candle(open_time_ms=1515560400000), candle(volume=-1)]
    )
    assert {(e["index"], e["field"]) for e in response.json()["errors"]} == {
        (0, "open"),
        (2, "volume"),
    }


@pytest.mark.django_db
def test_duplicate_key_within_batch_is_an_error(client):
    response = post(client, [candle(), candle()])
    assert response.status_code == 400
    assert response.json()["errors"][0]["index"] == 1


@pytest.mark.django_db
def test_more_than_1000_candles_is_refused(client):
    items = [candle(open_time_ms=1515560100000 + i * 300_000) for i in range(1001)]
    response = post(client, items)
    assert response.status_code == 400
    assert "at most 1000" in response.json()["errors"][0]["message"]
    assert not Candle.objects.exists()


@pytest.mark.django_db
def test_exactly_1000_candles_are_accepted(client):
    items = [candle(open_time_ms=1515560100000 + i * 300_000) for i in range(1000)]
    assert post(client, items).status_code == 201
    assert Candle.objects.count() == 1000


@pytest.mark.django_db
def test_the_ids_answered_are_those_of_the_candles_in_the_order_posted(client):
    """A batch larger than one INSERT statement's rows, over two streams, in no order."""
    times = [1515560100000 + i * 300_000 for i in range(700)]
    items = [
        candle(open_time_ms=t, symbol="LTC/BTC" if i % 3 else "ETH/BTC", volume=float(i))
        for i, t in enumerate(reversed(times))
    ]
    response = post(client, items)
    assert response.status_code == 201
    ids = response.json()["ids"]
    assert len(ids) == 700
    stored = Candle.objects.in_bulk(ids)
    for pk, item in zip(ids, items, strict=True):
        row = stored[pk]
        assert (row.symbol, row.open_time_ms, row.volume) == (
            item["symbol"],
            item["open_time_ms"],
            item["volume"],
        )
        assert row.close_time_ms == item["open_time_ms"] + 300_000 - 1
        assert (row.source, row.processed_at is None or row.processed_at >= row.ingested_at) == (
            "api",
            True,
        )
    assert response.json()["late"] == 0, "a batch is taken in open-time order"


@pytest.mark.django_db
@pytest.mark.parametrize("body", [b"{not json", b"[1,2", b""])
def test_malformed_json_is_400(client, body):
    response = client.generic("POST", URL, body, content_type="application/json")
    assert response.status_code == 400
    assert not Candle.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("body", [{}, [], {"candles": "x"}, 5])
def test_wrong_shapes_are_400(client, body):
    response = post(client, body)
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "candles"


@pytest.mark.django_db(transaction=True)
def test_processing_is_queued_on_commit(client):
    """Processing runs in the (eager) task once the transaction has committed."""
    response = post(client, [candle()])
    assert response.status_code == 201
    assert Candle.objects.get().processed_at is not None


@pytest.mark.django_db
def test_stream_freshness_accumulates_per_stream_and_never_goes_back(client):
    later, earlier = 1515560700000, 1515560400000
    assert post(client, [candle(open_time_ms=later), candle(symbol="LTC/BTC")]).status_code == 201
    response = post(
        client,
        [candle(open_time_ms=earlier), candle(), candle(symbol="LTC/BTC", open_time_ms=later)],
    )
    assert response.status_code == 201
    assert response.json()["late"] == 2
    eth = MarketStream.objects.get(symbol="ETH/BTC")
    ltc = MarketStream.objects.get(symbol="LTC/BTC")
    assert (eth.last_open_time_ms, eth.candles_received) == (later, 3)
    assert (ltc.last_open_time_ms, ltc.candles_received) == (later, 2)
    assert eth.last_received_at is not None
    late = Candle.objects.filter(late=True).values_list("symbol", "open_time_ms")
    assert sorted(late) == [("ETH/BTC", 1515560100000), ("ETH/BTC", earlier)]


@pytest.mark.django_db
def test_a_conflict_names_every_stored_value(client):
    post(client, [candle(), candle(symbol="LTC/BTC")])
    response = post(client, [candle(symbol="LTC/BTC"), candle(volume=1.0)])
    assert response.status_code == 409
    [conflict] = response.json()["conflicts"]
    assert conflict["index"] == 1
    assert conflict["key"] == {
        "exchange": "binance",
        "symbol": "ETH/BTC",
        "timeframe": "5m",
        "open_time_ms": 1515560100000,
    }
    assert conflict["stored"] == {
        "open": 0.0984,
        "high": 0.0994766,
        "low": 0.09828605,
        "close": 0.0994766,
        "volume": 1820.54,
    }
    assert conflict["received"]["volume"] == 1.0


WATCHERS = pytest.mark.parametrize(
    ("deployment", "queued"),
    [
        (None, False),
        ({"timeframe": "1h"}, False),
        ({"timeframe": "5m", "signals_enabled": False}, False),
        ({"timeframe": "5m"}, True),
    ],
)


def _strategy_steps_sent(monkeypatch, deployment):
    """The candle ids the strategy step is queued with (the list filled as it is), with
    ``deployment`` (its fields) created first when given."""
    from trading.models import Deployment
    from trading.tasks import process_candles_strategy

    if deployment is not None:
        Deployment.objects.create(
            name="d", exchange="paper", symbols=["LTC/BTC"], full_order_notional=0.1, **deployment
        )
    sent = []
    monkeypatch.setattr(process_candles_strategy, "delay", lambda ids: sent.append(ids))
    return sent


@pytest.mark.django_db(transaction=True)
@WATCHERS
def test_the_strategy_step_is_queued_when_a_deployment_trades_the_timeframe(
    client, monkeypatch, deployment, queued
):
    sent = _strategy_steps_sent(monkeypatch, deployment)
    response = post(client, [candle()])
    assert response.status_code == 201
    assert sent == ([response.json()["ids"]] if queued else [])
    assert Candle.objects.get().processed_at is not None, "the alerts step runs regardless"


@pytest.mark.django_db
def test_answers_json_whatever_the_accept_header_and_parses_by_content_type(client):
    response = client.post(URL, json.dumps([candle()]), content_type="application/json",
                           HTTP_ACCEPT="text/html")  # fmt: skip
    assert response.status_code == 201
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content)["created"] == 1
    refused = client.post(URL, "open=1", content_type="text/plain", HTTP_ACCEPT="text/html")
    assert refused.status_code == 415
    assert refused["Content-Type"] == "application/json"
    assert Candle.objects.count() == 1


@pytest.mark.django_db
def test_a_candle_stored_without_its_stream_advanced_is_classified_as_any_other(client):
    """A feed's next candle skips the read of the stored ones (on PostgreSQL) only while
    its stream's row says none can be stored yet; a candle stored behind that row's back
    (by the admin) is still found: a duplicate when identical, a conflict otherwise."""
    later = 1515560400000
    assert post(client, [candle()]).status_code == 201
    Candle.objects.create(
        **candle(open_time_ms=later), close_time_ms=later + 299_999, ingested_at=timezone.now()
    )
    response = post(client, [candle(open_time_ms=later)])
    assert response.status_code == 200, response.json()
    assert (response.json()["created"], response.json()["duplicates"]) == (0, 1)
    response = post(client, [candle(open_time_ms=later, volume=1.0)])
    assert response.status_code == 409
    assert response.json()["conflicts"][0]["stored"]["volume"] == 1820.54
    assert Candle.objects.count() == 2
    stream = MarketStream.objects.get()
    assert (stream.last_open_time_ms, stream.candles_received) == (1515560100000, 1)
    response = post(client, [candle(open_time_ms=later + 300_000)])
    assert response.json()["created"] == 1
    stream.refresh_from_db()
    assert (stream.last_open_time_ms, stream.candles_received) == (later + 300_000, 2)


@pytest.mark.django_db(transaction=True)
@WATCHERS
def test_a_streams_next_candles_are_queued_for_the_strategy_as_the_first(
    client, monkeypatch, deployment, queued
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from alerts import services as alert_services

    sent = _strategy_steps_sent(monkeypatch, deployment)
    monkeypatch.setattr(alert_services, "candles_queue", lambda ids: None)
    assert post(client, [candle()]).status_code == 201
    with CaptureQueriesContext(connection) as queries:
        response = post(
            client, [candle(open_time_ms=1515560400000), candle(open_time_ms=1515560700000)]
        )
    assert response.status_code == 201
    assert sent[1:] == ([response.json()["ids"]] if queued else [])
    if connection.vendor == "postgresql":  # the stored candles and the watchers not read
        reads = [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith("SELECT")]
        assert not [
            sql for sql in reads if 'FROM "trading_candle"' in sql or "trading_deployment" in sql
        ], reads


@pytest.mark.django_db
def test_the_audit_record_of_a_streams_next_candles_names_their_ids_and_the_chain_holds(client):
    from audit.services import audit_verify

    assert post(client, [candle()]).status_code == 201
    times = [1515560400000, 1515560700000, 1515561000000]
    volumes = [0.1 + 0.2, 1e-7 / 3, 12.0]
    response = post(
        client, [candle(open_time_ms=t, volume=v) for t, v in zip(times, volumes, strict=True)]
    )
    assert response.status_code == 201
    ids = response.json()["ids"]
    stored = Candle.objects.filter(pk__in=ids).order_by("pk")
    expected = list(zip(times, volumes, strict=True))
    assert list(stored.values_list("open_time_ms", "volume")) == expected  # exactly
    event = AuditEvent.objects.filter(action="candles.ingest").latest("seq")
    assert (event.payload["first_id"], event.payload["last_id"]) == (ids[0], ids[-1])
    assert (event.payload["created"], event.payload["received"], event.payload["late"]) == (3, 3, 0)
    assert event.actor == "ops"
    assert audit_verify() is None
    stream = MarketStream.objects.get()
    assert (stream.last_open_time_ms, stream.candles_received) == (times[-1], 4)
    assert not Candle.objects.filter(late=True).exists()
