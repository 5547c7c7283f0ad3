"""Rows written with SQL built once per model and database, the values prepared as the ORM
prepares them (each field's ``pre_save`` and ``get_db_prep_save``): for the rows written on
every order, where building and compiling an ORM query costs more CPU than the database's
work. No model signals are sent (the project connects none to these models)."""

from __future__ import annotations

from typing import Any

from django.db import connection

_SQL: dict[tuple, str] = {}


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


def insert_row(obj: Any) -> Any:
    """INSERT a new model instance (``auto_now`` fields set as ``save`` sets them); sets its
    primary key and returns it."""
    meta = obj._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    key = ("insert", type(obj), connection.vendor)
    sql = _SQL.get(key)
    if sql is None:
        sql = _SQL[key] = (
            f"INSERT INTO {_quote(meta.db_table)} ({', '.join(_quote(f.column) for f in fields)}) "
            f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {_quote(meta.pk.column)}"
        )
    params = [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        obj.pk = cursor.fetchone()[0]
    obj._state.adding = False
    obj._state.db = connection.alias
    return obj


def update_rows(model: type, where: dict[str, Any], values: dict[str, Any]) -> int:
    """``model.objects.filter(**where).update(**values)`` for equality (or ``None``: IS NULL)
    conditions on field names; the number of rows updated."""
    meta = model._meta
    set_fields = [meta.get_field(name) for name in values]
    where_fields = [meta.get_field(name) for name in where]
    nulls = tuple(value is None for value in where.values())
    key = ("update", model, tuple(values), tuple(where), nulls, connection.vendor)
    sql = _SQL.get(key)
    if sql is None:
        sets = ", ".join(f"{_quote(f.column)} = %s" for f in set_fields)
        conditions = " AND ".join(
            f"{_quote(f.column)} IS NULL" if null else f"{_quote(f.column)} = %s"
            for f, null in zip(where_fields, nulls, strict=True)
        )
        sql = _SQL[key] = f"UPDATE {_quote(meta.db_table)} SET {sets} WHERE {conditions}"
    params = [
        f.get_db_prep_save(v, connection) for f, v in zip(set_fields, values.values(), strict=True)
    ]
    params += [
        f.get_db_prep_value(v, connection)
        for f, v in zip(where_fields, where.values(), strict=True)
        if v is not None
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount
