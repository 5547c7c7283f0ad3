"""Rows the alerts app writes on every candle and delivery without the ORM's bulk_create
(trading.rows.insert_rows): the same rows, their ids set in order."""

from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.django_db


def _alert(n: int, **fields):
    from alerts.models import Alert

    return Alert(
        detector="volatility",
        symbol=f"S{n}/USDT",
        dedupe_key=f"rows:{n}",
        event_ms=n,
        value=None if n % 2 else n / 3,
        detected_at=datetime(2030, 1, 1, 0, 0, n % 60, tzinfo=UTC),
        **fields,
    )


def test_inserted_rows_read_back_as_made_with_their_ids_in_order():
    from alerts.models import Alert
    from trading.rows import insert_rows as _insert_rows

    made = _insert_rows([_alert(1, payload={"k": [1, "x"]}), _alert(2, suppressed=True), _alert(3)])
    assert [a.pk for a in made] == sorted(a.pk for a in made)
    for alert in made:
        stored = Alert.objects.get(pk=alert.pk)
        assert stored.dedupe_key == alert.dedupe_key
        assert stored.as_message() == alert.as_message()
        assert (stored.payload, stored.suppressed, stored.decision) == (
            alert.payload,
            alert.suppressed,
            "deliver",
        )
        assert not alert._state.adding
    assert Alert.objects.get(dedupe_key="rows:1").payload == {"k": [1, "x"]}


def test_more_rows_than_one_statement_takes():
    from alerts.models import Alert
    from trading.rows import insert_rows as _insert_rows

    made = _insert_rows([_alert(n) for n in range(1, 1203)])
    stored = dict(Alert.objects.values_list("pk", "event_ms"))
    assert [stored[a.pk] for a in made] == list(range(1, 1203))
    assert _insert_rows([]) == []
