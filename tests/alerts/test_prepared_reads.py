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
