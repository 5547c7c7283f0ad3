"""Properties of POST /api/v1/market/candles (trading.services.candles_ingest):

- a batch with one invalid candle in it gets a 400 naming that item, and nothing of the
  batch is stored;
- a valid batch is stored exactly once however often (and in whatever order) it is sent;
- no body whatsoever makes it answer 5xx.

(Hand-picked cases: tests/trading/test_ingest.py. Live and backtest detectors agree on
any series: tests/alerts/test_detectors.py::test_live_and_backtest_agree_on_random_series;
the gate engine is monotonic: tests/canary/test_engine.py.)
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

URL = "/api/v1/market/candles"
TIMEFRAMES = ["1m", "5m", "15m", "1h", "4h", "1d"]
FRAME_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "1h": 3_600_000}
FIELDS = ("exchange", "symbol", "timeframe", "open_time_ms", "open", "high", "low", "close",
          "volume")  # fmt: skip
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Keys the database can hold: open_time_ms below 2**62 (BigInteger; close_time_ms adds a
# frame); text without NUL or lone surrogates. Outside these bounds: the last tests below.
names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(
    lambda s: s.strip() == s and s
)
prices = st.floats(min_value=1e-8, max_value=1e9, allow_nan=False, allow_infinity=False)


@st.composite
def valid_candle(draw: Any, exchange: str = "fuzz") -> dict[str, Any]:
    o, c = draw(prices), draw(prices)
    low = min(o, c) * draw(st.floats(0.5, 1.0))
    high = max(o, c) * draw(st.floats(1.0, 2.0))
    return {
        "exchange": exchange,
        "symbol": draw(names),
        "timeframe": draw(st.sampled_from(TIMEFRAMES)),
        "open_time_ms": draw(st.integers(0, 2**61)),
        "open": o,
        "high": high,
        "low": low,
        "close": c,
        "volume": draw(st.floats(0, 1e12, allow_nan=False)),
    }


def unique_batch(size: int = 12) -> st.SearchStrategy[list[dict[str, Any]]]:
    key = ("exchange", "symbol", "timeframe", "open_time_ms")
    return st.lists(
        valid_candle(), min_size=1, max_size=size, unique_by=lambda c: tuple(c[k] for k in key)
    )


BREAKERS: dict[str, Any] = {
    "missing field": lambda c, f: {k: v for k, v in c.items() if k != f},
    "unknown field": lambda c, f: {**c, f + "_x": 1},
    "null": lambda c, f: {**c, f: None},
    "list": lambda c, f: {**c, f: [c[f]]},
    "object": lambda c, f: {**c, f: {"v": c[f]}},
    "bool": lambda c, f: {**c, f: True},
}
NUMERIC_BREAKERS: dict[str, Any] = {
    "NaN": lambda c, f: {**c, f: math.nan},
    "Infinity": lambda c, f: {**c, f: math.inf},
    "not a number": lambda c, f: {**c, f: "one"},
    "negative": lambda c, f: {**c, f: -abs(c[f]) - 1.0},
}


@st.composite
def broken_candle(draw: Any, base: dict[str, Any]) -> dict[str, Any]:
    """`base` made invalid in one way the contract names."""
    field = draw(st.sampled_from(FIELDS))
    choices = dict(BREAKERS)
    if field in ("open", "high", "low", "close", "volume", "open_time_ms"):
        choices.update(NUMERIC_BREAKERS)
    if field in ("exchange", "symbol"):
        choices["empty"] = lambda c, f: {**c, f: "  "}
        choices["too long"] = lambda c, f: {**c, f: "x" * 41}
    if field == "timeframe":
        choices["unknown"] = lambda c, f: {**c, f: "7m"}
    if field == "open_time_ms":
        choices["float"] = lambda c, f: {**c, f: c[f] + 0.5}
    if field == "high":
        choices["below low"] = lambda c, f: {**c, "high": c["low"] * 0.5}
    if field in ("open", "close"):
        choices["outside range"] = lambda c, f: {**c, f: c["high"] * 1.5}
    name = draw(st.sampled_from(sorted(choices)))
    return choices[name](base, field)


def _client(token: str) -> Any:
    from rest_framework.test import APIClient

    c = APIClient(raise_request_exception=False)  # a crash is a 500, as a real client sees it
    c.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return c


@pytest.fixture
def api(api_token):
    return _client(api_token())


def _post(api, body: Any, raw: bool = False) -> tuple[int, Any]:
    if raw:
        response = api.generic("POST", URL, body, content_type="application/json")
    else:
        response = api.post(URL, json.dumps(body, allow_nan=True), content_type="application/json")
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.content


@pytest.mark.django_db
@FUZZ
@given(data=st.data())
def test_any_invalid_candle_is_400_and_nothing_of_the_batch_is_stored(api, data):
    from trading.models import Candle

    batch = data.draw(unique_batch(6))
    index = data.draw(st.integers(0, len(batch) - 1))
    batch[index] = data.draw(broken_candle(batch[index]))
    before = Candle.objects.count()
    status, body = _post(api, batch)
    assert status == 400, (status, body, batch[index])
    assert any(e["index"] == index for e in body["errors"]), body
    assert Candle.objects.count() == before


@pytest.mark.django_db
@FUZZ
@given(batch=unique_batch(), repeats=st.integers(1, 4), data=st.data())
def test_any_valid_batch_is_stored_exactly_once(api, batch, repeats, data):
    from trading.models import Candle

    Candle.objects.filter(exchange="fuzz").delete()
    answers = []
    for _ in range(repeats):
        answers.append(_post(api, data.draw(st.permutations(batch))))
    assert answers[0][0] == 201 and answers[0][1]["created"] == len(batch), answers[0]
    for status, body in answers[1:]:
        assert status == 200 and body["created"] == 0 and body["duplicates"] == len(batch)
    stored = Candle.objects.filter(exchange="fuzz")
    assert stored.count() == len(batch)
    for item in batch:
        row = stored.get(symbol=item["symbol"], timeframe=item["timeframe"],
                         open_time_ms=item["open_time_ms"])  # fmt: skip
        assert (row.open, row.high, row.low, row.close, row.volume) == tuple(
            item[k] for k in ("open", "high", "low", "close", "volume")
        )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.mark.django_db
@FUZZ
@given(body=st.one_of(json_values, st.lists(st.dictionaries(st.sampled_from(FIELDS), json_values))))
def test_no_json_body_gets_a_server_error(api, body):
    from trading.models import Candle

    before = Candle.objects.count()
    status, answer = _post(api, body)
    assert status < 500, answer
    if status >= 400:
        assert Candle.objects.count() == before


@pytest.mark.django_db
@FUZZ
@given(raw=st.binary(max_size=200))
def test_no_raw_body_gets_a_server_error(api, raw):
    status, answer = _post(api, raw, raw=True)
    assert status < 500, answer


def _one(**overrides: Any) -> dict[str, Any]:
    item = {"exchange": "fuzz", "symbol": "ETH/BTC", "timeframe": "5m",
            "open_time_ms": 1_700_000_100_000, "open": 1.0, "high": 2.0, "low": 0.5,
            "close": 1.5, "volume": 1.0}  # fmt: skip
    return item | overrides


@pytest.mark.django_db(transaction=True)
def test_the_same_batch_sent_concurrently_is_stored_once(api_token):
    import threading

    from trading.models import Candle

    token = api_token()
    batch = [_one(open_time_ms=1_700_000_100_000 + i * 300_000) for i in range(20)]
    answers: list[tuple[int, Any]] = []
    gate = threading.Barrier(4)

    def send() -> None:
        from django.db import connection

        try:
            client = _client(token)
            gate.wait(5)
            answers.append(_post(client, batch))
        finally:
            connection.close()  # this thread's own connection: not left open past the test

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(status for status, _ in answers) == [200, 200, 200, 201], answers
    assert sum(body["created"] for _, body in answers) == len(batch)
    assert Candle.objects.filter(exchange="fuzz").count() == len(batch)


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["exchange", "symbol"])
@pytest.mark.parametrize("text", ["ETH\ud800", "\udfffETH"])
def test_a_lone_surrogate_in_a_name_is_a_400(api, field, text):
    from trading.models import Candle

    status, body = _post(api, [_one(**{field: text})])
    assert status == 400, (status, body)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(0, field)], body
    assert not Candle.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["exchange", "symbol"])
def test_a_nul_in_a_name_is_a_400_naming_it_on_every_database(api, field):
    from trading.models import Candle

    status, body = _post(api, [_one(**{field: "ET\x00H"})])
    assert status == 400, (status, body)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(0, field)], body
    assert not Candle.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("open_time", [2**63, 2**63 - 1, 2**63 - 299_999, 2**64, 2**100])
def test_an_open_time_beyond_64_bits_is_a_400(api, open_time):
    """5m candles: close_time_ms (open + 299999) must fit a 64-bit column as well."""
    from trading.models import Candle

    status, body = _post(api, [_one(open_time_ms=open_time)])
    assert status == 400, (status, body)
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(0, "open_time_ms")], body
    assert not Candle.objects.exists()


@pytest.mark.django_db
def test_the_last_candle_a_64_bit_column_holds_is_stored(api):
    from trading.models import Candle

    last = 2**63 - 300_000  # 5m: closes at 2**63 - 1
    status, body = _post(api, [_one(open_time_ms=last)])
    assert status == 201, (status, body)
    assert Candle.objects.get().close_time_ms == 2**63 - 1
