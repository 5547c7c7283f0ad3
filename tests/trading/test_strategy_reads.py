"""The strategy's reads with SQL written once: ``Holding.load`` and the deployment that
``Account.reload`` reads are what the ORM queries they replace read."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime

import pytest

from tests.trading.test_execution import ETH, LTC, T0, TF_MS, make_candle, make_deployment
from trading import execution
from trading.models import Deployment, Order, OrderStatus, Position, Signal
from trading.strategy import Account, Holding, levels_of

pytestmark = pytest.mark.django_db

T = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def orm_holding(deployment_id: int, symbol: str) -> Holding:
    """``Holding.load`` as the ORM read it."""
    qty = (
        Position.objects.filter(deployment_id=deployment_id, symbol=symbol)
        .values_list("qty", flat=True)
        .first()
    ) or 0.0
    if qty <= 0:
        return Holding(qty)
    return Holding(qty, *levels_of(deployment_id, symbol))


def order(deployment, symbol, *, purpose=execution.ENTRY, filled=1.0, signal=None):
    return Order.objects.create(
        deployment=deployment, signal=signal, client_order_id=f"c{next(_ids)}", purpose=purpose,
        symbol=symbol, side="buy", requested_qty=1.0, filled_qty=filled,
        status=OrderStatus.FILLED if filled else OrderStatus.REJECTED, created_at=T,
    )  # fmt: skip


def signal(deployment, candle, stop, target):
    return Signal.objects.create(
        deployment=deployment, candle=candle, symbol=candle.symbol, side="buy", entry=1.0,
        stop=stop, target=target, reward_risk=2.0, score=3, factors={}, ts_ms=1, created_at=T,
    )  # fmt: skip


def test_holding_of_no_position_flat_and_short_has_no_levels():
    dep = make_deployment()
    candle = make_candle(ETH)
    order(dep, ETH, signal=signal(dep, candle, 0.9, 1.2))
    assert Holding.load(dep.pk, ETH) == orm_holding(dep.pk, ETH) == Holding(0.0)
    position = Position.objects.create(deployment=dep, symbol=ETH, qty=0.0)
    assert Holding.load(dep.pk, ETH) == orm_holding(dep.pk, ETH) == Holding(0.0)
    Position.objects.filter(pk=position.pk).update(qty=-2.0)
    assert Holding.load(dep.pk, ETH) == orm_holding(dep.pk, ETH) == Holding(-2.0)


@pytest.mark.parametrize("seed", range(5))
def test_holding_of_a_long_takes_the_levels_of_its_last_filled_entry(seed):
    rng = random.Random(seed)
    dep, other = make_deployment(), make_deployment(name="d2")
    Position.objects.create(deployment=dep, symbol=ETH, qty=rng.choice((0.5, 2.0)))
    Position.objects.create(deployment=dep, symbol=LTC, qty=1.0)
    Position.objects.create(deployment=other, symbol=ETH, qty=1.0)
    assert Holding.load(dep.pk, ETH) == orm_holding(dep.pk, ETH)  # a long without entries
    for i in range(rng.randrange(1, 8)):
        candle = make_candle(rng.choice((ETH, LTC)), T0 + i * TF_MS)
        owner = rng.choice((dep, dep, other))
        sig = signal(owner, candle, rng.uniform(0.5, 0.9), rng.choice((None, 1.5)) or 1.1)
        order(
            owner,
            candle.symbol,
            purpose=rng.choice((execution.ENTRY, execution.ENTRY, "exit")),
            filled=rng.choice((0.0, 1.0, 1.0)),
            signal=rng.choice((sig, sig, None)),
        )
        for d, symbol in ((dep, ETH), (dep, LTC), (other, ETH), (other, LTC)):
            assert Holding.load(d.pk, symbol) == orm_holding(d.pk, symbol)


def test_account_reload_reads_the_deployment_as_the_orm():
    dep = make_deployment(params={"warmup": 3}, symbols=[ETH, LTC])
    Deployment.objects.filter(pk=dep.pk).update(cash=0.75, allocation=0.25)
    account = Account(dep)
    account.reload()
    orm = Deployment.objects.get(pk=dep.pk)
    fields = Deployment._meta.concrete_fields
    assert {f.attname: getattr(account.deployment, f.attname) for f in fields} == {
        f.attname: getattr(orm, f.attname) for f in fields
    }
    assert account.cash == 0.75 and account.deployment.symbols == [ETH, LTC]
    assert not account.deployment._state.adding
    Deployment.objects.filter(pk=dep.pk).update(name="gone")
    account.deployment = Deployment(pk=dep.pk + 1000)
    with pytest.raises(Deployment.DoesNotExist):
        account.reload()
