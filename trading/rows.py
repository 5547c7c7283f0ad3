"""Rows read and written with SQL written once per model and database, the values turned as
the ORM turns them (the backend's and the fields' converters on the way in, each field's
``pre_save`` where ``save`` calls it and ``get_db_prep_save`` on the way out): for the rows
written on every order and every monitor step, where building and compiling an ORM query
costs more CPU than the database's work. No model signals are sent (the project connects
none to these models)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from itertools import count
from typing import Any

from django.apps import apps
from django.db import transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import DateField, DateTimeField, Field, Model
from django.db.models.base import ModelState
from django.db.models.constants import OnConflict
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init

_SQL: dict[tuple[Any, ...], str] = {}
_FORMAT = re.compile(r"(?<!%)%s")  # Django's SQLite backend's, for "%s" placeholders
# statement -> (its qmark form, its named form, its number of placeholders)
_QMARK: dict[str, tuple[str, str, int]] = {}
_SQLITE_EXECUTE = sqlite3.Cursor.execute
_NAMES = tuple(f"p{i}" for i in range(1000))  # never changed: threads share it


def execute(cursor: Any, sql: str, params: Sequence[Any]) -> Any:
    """``cursor.execute(sql, params)``. On SQLite, through a Django cursor with no execute
    wrapper installed and no query log (``CursorWrapper`` itself), the statement runs on
    the sqlite3 cursor with its ``%s`` placeholders turned into ``?`` once per statement,
    after the checks Django's ``_execute`` makes and under its error translation: Django's
    path (the wrappers' chain, then its SQLite cursor's rewrite of the statement with a
    regular expression or a ``%`` formatting on every execution) costs more CPU than
    SQLite's own work for the short statements run on every candle and monitor step.
    Otherwise on SQLite (a query log, wrappers) the placeholders are named (``%(p0)s``,
    ...; one ``%`` formatting instead of the regular expression) and Django's path is
    taken. The same statement, parameters and result."""
    db = cursor.db
    if db.vendor != "sqlite":
        return cursor.execute(sql, params)
    qmark = _QMARK.get(sql)
    if qmark is None:
        counter = count()
        named = _FORMAT.sub(lambda _: f"%(p{next(counter)})s", sql)
        qmark = _QMARK[sql] = (_FORMAT.sub("?", sql).replace("%%", "%"), named, next(counter))
    n = len(params)
    if n != qmark[2]:  # as many parameters as placeholders, or the error Django raises
        return cursor.execute(sql, params)
    if type(cursor) is CursorWrapper and not db.execute_wrappers and apps.ready:
        db.validate_no_broken_transaction()
        with db.wrap_database_errors:
            return _SQLITE_EXECUTE(cursor.cursor, qmark[0], params)
    names = _NAMES if n <= len(_NAMES) else [f"p{i}" for i in range(n)]
    return cursor.execute(qmark[1], dict(zip(names, params, strict=False)))


def prepared_cursor(connection: Any) -> Any:
    """On PostgreSQL a server-binding cursor, so that the connection prepares a statement
    once it has run it ``prepare_threshold`` times (settings) and then skips parsing and
    planning it (for statements run on every order), wrapped as Django wraps its own
    (error translation, query log, execute wrappers). Elsewhere Django's cursor."""
    if connection.vendor != "postgresql":
        return connection.cursor()
    import psycopg

    connection.ensure_connection()
    return connection._prepare_cursor(psycopg.Cursor(connection.connection))


def client_binding_cursor(connection: Any) -> Any:
    """A cursor that binds parameters on the client, wrapped as Django wraps its own: on
    PostgreSQL with server-side binding (settings) for a query of several statements,
    which a server-binding cursor refuses. Elsewhere Django's cursor."""
    if connection.vendor != "postgresql" or not connection.settings_dict["OPTIONS"].get(
        "server_side_binding"
    ):
        return connection.cursor()
    from django.db.backends.postgresql.base import Cursor

    connection.ensure_connection()
    return connection._prepare_cursor(Cursor(connection.connection))


def fetchall_prepared(sql: str, params: Sequence[Any]) -> list[tuple]:
    """The rows of ``sql`` on the default database, prepared on its connection on
    PostgreSQL (``prepared_cursor``): for statements run on every order."""
    with prepared_cursor(transaction.get_connection()) as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def sql_once(connection: Any, key: tuple[Any, ...], build: Callable[[], str]) -> str:
    """The SQL ``build()`` writes for ``key``, written once per database and backend."""
    full = (connection.alias, connection.vendor, *key)
    sql = _SQL.get(full)
    if sql is None:
        sql = _SQL[full] = build()
    return sql


