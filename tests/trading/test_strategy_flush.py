"""``Account.flush``: the buffered rows in one transaction, with the caller's own writes
(``also``) in that same transaction."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection, transaction

from tests.trading.test_execution import ETH, T0, TF_MS, make_deployment
from trading.models import Candle, MarketStream
from trading.strategy import Account

pytestmark = pytest.mark.django_db

T = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def buffered_candle(open_ms: int = T0) -> Candle:
    return Candle(
        exchange="paper", symbol=ETH, timeframe="5m", open_time_ms=open_ms,
        close_time_ms=open_ms + TF_MS - 1, open=0.05, high=0.05, low=0.05, close=0.05,
        volume=1.0, source="replay", ingested_at=T,
    )  # fmt: skip


def heard() -> None:
    MarketStream.objects.update_or_create(
        exchange="paper", symbol=ETH, timeframe="5m", defaults={"last_received_at": T}
    )


def test_the_callers_writes_join_the_flush_and_fail_with_it():
    account = Account(make_deployment())
    account.candles.append(buffered_candle())

    def failing() -> None:
        heard()
        raise RuntimeError("the caller's write failed")

    with pytest.raises(RuntimeError):
        account.flush(also=failing)
    assert not Candle.objects.exists()  # rolled back with the caller's write
    assert not MarketStream.objects.exists()

    outside = len(connection.savepoint_ids)  # the test's transaction: the flush nests
    inside = []
    account.flush(also=lambda: (inside.append(len(connection.savepoint_ids)), heard()))
    assert inside == [outside + 1]  # within the flush's atomic block
    assert Candle.objects.count() == 1 and MarketStream.objects.count() == 1
    assert account.candles == []


def test_the_callers_writes_are_made_when_nothing_is_buffered():
    account = Account(make_deployment())
    account.flush(also=heard)
    assert MarketStream.objects.get(symbol=ETH).last_received_at == T
    assert not Candle.objects.exists()


def test_without_a_savepoint_the_flush_joins_the_callers_transaction_and_fails_it():
    account = Account(make_deployment())
    account.candles.append(buffered_candle())
    outside = list(connection.savepoint_ids)
    inside = []
    account.flush(
        also=lambda: (inside.append(list(connection.savepoint_ids)), heard()), savepoint=False
    )
    assert inside == [[*outside, None]]  # an atomic block without a savepoint of its own
    assert Candle.objects.count() == 1 and MarketStream.objects.count() == 1

    account.candles.append(buffered_candle(T0 + TF_MS))
    with pytest.raises(RuntimeError), transaction.atomic():
        account.flush(also=lambda: (_ for _ in ()).throw(RuntimeError("failed")), savepoint=False)
    assert Candle.objects.count() == 1  # the caller's transaction rolled back with it
