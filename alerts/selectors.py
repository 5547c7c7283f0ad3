"""Reads of the alerts app."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.models import Permission, User
from django.db import connections
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils.crypto import constant_time_compare
from rest_framework.authtoken.models import Token

from trading.rows import client_binding_cursor

from .detectors import DetectorConfigError
from .models import Alert, AlertRule, Delivery, DeliveryStatus, Silence
from .rules import (
    SEVERITIES,
    Filters,
    RuleSpec,
    SilenceSpec,
    parse_filters,
    percentile,
    resolve_rules,
    severity_rank,
    validate_rule,
)

log = logging.getLogger(__name__)

RECIPIENT_PERMS = ("handle_alerts", "view_desk")
DEFAULT_EMAIL_GROUP = "Ops"


class Prepared:
    """A read that the ORM builds and compiles once per process and database, then runs as
    its SQL: for reads made for every candle, whose building and compiling cost more CPU
    than running them (the email recipients': about 5 ms a time). ``build(**params)`` returns
    a queryset of ``values_list`` rows; its parameters are constants except the scalar
    ``params``, each given with two sample values (to find where it lands in the SQL's
    parameters). A queryset whose SQL depends on a value (None, a list) is not for this,
    except through a keyword without samples (a slice's bounds, say): the SQL is then
    compiled once per value of it, which ``build`` receives as is."""

    def __init__(self, build: Callable[..., QuerySet], **samples: tuple[Any, Any]) -> None:
        self._build = build
        self._samples = samples
        self._compiled: dict[tuple, tuple[str, list, dict[str, list[int]], Any, dict]] = {}

    def _compile(self, using: str, **values: Any) -> tuple[Any, str, list]:
        compiler = self._build(**values).query.get_compiler(using=using)
        sql, params = compiler.as_sql()
        return compiler, sql, list(params)

    def _prepare(
        self, using: str, shape: dict[str, Any]
    ) -> tuple[str, list, dict[str, list[int]], Any, dict]:
        first = {**shape, **{name: pair[0] for name, pair in self._samples.items()}}
        compiler, sql, params = self._compile(using, **first)
        positions = {}
        for name, (_, other) in self._samples.items():
            _, other_sql, other_params = self._compile(using, **{**first, name: other})
            if other_sql != sql or len(other_params) != len(params):
                raise ValueError(f"the SQL of this read depends on the value of {name}")
            positions[name] = [
                i for i, (a, b) in enumerate(zip(params, other_params, strict=True)) if a != b
            ]
        fields = [col[0] for col in compiler.select[: compiler.col_count]]
        return sql, params, positions, compiler, compiler.get_converters(fields)

    def statement(self, using: str = "default", **values: Any) -> tuple[str, list]:
        """The SQL and parameters of the read with these values."""
        connection = connections[using]
        shape = {k: v for k, v in values.items() if k not in self._samples}
        key = (using, connection.vendor, *sorted(shape.items()))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._prepare(using, shape)
        sql, params, positions, _, _ = compiled
        if positions:
            params = list(params)
            for name, where in positions.items():
                value = values[name]
                if isinstance(value, datetime):
                    value = connection.ops.adapt_datetimefield_value(value)
                for i in where:
                    params[i] = value
        return sql, params

    def converted(self, rows: list, using: str = "default", **values: Any) -> list[tuple]:
        """Rows fetched for ``statement(using, **values)`` as the ORM would return them."""
        connection = connections[using]
        shape = {k: v for k, v in values.items() if k not in self._samples}
        _, _, _, compiler, converters = self._compiled[
            (using, connection.vendor, *sorted(shape.items()))
        ]
        if converters:
            return [tuple(row) for row in compiler.apply_converters(rows, converters)]
        return rows

    def rows(self, using: str = "default", **values: Any) -> list[tuple]:
        sql, params = self.statement(using, **values)
        with connections[using].cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        return self.converted(rows, using, **values)


def rows_together(
    *reads: tuple[Prepared, dict[str, Any]], using: str = "default"
) -> list[list[tuple]]:
    """The rows of several prepared reads, in one round trip on PostgreSQL (their
    statements sent as one query, the results read in turn), one read after another
    elsewhere."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return [read.rows(using, **values) for read, values in reads]
    statements = [read.statement(using, **values) for read, values in reads]
    with client_binding_cursor(connection) as cursor:
        cursor.execute(
            "; ".join(sql for sql, _ in statements), [p for _, params in statements for p in params]
        )
        fetched = [cursor.fetchall()]
        while len(fetched) < len(reads) and cursor.nextset():
            fetched.append(cursor.fetchall())
    if len(fetched) != len(reads):
        raise RuntimeError(f"{len(reads)} reads sent together, {len(fetched)} results")
    return [
        read.converted(rows, using, **values)
        for (read, values), rows in zip(reads, fetched, strict=True)
    ]


_RULES = Prepared(
    lambda: AlertRule.objects.values_list(
        "detector", "params", "symbol", "timeframe", "enabled", "severity", "rate_limit_s"
    )
)


def rule_specs() -> list[RuleSpec]:
    """Every stored rule, as AlertRule.as_spec makes it (read for every candle)."""
    return [
        RuleSpec(
            detector=detector,
            params=dict(params or {}),
            symbol=symbol,
            timeframe=timeframe,
            enabled=enabled,
            severity=severity,
            rate_limit_s=rate_limit_s,
        )
        for detector, params, symbol, timeframe, enabled, severity, rate_limit_s in _RULES.rows()
    ]


def rules_for_stream(
    symbol: str, timeframe: str, usable: list[RuleSpec] | None = None
) -> list[RuleSpec]:
    """The stream's rules, out of ``usable`` (default: usable_rules(), read now)."""
    return resolve_rules(usable_rules() if usable is None else usable, symbol, timeframe)


def usable_rules() -> list[RuleSpec]:
    """Every stored rule that can work; one that cannot (written around the validation) is
    skipped with an error in the log rather than stopping its streams."""
    usable = []
    for spec in rule_specs():
        try:
            validate_rule(spec)
        except DetectorConfigError as err:
            log.error(
                "alert rule %s on %s/%s skipped: %s",
                spec.detector,
                spec.symbol or "*",
                spec.timeframe or "*",
                err,
            )
            continue
        usable.append(spec)
    return usable


SILENCES = Prepared(
    lambda now: Silence.objects.filter(ended_at__isnull=True, expires_at__gt=now).values_list(
        "pk", "symbol", "detector", "expires_at", f"author__{User.USERNAME_FIELD}", "reason"
    ),
    now=(datetime(2000, 1, 1, tzinfo=UTC), datetime(2001, 1, 1, tzinfo=UTC)),
)


def active_silences(now: datetime) -> list[SilenceSpec]:
    return silence_specs(SILENCES.rows(now=now))


def silence_specs(rows: list[tuple]) -> list[SilenceSpec]:
    """The silences of SILENCES rows."""
    return [
        SilenceSpec(
            id=pk,
            symbol=symbol,
            detector=detector,
            expires_ms=int(expires_at.timestamp() * 1000),
            author=author,
            reason=reason,
        )
        for pk, symbol, detector, expires_at, author, reason in rows
    ]


_LAST_PASSED = Prepared(
    lambda rate_key, before_ms: (
        Alert.objects.filter(rate_key=rate_key, suppressed=False, event_ms__lt=before_ms)
        .order_by("-event_ms")
        .values_list("event_ms")[:1]
    ),
    rate_key=("a|b|c|d", "e|f|g|h"),
    before_ms=(1, 2),
)


def last_passed_event_ms(rate_key: str, before_ms: int) -> int | None:
    """The event time of the key's last delivered (not suppressed) alert before this one."""
    found = _LAST_PASSED.rows(rate_key=rate_key, before_ms=before_ms)
    return found[0][0] if found else None


@dataclass(frozen=True)
class Recipient:
    user_id: int
    email: str
    filters: Filters


def _recipient_rows() -> QuerySet:
    perms = Permission.objects.filter(content_type__app_label="audit", codename__in=RECIPIENT_PERMS)
    memberships = User.groups.through.objects.filter(group__permissions__in=perms)
    grants = User.user_permissions.through.objects.filter(permission__in=perms)
    return (
        User.objects.filter(is_active=True)
        .exclude(email="")
        .filter(
            Q(is_superuser=True)
            | Q(pk__in=memberships.values("user_id"))
            | Q(pk__in=grants.values("user_id"))
        )
        .annotate(
            in_default_group=Exists(
                User.groups.through.objects.filter(
                    user_id=OuterRef("pk"), group__name=DEFAULT_EMAIL_GROUP
                )
            )
        )
        .order_by("pk")
        .values_list(
            "pk",
            "email",
            "in_default_group",
            "alert_subscription__pk",
            "alert_subscription__email",
            "alert_subscription__symbols",
            "alert_subscription__detectors",
            "alert_subscription__min_severity",
        )
    )


RECIPIENTS = Prepared(_recipient_rows)


def email_recipients() -> list[Recipient]:
    """Active users with an email and the handle_alerts or view_desk permission who opted
    in: their AlertSubscription says email, or they have none and are in the Ops group."""
    return recipients_of(RECIPIENTS.rows())


def recipients_of(rows: list[tuple]) -> list[Recipient]:
    """The email recipients of RECIPIENTS rows."""
    found = []
    for pk, email, in_default_group, sub, *choices in rows:
        if sub is None and in_default_group:
            found.append(Recipient(pk, email, Filters()))
        elif sub is not None and choices[0]:
            symbols, detectors, severity = choices[1:]
            filters = parse_filters(
                {"symbols": symbols, "detectors": detectors, "min_severity": severity}
            )
            found.append(Recipient(pk, email, filters))
    return found


def _user_row(pk: Any) -> QuerySet:
    model = get_user_model()
    return model.objects.filter(pk=pk).values_list(*(f.name for f in model._meta.concrete_fields))


_USER = Prepared(_user_row, pk=(1, 2))
_TOKEN = Prepared(
    lambda key, user_id: Token.objects.filter(key=key, user_id=user_id).values_list("pk")[:1],
    key=("sample-a", "sample-b"),
    user_id=(1, 2),
)


def user(pk: Any) -> Any:
    """The user as the database has them now (None when deleted), read with SQL compiled
    once: an open alert socket re-reads its user before each action and every
    ALERTS_PRESENCE_TTL_S / 3 seconds."""
    rows = _USER.rows(pk=pk)
    if not rows:
        return None
    model = get_user_model()
    return model.from_db("default", [f.attname for f in model._meta.concrete_fields], rows[0])


def token_held(key: str, user_id: Any) -> bool:
    """Whether this API token still exists and is this user's."""
    return bool(_TOKEN.rows(key=key, user_id=user_id))


def session_held(key: str, user: Any) -> bool:
    """Whether this login session still exists, unexpired, and is this user's as
    django.contrib.auth.get_user would accept it: logging out deletes it, and a password
    change voids it (its hash of the password no longer matches)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=key)
    data = store.load()  # {} for a session deleted or expired
    if str(data.get(SESSION_KEY)) != str(user.pk):
        return False
    return constant_time_compare(data.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash())


def snapshot(filters: Filters, limit: int = 50) -> list[dict]:
    """Latest unacknowledged, delivered alerts matching the filters, newest first."""
    qs = Alert.objects.filter(acknowledged_at__isnull=True, suppressed=False)
    if filters.symbols:
        qs = qs.filter(symbol__in=filters.symbols)
    if filters.detectors:
        qs = qs.filter(detector__in=filters.detectors)
    # in SQL before the slice: newer alerts below the minimum would push it out of the rows
    qs = qs.filter(severity__in=SEVERITIES[severity_rank(filters.min_severity) :])
    rows = qs.order_by("-detected_at", "-id")[: limit * 3]
    return [
        a.as_message()
        for a in rows
        if filters.matches(symbol=a.symbol, detector=a.detector, severity=a.severity)
    ][:limit]


LATENCY_SPANS = {
    "ingest_to_sent": "ingested_at",
    "close_to_sent": "candle_close_at",
    "detect_to_sent": "detected_at",
}


def latency_stats(
    *, since: datetime | None = None, channel: str | None = None, limit: int = 100_000
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per channel and span (ingest/close/detect to sent): count, p50, p95, p99 in ms."""
    qs = Delivery.objects.filter(status=DeliveryStatus.SENT, sent_at__isnull=False)
    if since is not None:
        qs = qs.filter(sent_at__gte=since)
    if channel:
        qs = qs.filter(channel=channel)
    rows = qs.order_by("-sent_at").values_list(
        "channel", "sent_at", "alert__ingested_at", "alert__candle_close_at", "alert__detected_at"
    )[:limit]
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for chan, sent, ingested, closed, detected in rows:
        for span, stamp in zip(LATENCY_SPANS, (ingested, closed, detected), strict=True):
            if stamp is not None:
                samples[chan][span].append((sent - stamp).total_seconds() * 1000)
    return {
        chan: {
            span: {
                "count": len(values),
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
            }
            for span, values in spans.items()
        }
        for chan, spans in sorted(samples.items())
    }