def fetch_one(
    connection: Any, key: tuple[Any, ...], build: Callable[[], str], params: Sequence[Any]
) -> tuple | None:
    """The first row of the statement ``build()`` writes once for ``key`` (``sql_once``),
    run with ``params``; None without one."""
    with connection.cursor() as cursor:
        execute(cursor, sql_once(connection, key, build), params)
        return cursor.fetchone()


def _utc_text(connection: Any, value: Any) -> str | None:
    """The text Django's SQLite backend writes for ``value`` when it is an aware UTC
    datetime and the connection's time zone is UTC (``make_naive`` to UTC is then only
    dropping the tzinfo); None otherwise (not that case: ask the backend)."""
    if (
        type(value) is datetime
        and value.tzinfo is UTC
        and connection.vendor == "sqlite"
        and connection.timezone is UTC
    ):
        return str(value.replace(tzinfo=None))
    return None


def adapt_datetime(connection: Any, value: Any) -> Any:
    """``connection.ops.adapt_datetimefield_value(value)``, the common case (``_utc_text``)
    without its checks: the same value."""
    text = _utc_text(connection, value)
    return connection.ops.adapt_datetimefield_value(value) if text is None else text


def prep_save(field: Field, value: Any, connection: Any) -> Any:
    """``field.get_db_prep_save(value, connection)``; for a plain DateTimeField (whose
    preparation of an aware datetime is the backend's adaptation) the common case
    (``_utc_text``) without its checks: the same value."""
    if type(field) is DateTimeField:
        text = _utc_text(connection, value)
        if text is not None:
            return text
    return field.get_db_prep_save(value, connection)


def _utc_datetime(value: Any, expression: Any, connection: Any) -> Any:
    """Django's SQLite ``convert_datetimefield_value``; its common cases on a connection
    whose time zone is UTC without its checks (the same value): a naive datetime (what
    the sqlite3 module's converter for a ``datetime`` column makes of its text) gets the
    UTC tzinfo; a text (an expression's value) is read with ``fromisoformat`` first."""
    if value is None:
        return None
    if connection.timezone is UTC:
        if type(value) is str:
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                return connection.ops.convert_datetimefield_value(value, expression, connection)
        if type(value) is datetime and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
    return connection.ops.convert_datetimefield_value(value, expression, connection)


def read_converters(connection: Any, col: Any) -> list[Any]:
    """The converters of a column's values read from the database (the backend's, then
    the field's), Django's SQLite datetime converter replaced by ``_utc_datetime``."""
    funcs = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
    if connection.vendor == "sqlite":
        convert = connection.ops.convert_datetimefield_value
        funcs = [_utc_datetime if func == convert else func for func in funcs]
    return funcs


def from_db(connection: Any, field: Field) -> Callable[[Any], Any]:
    """A function turning a value read from ``field``'s column as the ORM turns it (an
    aware datetime from SQLite's text, say)."""
    col = field.get_col(field.model._meta.db_table)
    funcs = read_converters(connection, col)

    def convert(value: Any) -> Any:
        for func in funcs:
            value = func(value, col, connection)
        return value

    return convert


_PLAIN_ATTRIBUTES = (DeferredAttribute, ForeignKeyDeferredAttribute)


def fills(model: type[Any]) -> bool:
    """Whether ``model.from_db`` of all its concrete fields' values is ``filled``: the
    model's ``from_db`` and ``__init__`` are Django's, and each field's attribute is the
    ORM's deferred attribute (setting it stores the value; a foreign key's also drops a
    cached related object, which a new instance has not)."""
    return (
        getattr(model.from_db, "__func__", None) is Model.from_db.__func__
        and model.__init__ is Model.__init__
        and not model._meta.abstract
        and all(
            type(model.__dict__.get(f.attname)) in _PLAIN_ATTRIBUTES
            for f in model._meta.concrete_fields
        )
    )


