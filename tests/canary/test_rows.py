"""The monitor step's reads and writes with SQL written once (``trading.rows.ModelRows``):
the same instances and rows as the ORM's, and a bounded number of statements per step."""

import random
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from canary import metrics, services
from canary.metrics import phase_metrics
from canary.models import GateEvaluation, Phase, Rollout
from canary.monitor import monitor_step
from trading.models import Deployment, EquitySnapshot, MarketStream

from .factories import (  # noqa: F401
    T0,
    add_equity,
    at,
    fast_passwords,
    healthy_orders,
    make_deployment,
    touch_stream,
)
from .test_monitor import start

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_passwords")]


def values(instance):
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_locked_rollout_and_its_deployment_are_the_orm_instances(make_user):
    rollout = start(make_user, thresholds={"min_orders": 3, "phase_targets": {"1": {}}})
    Rollout.objects.filter(pk=rollout.pk).update(ended_at=at(5), state_reason="é ✓")
    with transaction.atomic():
        locked = services.lock_rollout(rollout.pk)
    orm = Rollout.objects.select_related("deployment").get(pk=rollout.pk)
    assert values(locked) == values(orm)
    assert values(locked.deployment) == values(orm.deployment)
    assert locked.thresholds["min_orders"] == 3 and isinstance(locked.thresholds, dict)
    assert locked.ended_at == at(5) and locked.ended_at.tzinfo is not None
    assert not locked._state.adding
    with transaction.atomic(), pytest.raises(Rollout.DoesNotExist):
        services.lock_rollout(rollout.pk + 1000)


def test_current_phase_and_its_update_match_the_orm(make_user):
    rollout = start(make_user)
    phase = services.current_phase(rollout)
    orm = Phase.objects.get(rollout=rollout, index=1)
    assert values(phase) == values(orm)
    phase.ends_at = orm.ends_at + timedelta(seconds=90)
    phase.extensions = 7
    with transaction.atomic():
        services.PHASE_ROWS.update(transaction.get_connection(), phase, ["ends_at", "extensions"])
    orm.refresh_from_db()
    assert (orm.ends_at, orm.extensions, orm.consecutive_warnings) == (phase.ends_at, 7, 0)
    rollout.current_phase = 0
    assert services.current_phase(rollout) is None


def test_an_evaluation_row_written_by_the_step_reads_back_as_written(make_user):
    rollout = start(make_user, thresholds={"min_orders": 3})
    healthy_orders(rollout.deployment, 5, start=at(1))
    MarketStream.objects.create(exchange="paper", symbol="ETH/BTC", timeframe="5m")
    result = monitor_step(rollout_id=rollout.pk, now=at(30))
    evaluation = GateEvaluation.objects.get(pk=result.evaluation_id)
    assert evaluation.rollout_id == rollout.pk
    assert evaluation.phase == Phase.objects.get(rollout=rollout, index=1)
    assert evaluation.evaluated_at == at(30)
    assert evaluation.verdict == result.verdict
    assert evaluation.reasons == result.reasons
    assert evaluation.action == result.action == "NONE"
    assert evaluation.metrics["orders"] == 5
    assert evaluation.metrics["stream_gap_s"] == 30.0  # a stream never heard of: since


def test_extension_moves_the_phase_end_and_counts(make_user):
    rollout = start(make_user)
    touch_stream(when=at(60))
    result = monitor_step(rollout_id=rollout.pk, now=at(60))  # no orders at the end: extend
    assert (result.verdict, result.action) == ("INCONCLUSIVE", "EXTEND")
    phase = Phase.objects.get(rollout=rollout, index=1)
    assert (phase.extensions, phase.consecutive_warnings) == (1, 0)
    assert phase.ends_at == at(60 + phase.extension_s)


def test_a_step_without_action_costs_a_fixed_number_of_statements(
    make_user, django_assert_max_num_queries
):
    rollout = start(make_user)
    healthy_orders(rollout.deployment, 40, start=at(1))
    touch_stream(when=at(20))
    monitor_step(rollout_id=rollout.pk, now=at(10))
    # lock, phase and rollback to join, metrics (on SQLite + the percentile's neighbours
    # and the drawdown's marks), evaluation, the (nested) transaction's savepoint and release
    with django_assert_max_num_queries(8):
        result = monitor_step(rollout_id=rollout.pk, now=at(20))
    assert result.action == "NONE"


