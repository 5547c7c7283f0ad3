"""Random and malformed frames on /ws/alerts/ (the real ASGI application, in process):
whatever a client sends, the consumer answers with frames of its protocol (an error frame
for anything it cannot take) and the connection survives: a ping right after is answered.
(Hand-picked bad frames and the throttle over a real server:
tests/e2e/test_alerts_delivery.py::test_operator_actions_and_bad_input_over_the_websocket.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .websocket import REPLIES, Socket, token_headers

pytestmark = [pytest.mark.django_db(transaction=True)]

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TYPES = ["ping", "subscribe", "ack", "comment", "silence", "unsilence", "nope", "", "PING"]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = ["id", "text", "symbol", "detector", "duration_s", "reason", "symbols", "detectors",
          "min_severity"]  # fmt: skip
messages = st.builds(
    lambda kind, extra: {"type": kind, **extra},
    st.sampled_from(TYPES) | st.text(max_size=12) | st.integers() | st.none(),
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
)


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


frames = st.one_of(
    st.text(max_size=200).map(lambda t: ("text", t)),
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
    json_values.map(lambda v: ("text", _dumps(v))),
    messages.map(lambda m: ("text", _dumps(m))),
    messages.map(lambda m: ("bytes", _dumps(m).encode())),
)


@pytest.fixture
def socket(settings, api_token) -> Iterator[Socket]:
    settings.ALERTS_WS_RATE = 1e6  # the throttle is not what is fuzzed here
    settings.ALERTS_WS_BURST = 1e6
    sock = Socket(token_headers(api_token("ops", "Ops")))
    assert sock.accepted and sock.first is not None and sock.first["type"] == "snapshot"
    yield sock
    sock.close()


def _check(replies: list[dict[str, Any]]) -> None:
    assert all(isinstance(r, dict) and r.get("type") in REPLIES for r in replies), replies


@FUZZ
@given(frame=frames)
def test_any_frame_gets_a_protocol_answer_and_the_connection_survives(socket, frame):
    kind, payload = frame
    replies = socket.send(text=payload) if kind == "text" else socket.send(data=payload)
    _check(replies)


def test_malformed_json_gets_an_error_frame(socket):
    for raw in ("{not json", "", "[", "\x00", '{"type": "ping"'):
        assert socket.send(text=raw) == [{"type": "error", "error": "malformed JSON"}]
    assert socket.send(data=b"\xff\xfe") == [{"type": "error", "error": "malformed JSON"}]


@pytest.mark.parametrize("kind", [[], ["ping"], {}, {"a": 1}])
def test_an_unhashable_type_gets_an_error_frame(socket, kind):
    replies = socket.send(text=json.dumps({"type": kind}))
    assert replies and replies[0]["type"] == "error"


@pytest.mark.parametrize("kind", [[], ["ping"], {}, 1, 1.5, True, None])
def test_a_type_that_is_not_a_string_is_named_in_the_error(socket, kind):
    assert socket.send(text=json.dumps({"type": kind})) == [
        {"type": "error", "error": '"type" must be a string naming the message type'}
    ]


@pytest.mark.parametrize("raw", ["[]", '["ping"]', '[{"type": "ping"}]', "1", '"ping"', "null"])
def test_a_message_that_is_not_an_object_gets_an_error_frame(socket, raw):
    assert socket.send(text=raw) == [{"type": "error", "error": "a message must be a JSON object"}]


@pytest.mark.parametrize("op", ["ack", "comment", "unsilence"])
def test_an_id_beyond_64_bits_gets_an_error_frame(socket, op):
    replies = socket.send(text=json.dumps({"type": op, "id": 2**64, "text": "x"}))
    assert [r["type"] for r in replies] == ["error"], replies


def test_deeply_nested_json_is_malformed_not_fatal(socket):
    for raw in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        assert socket.send(text=raw) == [{"type": "error", "error": "malformed JSON"}]


@pytest.mark.parametrize("text", ["a\\u0000b", "a\\ud800b", "\\udfff"])
@pytest.mark.parametrize(
    ("op", "field", "template"),
    [
        ("comment", "text", '{"type": "comment", "id": 1, "text": "%s"}'),
        ("silence", "reason", '{"type": "silence", "symbol": "E", "duration_s": 60, "reason": "%s"}'),
        ("silence", "symbol", '{"type": "silence", "symbol": "%s", "duration_s": 60, "reason": "r"}'),
        ("subscribe", "symbols", '{"type": "subscribe", "symbols": ["%s"]}'),
    ],
)  # fmt: skip
def test_text_the_database_cannot_store_gets_an_error_frame_naming_the_field(
    socket, op, field, template, text
):
    from alerts.models import AlertComment, Silence

    replies = socket.send(text=template % text)
    assert replies == [
        {
            "type": "error",
            "error": f"invalid: {field}: NUL characters and lone surrogates are not allowed",
            "op": op,
        }
    ]
    assert not Silence.objects.exists() and not AlertComment.objects.exists()