def filled(model: type[Any], db: str, attnames: Sequence[str], values: Sequence[Any]) -> Any:
    """``model.from_db(db, attnames, values)`` (all the concrete fields, in order) for a
    model that ``fills``, while no ``pre_init``/``post_init`` receiver is connected: the
    instance's state and attributes set as ``Model.__init__`` sets them, without its
    per-field ``setattr`` and signals (a fifth of the cost of a row read)."""
    obj = model.__new__(model)
    state = ModelState()
    state.adding = False
    state.db = db
    fields = obj.__dict__
    fields["_state"] = state
    fields.update(zip(attnames, values, strict=True))
    return obj


class NewRows:
    """``model(**values)`` of a new (unsaved) instance from attribute names (a foreign key's
    ``..._id``), the other fields at their defaults, for a model that ``fills`` while no
    ``pre_init``/``post_init`` receiver is connected: the state and attributes set as
    ``Model.__init__`` sets them, without its per-field lookups; otherwise ``model(...)``
    itself. For the rows the strategy makes on every candle."""

    def __init__(self, model: type[Any]) -> None:
        self.model = model
        self.fields = [(f.attname, f) for f in model._meta.concrete_fields]
        self.names = frozenset(name for name, _ in self.fields)
        self._fills: bool | None = None

    def __call__(self, **values: Any) -> Any:
        model = self.model
        if self._fills is None:
            self._fills = fills(model) and len(self.fields) == len(model._meta.fields)
        if not self._fills or pre_init.receivers or post_init.receivers:
            return model(**values)
        if not values.keys() <= self.names:
            return model(**values)  # a related object, a property, a wrong name: Django's
        obj = model.__new__(model)
        attributes = obj.__dict__
        attributes["_state"] = ModelState()
        for name, field in self.fields:
            attributes[name] = values[name] if name in values else field.get_default()
        return obj


class ModelRows:
    """A model's concrete columns read and written with SQL written once (``alias``: the
    table's alias in ``columns``)."""

    def __init__(self, model: type[Any], alias: str = "t") -> None:
        self.model = model
        self.alias = alias
        self.fields = list(model._meta.concrete_fields)
        self.attnames = [f.attname for f in self.fields]
        self.table = model._meta.db_table
        self.pk = model._meta.pk
        self._converters: dict[str, list[tuple[int, list[Any], Any]]] = {}
        self._fills: bool | None = None

    def columns(self, connection: Any) -> str:
        qn = connection.ops.quote_name
        return ", ".join(f"{self.alias}.{qn(f.column)}" for f in self.fields)

    def _converters_of(self, connection: Any) -> list[tuple[int, list[Any], Any]]:
        key = f"{connection.alias}:{connection.vendor}"
        converters = self._converters.get(key)
        if converters is None:
            converters = []
            for i, f in enumerate(self.fields):
                col = f.get_col(self.alias)
                funcs = read_converters(connection, col)
                if funcs:
                    converters.append((i, funcs, col))
            self._converters[key] = converters
        return converters

    def instance(self, connection: Any, values: Any) -> Any:
        """The model instance of ``len(self.fields)`` values read in ``columns`` order
        (``from_db``; ``filled`` when it is the same)."""
        values = list(values)
        for i, funcs, col in self._converters_of(connection):
            value = values[i]
            for func in funcs:
                value = func(value, col, connection)
            values[i] = value
        if self._fills is None:
            self._fills = fills(self.model) and len(self.fields) == len(
                self.model._meta.concrete_fields
            )
        if self._fills and not (pre_init.receivers or post_init.receivers):
            return filled(self.model, connection.alias, self.attnames, values)
        return self.model.from_db(connection.alias, self.attnames, values)

    def insert(self, connection: Any, values: Mapping[str, Any]) -> int:
        """INSERT one row (``values`` by attname, the others are not written); its id."""
        fields = [f for f in self.fields if f.attname in values]
        params = [prep_save(f, values[f.attname], connection) for f in fields]
        returning = connection.features.can_return_columns_from_insert

        def build() -> str:
            qn = connection.ops.quote_name
            sql = "INSERT INTO {} ({}) VALUES ({})".format(
                qn(self.table),
                ", ".join(qn(f.column) for f in fields),
                ", ".join(["%s"] * len(fields)),
            )
            return f"{sql} RETURNING {qn(self.pk.column)}" if returning else sql

        sql = sql_once(connection, (self.table, "insert", *(f.attname for f in fields)), build)
        with prepared_cursor(connection) as cursor:
            execute(cursor, sql, params)
            if returning:
                return cursor.fetchone()[0]
            return connection.ops.last_insert_id(cursor, self.table, self.pk.column)

    def update_where(
        self, connection: Any, where: Mapping[str, Any], values: Mapping[str, Any]
    ) -> int:
        """``model.objects.filter(**where).update(**values)`` for equality (or ``None``: IS
        NULL) conditions on field names; the number of rows updated."""
        meta = self.model._meta
        set_fields = [meta.get_field(name) for name in values]
        where_fields = [meta.get_field(name) for name in where]
        nulls = tuple(value is None for value in where.values())

        def build() -> str:
            qn = connection.ops.quote_name
            sets = ", ".join(f"{qn(f.column)} = %s" for f in set_fields)
            conditions = " AND ".join(
                f"{qn(f.column)} IS NULL" if null else f"{qn(f.column)} = %s"
                for f, null in zip(where_fields, nulls, strict=True)
            )
            return f"UPDATE {qn(self.table)} SET {sets} WHERE {conditions}"

        key = (self.table, "update", tuple(values), tuple(where), nulls)
        sql = sql_once(connection, key, build)
        params = [
            prep_save(f, v, connection) for f, v in zip(set_fields, values.values(), strict=True)
        ]
        params += [
            f.get_db_prep_value(v, connection)
            for f, v in zip(where_fields, where.values(), strict=True)
            if v is not None
        ]
        with connection.cursor() as cursor:
            execute(cursor, sql, params)
            return cursor.rowcount

    def update(self, connection: Any, instance: Any, attnames: list[str]) -> None:
        """UPDATE the instance's row with its values of ``attnames`` (as ``save(update_fields=
        ...)`` of an existing row)."""
        values = {
            f.attname: getattr(instance, f.attname) for f in self.fields if f.attname in attnames
        }
        self.update_where(connection, {self.pk.attname: instance.pk}, values)


