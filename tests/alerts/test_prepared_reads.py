"""The reads made for every candle run as SQL compiled once (alerts.selectors.Prepared):
the same rows as the ORM's, with the run-time values in their places."""

from datetime import UTC, datetime, timedelta

import pytest

pytestmark = pytest.mark.django_db


def test_active_silences_are_those_unexpired_at_the_time_given(make_user):
    from alerts.models import Silence
    from alerts.selectors import active_silences

    ops = make_user("ops-silences", "Ops")
    t0 = datetime(2030, 1, 1, tzinfo=UTC)

    def silence(symbol: str, expires_in_h: float, ended: bool = False) -> int:
        return Silence.objects.create(
            symbol=symbol,
            reason="test",
            author=ops,
            created_at=t0,
            expires_at=t0 + timedelta(hours=expires_in_h),
            ended_at=t0 if ended else None,
        ).pk

    one, two = silence("A/B", 1), silence("C/D", 3)
    silence("E/F", 5, ended=True)

    def ids(at: datetime) -> list[int]:
        return sorted(s.id for s in active_silences(at))

    assert ids(t0) == [one, two]
    assert ids(t0 + timedelta(hours=2)) == [two]
    assert ids(t0 + timedelta(hours=4)) == []
    spec = next(s for s in active_silences(t0) if s.id == one)
    assert (spec.symbol, spec.author, spec.reason) == ("A/B", "ops-silences", "test")
    assert spec.expires_ms == int((t0 + timedelta(hours=1)).timestamp() * 1000)


def test_a_read_whose_sql_depends_on_a_value_is_refused():
    from alerts.models import Silence
    from alerts.selectors import Prepared

    read = Prepared(
        lambda symbol: Silence.objects.filter(symbol=symbol).values_list("pk"),
        symbol=("A/B", None),
    )
    with pytest.raises(ValueError, match="depends on the value of symbol"):
        read.rows(symbol="A/B")


def test_a_keyword_without_samples_shapes_the_sql_compiled_once_per_value(make_user):
    from alerts.models import Silence
    from alerts.selectors import Prepared

    ops = make_user("ops-shapes", "Ops")
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    made = [
        Silence.objects.create(
            symbol=symbol, reason="r", author=ops, created_at=t0, expires_at=t0
        ).pk
        for symbol in ("A/B", "A/B", "A/B", "C/D")
    ]
    read = Prepared(
        lambda symbol, limit: (
            Silence.objects.filter(symbol=symbol).order_by("pk").values_list("pk")[:limit]
        ),
        symbol=("X/Y", "Z/W"),
    )

    assert read.rows(symbol="A/B", limit=2) == [(made[0],), (made[1],)]
    assert read.rows(symbol="A/B", limit=5) == [(pk,) for pk in made[:3]]
    assert read.rows(symbol="C/D", limit=2) == [(made[3],)]


def test_rule_specs_are_those_the_stored_rules_make():
    from alerts.models import AlertRule
    from alerts.selectors import rule_specs

    AlertRule.objects.create(detector="volatility", params={"window": 5, "k": 1.5}, symbol="A/B")
    AlertRule.objects.create(
        detector="engulfing", timeframe="1h", enabled=False, severity="critical", rate_limit_s=30
    )

    assert rule_specs() == [rule.as_spec() for rule in AlertRule.objects.all()]
    assert [spec.detector for spec in rule_specs()] == ["engulfing", "volatility"]


def test_last_passed_event_is_the_latest_delivered_one_before_the_time_given():
    from alerts.models import Alert
    from alerts.selectors import last_passed_event_ms

    def alert(n: int, event_ms: int, suppressed: bool = False, key: str = "A|1m|d|up") -> None:
        Alert.objects.create(
            detector="d",
            dedupe_key=f"k{n}",
            rate_key=key,
            event_ms=event_ms,
            suppressed=suppressed,
            detected_at=datetime(2030, 1, 1, tzinfo=UTC),
        )

    alert(1, 100)
    alert(2, 200)
    alert(3, 250, suppressed=True)
    alert(4, 260, key="B|1m|d|up")

    assert last_passed_event_ms("A|1m|d|up", 300) == 200
    assert last_passed_event_ms("A|1m|d|up", 200) == 100
    assert last_passed_event_ms("A|1m|d|up", 100) is None
    assert last_passed_event_ms("C|1m|d|up", 300) is None


def test_reads_sent_together_return_what_each_returns_alone(make_user):
    from alerts.models import Silence
    from alerts.selectors import RECIPIENTS, SILENCES, Prepared, rows_together

    ops = make_user("ops-together", "Ops", email="ops@example.com")
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    Silence.objects.create(
        symbol="A/B", reason="r", author=ops, created_at=t0, expires_at=t0 + timedelta(hours=1)
    )
    nothing = Prepared(
        lambda symbol: Silence.objects.filter(symbol=symbol).values_list("pk"), symbol=("a", "b")
    )
    reads = [
        (SILENCES, {"now": t0}),
        (nothing, {"symbol": "none"}),
        (RECIPIENTS, {}),
        (SILENCES, {"now": t0 + timedelta(hours=2)}),
    ]
    together = rows_together(*reads)
    assert together == [read.rows(**values) for read, values in reads]
    assert together[0][0][1:] == ("A/B", "", t0 + timedelta(hours=1), "ops-together", "r")
    assert together[1] == [] and together[3] == []
    assert [row[:2] for row in together[2]] == [(ops.pk, "ops@example.com")]