def test_stream_gap_counts_each_symbol_once_and_a_stream_without_a_candle_from_since():
    deployment = make_deployment(symbols=("ETH/BTC", "ETH/BTC", "LTC/BTC", 7))
    MarketStream.objects.create(
        exchange="paper", symbol="ETH/BTC", timeframe="5m", last_received_at=at(3590)
    )
    MarketStream.objects.create(
        exchange="binance", symbol="ETH/BTC", timeframe="5m", last_received_at=at(3000)
    )
    MarketStream.objects.create(exchange="paper", symbol="LTC/BTC", timeframe="5m")
    m = phase_metrics(deployment=deployment, since=at(1000), now=at(3600))
    assert m.stream_gap_s == 2600.0  # LTC/BTC: no candle yet, counted from since
    MarketStream.objects.filter(symbol="LTC/BTC").update(last_received_at=at(3599))
    m = phase_metrics(deployment=deployment, since=at(1000), now=at(3600))
    assert m.stream_gap_s == 10.0  # ETH/BTC's last candle on any exchange
    Deployment.objects.filter(pk=deployment.pk).update(symbols=[])
    deployment.refresh_from_db()
    assert phase_metrics(deployment=deployment, since=T0, now=at(10)).stream_gap_s is None


@pytest.mark.parametrize("seed", range(6))
def test_drawdown_of_fetched_marks_is_the_window_functions(seed):
    """SQLite computes the drawdown from the fetched marks (canary.metrics.drawdown_ratio):
    the same value as the SQL window over the same marks (ties in time, marks at or below
    zero, the last mark before the window's start)."""
    rng = random.Random(seed)
    deployment = make_deployment()
    for i in range(rng.randrange(1, 60)):
        when = at(rng.choice((-120, -60, 0)) if i < 3 else rng.randrange(0, 3600, 30))
        equity = rng.choice((0.0, -1.0, 10.0)) if rng.random() < 0.1 else rng.uniform(8, 12)
        add_equity(deployment, when=when, equity=equity)
    since, now = at(rng.choice((-60, 0, 30))), at(rng.randrange(600, 3600, 30))
    connection = connections["default"]
    ops = connection.ops
    window = [ops.adapt_datetimefield_value(v) for v in (since, now)]
    params = [deployment.pk, window[1], deployment.pk, window[0], window[0]]
    with connection.cursor() as cursor:
        cursor.execute(metrics._DRAWDOWN_SQL.format(table="trading_equitysnapshot"), params)
        (expected,) = cursor.fetchone()
        cursor.execute(metrics._DRAWDOWN_MARKS_SQL.format(table="trading_equitysnapshot"), params)
        marks = [equity for (equity,) in cursor.fetchall()]
    assert metrics.drawdown_ratio(marks) == expected
    got = phase_metrics(deployment=deployment, since=since, now=now).drawdown_pct
    assert got == metrics._drawdown_pct(expected)