_ROWS: dict[type[Any], ModelRows] = {}


def rows_of(model: type[Any]) -> ModelRows:
    rows = _ROWS.get(model)
    if rows is None:
        rows = _ROWS[model] = ModelRows(model)
    return rows


def insert_row(obj: Any) -> Any:
    """INSERT a new model instance (``auto_now`` fields set as ``save`` sets them); sets its
    primary key and returns it."""
    rows = rows_of(type(obj))
    values = {f.attname: f.pre_save(obj, True) for f in rows.fields if not f.primary_key}
    connection = transaction.get_connection()  # not the proxy: one lookup
    obj.pk = rows.insert(connection, values)
    obj._state.adding = False
    obj._state.db = connection.alias
    return obj


def update_rows(model: type, where: dict[str, Any], values: dict[str, Any]) -> int:
    """``model.objects.filter(**where).update(**values)`` for equality (or ``None``: IS NULL)
    conditions on field names; the number of rows updated."""
    return rows_of(model).update_where(transaction.get_connection(), where, values)


_PLAIN_TYPES = {
    "FloatField": float,
    "CharField": str,
    "TextField": str,
    "BigIntegerField": int,
    "IntegerField": int,
    "PositiveIntegerField": int,
    "PositiveSmallIntegerField": int,
    "SmallIntegerField": int,
    "BooleanField": bool,
}


def _plain_type(field: Any) -> type | None:
    """The Python type whose values ``field.get_db_prep_save`` returns unchanged: a plain
    column's, or a foreign key's to an integer primary key (its ints pass as they are)."""
    if field.is_relation and field.many_to_one:
        target = field.target_field.get_internal_type()
        return int if target in ("AutoField", "BigAutoField", "IntegerField") else None
    return _PLAIN_TYPES.get(field.get_internal_type())


def _reads_attribute(field: Any) -> bool:
    """``field.pre_save(obj, add)`` is ``getattr(obj, field.attname)``: the base pre_save, or
    a date's without auto_now and auto_now_add."""
    if type(field).pre_save is Field.pre_save:
        return True
    return (
        isinstance(field, DateField)
        and type(field).pre_save in (DateField.pre_save, DateTimeField.pre_save)
        and not field.auto_now
        and not field.auto_now_add
    )


