"""Rows written with SQL written once (``trading.rows``): ``insert_row`` and ``update_rows``
(the order path's) and ``ModelRows`` (the monitor step's) are one implementation and write
what the ORM writes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection

from tests.trading.test_execution import ETH, LTC, make_deployment
from trading import rows
from trading.models import Order, OrderStatus, Position

pytestmark = pytest.mark.django_db

T = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def values(instance):
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_insert_row_writes_what_save_writes_and_sets_the_key():
    dep = make_deployment()
    made = rows.insert_row(Position(deployment=dep, symbol=ETH, qty=0.5, avg_entry=0.05))
    assert made.pk is not None and not made._state.adding
    assert made._state.db == connection.alias
    assert made.updated_at is not None and made.updated_at.tzinfo is not None  # auto_now
    stored = Position.objects.get(pk=made.pk)
    assert values(stored) == values(made)
    assert (stored.last_price, stored.realised_pnl) == (None, 0.0)
    again = rows.insert_row(Position(deployment=dep, symbol=LTC, qty=1.0))
    assert again.pk > made.pk


def test_update_rows_is_the_querysets_update_with_null_conditions():
    dep = make_deployment()
    order = Order.objects.create(
        deployment=dep, client_order_id="c1", symbol=ETH, side="buy", requested_qty=1.0,
        created_at=T,
    )  # fmt: skip
    where = {"id": order.pk, "status": OrderStatus.PENDING, "submitted_at": None}
    assert rows.update_rows(Order, where, {"status": OrderStatus.FILLED, "submitted_at": T}) == 1
    order.refresh_from_db()
    assert (order.status, order.submitted_at) == (OrderStatus.FILLED, T)
    # submitted_at is no longer NULL, the status no longer PENDING: nothing matches now
    assert rows.update_rows(Order, where, {"status": OrderStatus.ERROR}) == 0
    where = {"deployment": dep.pk, "symbol": ETH}  # a field name of a foreign key
    assert rows.update_rows(Order, where, {"filled_qty": 1.0}) == 1
    assert Order.objects.get(pk=order.pk).filled_qty == 1.0


def test_model_rows_read_insert_and_update_as_the_orm():
    dep = make_deployment()
    position_rows = rows.ModelRows(Position, "p")
    pk = position_rows.insert(
        connection,
        {
            "deployment_id": dep.pk,
            "symbol": ETH,
            "qty": 2.0,
            "avg_entry": 0.1,
            "realised_pnl": 0.0,
            "updated_at": T,
        },  # fmt: skip
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {position_rows.columns(connection)} FROM trading_position p WHERE p.id = %s",
            [pk],
        )
        read = position_rows.instance(connection, cursor.fetchone())
    orm = Position.objects.get(pk=pk)
    assert values(read) == values(orm) and not read._state.adding
    read.qty, read.last_price = 3.0, 0.2
    position_rows.update(connection, read, ["qty", "last_price"])
    orm.refresh_from_db()
    assert (orm.qty, orm.last_price, orm.avg_entry, orm.updated_at) == (3.0, 0.2, 0.1, T)


def test_execute_with_named_placeholders_answers_as_cursor_execute():
    dep = make_deployment()
    for symbol, qty in ((ETH, 0.5), ("ET%", 2.0), (LTC, 0.0)):
        Position.objects.create(deployment=dep, symbol=symbol, qty=qty)
    sql = (
        "SELECT symbol, qty, '100%%' FROM trading_position"
        " WHERE deployment_id = %s AND (symbol LIKE 'ET%%' OR qty > %s) AND symbol <> '%%s'"
        " ORDER BY symbol"
    )
    params = [dep.pk, 1.0]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        expected = cursor.fetchall()
        rows.execute(cursor, sql, params)
        assert cursor.fetchall() == expected == [("ET%", 2.0, "100%"), (ETH, 0.5, "100%")]
        rows.execute(cursor, sql, params)  # the named statement, once written, again
        assert cursor.fetchall() == expected
        with pytest.raises(Exception) as direct:
            cursor.execute(sql, [dep.pk])
        with pytest.raises(Exception) as named:
            rows.execute(cursor, sql, [dep.pk])  # too few parameters: Django's own error
        assert type(named.value) is type(direct.value)


def test_execute_names_more_parameters_than_it_keeps_names_for():
    params = list(range(1200))
    sql = "SELECT " + ", ".join(["%s"] * len(params))
    with connection.cursor() as cursor:
        rows.execute(cursor, sql, params)
        assert list(cursor.fetchone()) == params


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's execution path")
def test_execute_on_sqlite_is_seen_logged_and_translated_as_djangos():
    from django.db import IntegrityError, transaction
    from django.db.transaction import TransactionManagementError
    from django.test.utils import CaptureQueriesContext

    dep = make_deployment()
    Position.objects.create(deployment=dep, symbol=ETH, qty=0.5)
    sql = "SELECT symbol, qty FROM trading_position WHERE deployment_id = %s AND qty > %s"
    seen = []

    def wrapper(execute, sql, params, many, context):
        seen.append((sql, params))
        return execute(sql, params, many, context)

    with connection.cursor() as cursor:
        rows.execute(cursor, sql, [dep.pk, 0.1])  # SQLite's cursor, no wrapper to see it
        assert cursor.fetchall() == [(ETH, 0.5)] and seen == []
        with connection.execute_wrapper(wrapper):
            rows.execute(cursor, sql, [dep.pk, 0.1])
            assert cursor.fetchall() == [(ETH, 0.5)]
        assert len(seen) == 1 and list(seen[0][1].values()) == [dep.pk, 0.1]
    with CaptureQueriesContext(connection) as log, connection.cursor() as cursor:
        rows.execute(cursor, sql, [dep.pk, 1.0])
        assert cursor.fetchall() == []
    assert len(log.captured_queries) == 1 and "trading_position" in log[0]["sql"]
    insert = "INSERT INTO trading_position (deployment_id, symbol, qty, avg_entry, realised_pnl,"
    insert += " updated_at) VALUES (%s, %s, %s, 0, 0, %s)"
    with transaction.atomic():
        with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
            rows.execute(cursor, insert, [dep.pk, ETH, 1.0, "2024-01-01 00:00:00"])
        connection.needs_rollback = True  # as after an error caught without a savepoint
        with pytest.raises(TransactionManagementError), connection.cursor() as cursor:
            rows.execute(cursor, sql, [dep.pk, 0.1])
        connection.needs_rollback = False


def test_model_rows_instances_are_from_dbs_and_receivers_still_see_theirs():
    from django.db.models.signals import post_init

    dep = make_deployment()
    deployment_rows = rows.ModelRows(type(dep), "d")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {deployment_rows.columns(connection)} FROM trading_deployment d"
            " WHERE d.id = %s",
            [dep.pk],
        )
        row = cursor.fetchone()
    read = deployment_rows.instance(connection, row)
    orm = type(dep).objects.get(pk=dep.pk)
    assert type(read) is type(orm) and values(read) == values(orm)
    assert (read._state.adding, read._state.db) == (False, connection.alias)
    assert read.__dict__.keys() == orm.__dict__.keys()  # nothing cached, nothing more
    assert read.symbols == orm.symbols and read.symbols is not orm.symbols
    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance)

    post_init.connect(receiver, sender=type(dep))
    try:
        again = deployment_rows.instance(connection, row)
    finally:
        post_init.disconnect(receiver, sender=type(dep))
    assert seen == [again] and values(again) == values(orm)


def test_new_rows_are_the_models_own_new_instances():
    from trading.models import Candle, EquitySnapshot

    dep = make_deployment()
    new_candle, new_snapshot = rows.NewRows(Candle), rows.NewRows(EquitySnapshot)
    fields = dict(
        exchange="paper", symbol=ETH, timeframe="5m", open_time_ms=0, close_time_ms=299_999,
        open=1.0, high=2.0, low=0.5, close=1.5, volume=3.0, ingested_at=T,
    )  # fmt: skip
    made, orm = new_candle(**fields), Candle(**fields)
    assert type(made) is Candle and values(made) == values(orm)
    assert (made.pk, made.source, made.late, made.processed_at) == (None, "api", False, None)
    assert made._state.adding and made._state.db is None
    assert made.__dict__.keys() == orm.__dict__.keys()
    rows.insert_rows([made])
    assert values(Candle.objects.get(pk=made.pk)) == values(made)
    snap = new_snapshot(deployment_id=dep.pk, ts=T, cash=1.0, positions_value=0.0, equity=1.0,
                        peak=1.0, drawdown_pct=0.0)  # fmt: skip
    assert snap.deployment == dep and snap.deployment_id == dep.pk
    by_object = new_snapshot(deployment=dep, ts=T, cash=1.0, positions_value=0.0, equity=1.0,
                             peak=1.0, drawdown_pct=0.0)  # fmt: skip
    assert by_object.deployment_id == dep.pk  # a related object: the model's own __init__
    with pytest.raises(TypeError):
        new_snapshot(deployment_id=dep.pk, no_such_field=1)


DATETIMES = [
    datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
    datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2024, 2, 29, 0, 0, 0, 500000, tzinfo=UTC),
]


@pytest.mark.parametrize("value", DATETIMES)
def test_datetimes_are_written_and_read_as_the_backend_does(value):
    from datetime import timedelta, timezone

    field = Order._meta.get_field("submitted_at")
    col = field.get_col(Order._meta.db_table)
    backend = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
    ours = rows.read_converters(connection, col)

    def read(funcs, raw):
        for func in funcs:
            raw = func(raw, col, connection)
        return raw

    other_zone = value.astimezone(timezone(timedelta(hours=2)))
    for written in (value, other_zone, None):
        expected = field.get_db_prep_save(written, connection)
        assert rows.prep_save(field, written, connection) == expected
        if written is not None:
            assert rows.adapt_datetime(connection, written) == expected
        got, want = read(ours, expected), read(backend, expected)
        assert got == want and type(got) is type(want)
        assert getattr(got, "tzinfo", None) == getattr(want, "tzinfo", None)
    if connection.vendor == "sqlite":
        assert rows._utc_datetime in ours
        texts = ("2024-01-01 12:00:00+02:00", "2024-01-01T12:00:00", "2024-01-01 12:00")
        naive = value.replace(tzinfo=None)  # the sqlite3 module's reading of a column
        for raw in (*texts, naive, other_zone, None):
            got, want = read(ours, raw), read(backend, raw)
            assert got == want and getattr(got, "tzinfo", 0) == getattr(want, "tzinfo", 0)


def test_rows_read_back_the_datetimes_the_orm_reads():
    dep = make_deployment()
    order = Order.objects.create(
        deployment=dep,
        client_order_id="dt-1",
        symbol=ETH,
        side="buy",
        requested_qty=1.0,
        status=OrderStatus.FILLED,
        created_at=DATETIMES[0],
        submitted_at=DATETIMES[1],
        acked_at=DATETIMES[2],
    )
    read = rows.ModelRows(Order, "o")
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {read.columns(connection)} FROM {Order._meta.db_table} o WHERE o.id = %s",
            [order.pk],
        )
        got = read.instance(connection, cursor.fetchone())
    assert values(got) == values(Order.objects.get(pk=order.pk))