@pytest.mark.parametrize("seed", range(4))
def test_the_drawdown_step_after_step_is_that_of_the_whole_window(
    seed, django_capture_on_commit_callbacks
):
    """On SQLite a step reads the marks after those a committed step read: at every step
    the drawdown of the whole window, also when a mark is stamped before the last one read,
    after the evaluation time, at the same time as the last, or in a transaction rolled
    back."""
    rng = random.Random(seed)
    deployment = make_deployment()
    since = at(0)
    add_equity(deployment, when=at(-60), equity=10.0)

    def expected(now):
        marks = EquitySnapshot.objects.filter(deployment=deployment, ts__gte=at(-60), ts__lte=now)
        return metrics.drawdown_ratio(m.equity for m in marks.order_by("ts", "id"))

    def step(now):
        with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
            return phase_metrics(deployment=deployment, since=since, now=now).drawdown_pct

    for i in range(1, 25):
        now = at(60 * i)
        for _ in range(rng.randrange(0, 4)):
            when = rng.choice(
                (now, at(60 * i - 30), at(60 * i + 30), at(60 * rng.randrange(1, i + 1)))
            )
            add_equity(deployment, when=when, equity=rng.uniform(5, 15))
        if rng.random() < 0.2:  # a step whose transaction is rolled back
            with pytest.raises(ZeroDivisionError), transaction.atomic():
                add_equity(deployment, when=now, equity=1.0)
                phase_metrics(deployment=deployment, since=since, now=now)
                raise ZeroDivisionError
        assert step(now) == metrics._drawdown_pct(expected(now)), i
    now = at(60 * 25)
    add_equity(deployment, when=now, equity=9.0)
    want = metrics._drawdown_pct(expected(now))
    with CaptureQueriesContext(connections["default"]) as statements:
        assert step(now) == want
    sql = [q["sql"] for q in statements.captured_queries if "SAVEPOINT" not in q["sql"]]
    # SQLite: the aggregates, then only the marks after those kept (PostgreSQL: one statement)
    assert len(sql) == (2 if connections["default"].vendor == "sqlite" else 1)


@pytest.mark.parametrize("seed", range(6))
def test_the_rollback_to_join_is_the_orms_newest_match(make_user, seed):
    """The step's rollback to join (states written into its SQL as literals): the newest
    rollback RUNNING for the deployment, or linked to the rollout and RUNNING, STAGE1_DONE
    or COMPLETED; never one of another deployment or rollout, RESTORED or FAILED."""
    from django.db.models import Q

    from canary.models import Rollback, RollbackState
    from canary.monitor import _FOLLOWED_WHEN_LINKED, _phase_and_rollback

    rng = random.Random(seed)
    rollout = start(make_user)
    other = make_deployment(name="other")
    for i in range(rng.randrange(1, 7)):
        deployment = rng.choice((rollout.deployment, other))
        state = rng.choice(list(RollbackState))
        if (
            state == RollbackState.RUNNING
            and Rollback.objects.filter(deployment=deployment, state=state).exists()
        ):
            state = RollbackState.FAILED  # one RUNNING rollback per deployment
        Rollback.objects.create(
            deployment=deployment, rollout=rng.choice((rollout, None)), trigger="gate",
            cause=f"c{i}", requested_by="test", state=state, started_at=at(i),
        )  # fmt: skip
        expected = (
            Rollback.objects.filter(
                Q(deployment_id=rollout.deployment_id, state=RollbackState.RUNNING)
                | Q(rollout=rollout, state__in=_FOLLOWED_WHEN_LINKED)
            )
            .order_by("-pk")
            .values_list("pk", flat=True)
            .first()
        )
        with transaction.atomic():
            phase, running_id = _phase_and_rollback(services.lock_rollout(rollout.pk))
        assert running_id == expected
        assert phase is not None and phase.index == 1


def test_the_cadences_new_marks_are_the_orms():
    """The rehearsal's cadence reads the marks written since the last it saw with SQL
    written once: the ORM's rows, times aware."""
    from canary.rehearsal import _marks_after
    from trading.models import EquitySnapshot

    deployment, other = make_deployment(), make_deployment(name="other")
    made = [add_equity(rng, when=at(30 * i), equity=10.0 - i) for i, rng in
            enumerate((deployment, other, deployment, deployment, other))]  # fmt: skip
    for last in (0, made[0].pk, made[2].pk, made[-1].pk):
        orm = EquitySnapshot.objects.filter(deployment_id=deployment.pk, pk__gt=last)
        expected = sorted(orm.values_list("pk", "ts", "equity"))
        got = sorted(_marks_after(deployment.pk, last))
        assert got == expected
        assert all(ts.tzinfo is not None for _, ts, _ in got)
    assert [pk for pk, _, _ in sorted(_marks_after(deployment.pk, 0))] == [
        made[0].pk, made[2].pk, made[3].pk
    ]  # fmt: skip