class BulkInsert:
    """``Model.objects.bulk_create(objs[, ignore_conflicts=True])`` of plain rows (no
    expressions, no signals: none is connected to these models) with the statement of each
    batch size written once per backend (kept for small batches and the full batch size):
    the strategy, the ingestion and the alerts write rows on every candle, and the ORM's
    bulk_create costs more CPU to build than the statement to run. The objects get their
    ids where the backend returns them (not with ``ignore_conflicts``)."""

    def __init__(self, model: type[Any], *, ignore_conflicts: bool = False) -> None:
        self.model = model
        self.fields = [f for f in model._meta.concrete_fields if not f.primary_key]
        # The Python type whose values a field writes unchanged (its get_db_prep_save is
        # the identity on them): those skip the call.
        self.plain = [_plain_type(f) for f in self.fields]
        # The attribute a field's pre_save reads unchanged (no auto_now and the like), or
        # None: pre_save is called.
        self.attnames = [f.attname if _reads_attribute(f) else None for f in self.fields]
        # UTC datetimes are prepared once per value and batch (the rows of a flush share
        # their times).
        self.once = [f.get_internal_type() == "DateTimeField" for f in self.fields]
        self.on_conflict = OnConflict.IGNORE if ignore_conflicts else None
        # ``_prepare_related_fields_for_save`` acts only on the related objects cached on
        # an instance (and on generic foreign keys, private fields): without any, it is
        # not called.
        self.private = bool(model._meta.private_fields)
        self._sql: dict[tuple[str, str, int], str] = {}

    def _statement(self, connection: Any, rows: int, full: int, returning: bool) -> str:
        key = (connection.alias, connection.vendor, rows)
        sql = self._sql.get(key)
        if sql is None:
            ops, qn = connection.ops, connection.ops.quote_name
            one = "({})".format(", ".join(["%s"] * len(self.fields)))
            suffix = ops.on_conflict_suffix_sql(self.fields, self.on_conflict, None, None)
            sql = "{} {} ({}) VALUES {}{}{}".format(
                ops.insert_statement(on_conflict=self.on_conflict),
                qn(self.model._meta.db_table),
                ", ".join(qn(f.column) for f in self.fields),
                ", ".join([one] * rows),
                f" {suffix}" if suffix else "",
                f" RETURNING {qn(self.model._meta.pk.column)}" if returning else "",
            )
            if rows <= _KEPT_ROWS or rows == full:  # not one per row count seen
                self._sql[key] = sql
        return sql

    def insert(self, objs: list[Any]) -> list[Any]:
        """Insert ``objs`` (new instances of the model); returns them."""
        if not objs:
            return objs
        connection = transaction.get_connection()
        returning = (
            self.on_conflict is None and connection.features.can_return_rows_from_bulk_insert
        )
        # The backend's batch (SQLite's from its parameter limit; PostgreSQL's: all rows).
        batch = max(1, connection.ops.bulk_batch_size(self.fields, objs))
        full = batch if batch < len(objs) else 0  # the size of the chunks a split repeats
        columns = list(zip(self.fields, self.plain, self.attnames, self.once, strict=True))
        prepared: dict[tuple[int, Any], Any] = {}
        with connection.cursor() as cursor:
            for start in range(0, len(objs), batch):
                chunk = objs[start : start + batch]
                params = []
                for obj in chunk:
                    if self.private or obj._state.fields_cache:
                        obj._prepare_related_fields_for_save(operation_name="bulk_create")
                    for i, (f, plain, attname, once) in enumerate(columns):
                        value = getattr(obj, attname) if attname else f.pre_save(obj, True)
                        if value is None or type(value) is not plain:
                            if once and type(value) is datetime and value.tzinfo is UTC:
                                key = (i, value)
                                if key not in prepared:
                                    prepared[key] = prep_save(f, value, connection)
                                value = prepared[key]
                            else:
                                value = f.get_db_prep_save(value, connection)
                        params.append(value)
                execute(cursor, self._statement(connection, len(chunk), full, returning), params)
                if returning:
                    for obj, (pk,) in zip(chunk, cursor.fetchall(), strict=True):
                        obj.pk = pk
        for obj in objs:
            obj._state.adding = False
            obj._state.db = connection.alias
        return objs


_KEPT_ROWS = 16
_BULK: dict[type, BulkInsert] = {}


def insert_rows(objs: list[Any]) -> list[Any]:
    """``BulkInsert`` of ``objs``, new instances of one model, their ids set in order."""
    if not objs:
        return objs
    model = type(objs[0])
    bulk = _BULK.get(model)
    if bulk is None:
        bulk = _BULK[model] = BulkInsert(model)
    return bulk.insert(objs)
