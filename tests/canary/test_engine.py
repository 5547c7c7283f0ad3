import ast
import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary.engine import (
    CRITERIA,
    METRIC_NAMES,
    Action,
    Metrics,
    Outcome,
    Reason,
    ThresholdError,
    Thresholds,
    Verdict,
    decide,
    evaluate,
)

DEFAULTS = Thresholds()

# Every metric comfortably on its PASS side.
GOOD = Metrics(
    orders=100,
    latency_p95_ms=200.0,
    fill_rate=0.99,
    slippage_bps=5.0,
    confluence_avg=3.6,
    drawdown_pct=-0.2,
    error_rate=0.001,
    critical_errors=0,
    stream_gap_s=1.0,
    db_ok=True,
)


def with_(metrics: Metrics = GOOD, **changes) -> Metrics:
    return dataclasses.replace(metrics, **changes)


# (metric, phase, value, expected): "pass" = PASS side of the target, "target" = outside the
# target but not past the fail bound, "fail" = fail bound crossed.
BOUNDARY_TABLE = [
    # latency_p95_ms: target < 500, fail > 1500
    ("latency_p95_ms", 1, 499.9, "pass"),
    ("latency_p95_ms", 1, 500, "target"),
    ("latency_p95_ms", 1, 500.1, "target"),
    ("latency_p95_ms", 1, 1499.9, "target"),
    ("latency_p95_ms", 1, 1500, "target"),
    ("latency_p95_ms", 1, 1500.1, "fail"),
    # fill_rate: target > 0.95, fail < 0.90
    ("fill_rate", 1, 0.951, "pass"),
    ("fill_rate", 1, 0.95, "target"),
    ("fill_rate", 1, 0.949, "target"),
    ("fill_rate", 1, 0.901, "target"),
    ("fill_rate", 1, 0.90, "target"),
    ("fill_rate", 1, 0.899, "fail"),
    # slippage_bps: target < 15, fail > 30 (signed: negative slippage is in our favour)
    ("slippage_bps", 1, -4.0, "pass"),
    ("slippage_bps", 1, 14.9, "pass"),
    ("slippage_bps", 1, 15, "target"),
    ("slippage_bps", 1, 15.1, "target"),
    ("slippage_bps", 1, 29.9, "target"),
    ("slippage_bps", 1, 30, "target"),
    ("slippage_bps", 1, 30.1, "fail"),
    # confluence_avg: target >= 3.2 (inclusive), fail < 3.0
    ("confluence_avg", 1, 3.21, "pass"),
    ("confluence_avg", 1, 3.2, "pass"),
    ("confluence_avg", 1, 3.19, "target"),
    ("confluence_avg", 1, 3.01, "target"),
    ("confluence_avg", 1, 3.0, "target"),
    ("confluence_avg", 1, 2.99, "fail"),
    # drawdown_pct phase 1: target > -1.0, fail <= -3.0 (inclusive: circuit breaker)
    ("drawdown_pct", 1, 0.0, "pass"),
    ("drawdown_pct", 1, -0.99, "pass"),
    ("drawdown_pct", 1, -1.0, "target"),
    ("drawdown_pct", 1, -1.01, "target"),
    ("drawdown_pct", 1, -1.5, "target"),
    ("drawdown_pct", 1, -2.0, "target"),
    ("drawdown_pct", 1, -2.99, "target"),
    ("drawdown_pct", 1, -3.0, "fail"),
    ("drawdown_pct", 1, -3.01, "fail"),
    # drawdown_pct phases 2 and 3: target > -2.0, same fail bound
    ("drawdown_pct", 2, -1.0, "pass"),
    ("drawdown_pct", 2, -1.5, "pass"),
    ("drawdown_pct", 2, -1.99, "pass"),
    ("drawdown_pct", 2, -2.0, "target"),
    ("drawdown_pct", 2, -2.01, "target"),
    ("drawdown_pct", 2, -2.99, "target"),
    ("drawdown_pct", 2, -3.0, "fail"),
    ("drawdown_pct", 2, -3.01, "fail"),
    ("drawdown_pct", 3, -1.99, "pass"),
    ("drawdown_pct", 3, -2.0, "target"),
    ("drawdown_pct", 3, -3.0, "fail"),
    # error_rate: target < 0.01, fail > 0.05
    ("error_rate", 1, 0.0, "pass"),
    ("error_rate", 1, 0.0099, "pass"),
    ("error_rate", 1, 0.01, "target"),
    ("error_rate", 1, 0.0101, "target"),
    ("error_rate", 1, 0.0499, "target"),
    ("error_rate", 1, 0.05, "target"),
    ("error_rate", 1, 0.0501, "fail"),
    # critical_errors: target 0, fail >= 1
    ("critical_errors", 1, 0, "pass"),
    ("critical_errors", 1, 1, "fail"),
    ("critical_errors", 1, 2, "fail"),
    # stream_gap_s: no target, fail > 30
    ("stream_gap_s", 1, 0.0, "pass"),
    ("stream_gap_s", 1, 29.9, "pass"),
    ("stream_gap_s", 1, 30, "pass"),
    ("stream_gap_s", 1, 30.1, "fail"),
    # db_ok: no target, fail when False
    ("db_ok", 1, True, "pass"),
    ("db_ok", 1, False, "fail"),
]


@pytest.mark.parametrize(("metric", "phase", "value", "expected"), BOUNDARY_TABLE)
def test_boundary_table(metric, phase, value, expected):
    verdict = evaluate(with_(**{metric: value}), DEFAULTS, phase)

    if expected == "pass":
        assert verdict == Verdict(Outcome.PASS)
    elif expected == "target":
        assert verdict.outcome is Outcome.WARNING
        assert not verdict.breaker_tripped
        assert [(r.metric, r.value, r.kind) for r in verdict.reasons] == [(metric, value, "target")]
    else:
        assert verdict.outcome is Outcome.FAIL
        assert verdict.breaker_tripped
        assert [(r.metric, r.value, r.kind) for r in verdict.reasons] == [
            (metric, value, "fail_bound")
        ]


def test_boundary_table_covers_every_criterion():
    assert {row[0] for row in BOUNDARY_TABLE} == {c.metric for c in CRITERIA}
    assert {c.metric for c in CRITERIA} == set(METRIC_NAMES) - {"orders"}


def test_reason_bounds_are_the_phase_targets():
    phase1 = evaluate(with_(drawdown_pct=-1.5), DEFAULTS, 1)
    phase2 = evaluate(with_(drawdown_pct=-2.5), DEFAULTS, 2)
    assert phase1.reasons[0].bound == -1.0
    assert phase2.reasons[0].bound == -2.0


# --- verdict order ------------------------------------------------------------------------


def test_breaker_trips_with_two_orders():
    verdict = evaluate(with_(orders=2, drawdown_pct=-3.2), DEFAULTS, 1)
    assert verdict.outcome is Outcome.FAIL
    assert verdict.breaker_tripped
    assert verdict.reasons[0].message == "drawdown_pct -3.2 <= -3.0 (circuit breaker)"


def test_fail_bound_trips_without_any_orders():
    verdict = evaluate(Metrics(db_ok=False), DEFAULTS, 1)
    assert verdict.outcome is Outcome.FAIL
    assert verdict.reasons[0].message == "db_ok is False (database check failed)"


@pytest.mark.parametrize("orders", [None, 0, 1, 19])
def test_inconclusive_below_min_orders(orders):
    verdict = evaluate(with_(orders=orders), DEFAULTS, 1)
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert not verdict.breaker_tripped
    assert verdict.reasons == (Reason("orders", orders or 0, 20, "min_orders", "<", "min_orders"),)
    assert verdict.reasons[0].message == f"orders {orders or 0} < 20 (min_orders)"


def test_min_orders_boundary_is_enough():
    assert evaluate(with_(orders=20), DEFAULTS, 1).outcome is Outcome.PASS


def test_inconclusive_beats_target_misses():
    metrics = with_(orders=5, latency_p95_ms=900, fill_rate=0.92, slippage_bps=20)
    assert evaluate(metrics, DEFAULTS, 1).outcome is Outcome.INCONCLUSIVE


def test_custom_min_orders():
    thresholds = Thresholds(min_orders=1)
    assert evaluate(with_(orders=1), thresholds, 1).outcome is Outcome.PASS
    assert evaluate(with_(orders=0), thresholds, 1).outcome is Outcome.INCONCLUSIVE


# --- counting metrics outside their target ------------------------------------------------

MISSES = {
    "latency_p95_ms": 800.0,
    "fill_rate": 0.93,
    "slippage_bps": 20.0,
    "confluence_avg": 3.1,
    "error_rate": 0.02,
}


@pytest.mark.parametrize(
    ("count", "outcome"),
    [
        (0, Outcome.PASS),
        (1, Outcome.WARNING),
        (2, Outcome.WARNING),
        (3, Outcome.FAIL),
        (4, Outcome.FAIL),
        (5, Outcome.FAIL),
    ],
)
def test_outside_target_count(count, outcome):
    misses = dict(list(MISSES.items())[:count])
    verdict = evaluate(with_(**misses), DEFAULTS, 1)
    assert verdict.outcome is outcome
    assert [r.metric for r in verdict.reasons] == list(misses)
    assert all(r.kind == "target" for r in verdict.reasons)
    assert not verdict.breaker_tripped


def test_none_metrics_are_skipped():
    assert evaluate(Metrics(orders=20), DEFAULTS, 1).outcome is Outcome.PASS
    verdict = evaluate(Metrics(orders=20, latency_p95_ms=700), DEFAULTS, 1)
    assert verdict.outcome is Outcome.WARNING
    assert [r.metric for r in verdict.reasons] == ["latency_p95_ms"]


def test_all_fail_bounds_are_listed_in_table_order():
    metrics = with_(orders=3, error_rate=0.2, latency_p95_ms=2000, db_ok=False)
    verdict = evaluate(metrics, DEFAULTS, 2)
    assert [r.metric for r in verdict.reasons] == ["latency_p95_ms", "error_rate", "db_ok"]
    assert {r.kind for r in verdict.reasons} == {"fail_bound"}


def test_target_reason_message():
    verdict = evaluate(with_(latency_p95_ms=500), DEFAULTS, 1)
    assert verdict.reasons[0].message == "latency_p95_ms 500 >= 500.0 (target < 500.0)"
    verdict = evaluate(with_(confluence_avg=3.1), DEFAULTS, 1)
    assert verdict.reasons[0].message == "confluence_avg 3.1 < 3.2 (target >= 3.2)"


def test_to_dict_is_json_serialisable():
    verdict = evaluate(with_(orders=2, drawdown_pct=-3.2, stream_gap_s=31.0), DEFAULTS, 1)
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data == {
        "verdict": "FAIL",
        "reasons": [
            {
                "metric": "drawdown_pct",
                "value": -3.2,
                "bound": -3.0,
                "kind": "fail_bound",
                "message": "drawdown_pct -3.2 <= -3.0 (circuit breaker)",
            },
            {
                "metric": "stream_gap_s",
                "value": 31.0,
                "bound": 30.0,
                "kind": "fail_bound",
                "message": "stream_gap_s 31.0 > 30.0 (fail bound)",
            },
        ],
    }
    assert Verdict(Outcome.PASS).to_dict() == {"verdict": "PASS", "reasons": []}


def test_outcome_is_a_str_enum():
    assert Outcome.WARNING == "WARNING"
    assert json.dumps(Outcome.FAIL) == '"FAIL"'


@pytest.mark.parametrize("phase", [0, -1, True, 1.0])
def test_evaluate_rejects_bad_phase(phase):
    with pytest.raises(ValueError, match="phase"):
        evaluate(GOOD, DEFAULTS, phase)


def test_engine_does_not_import_django():
    source = Path(__file__).parents[2] / "canary" / "engine.py"
    tree = ast.parse(source.read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.split(".")[0] == "django" for m in modules)


# --- thresholds ---------------------------------------------------------------------------


def test_default_thresholds_are_valid():
    DEFAULTS.validate()
    assert DEFAULTS.min_orders == 20
    assert DEFAULTS.target("drawdown_pct", 1) == -1.0
    assert DEFAULTS.target("drawdown_pct", 2) == -2.0
    assert DEFAULTS.target("drawdown_pct", 3) == -2.0
    assert DEFAULTS.target("latency_p95_ms", 1) == 500.0


def test_thresholds_json_round_trip():
    data = json.loads(json.dumps(DEFAULTS.to_dict()))
    assert data["phase_targets"] == {"1": {"drawdown_pct": -1.0}}
    assert Thresholds.from_dict(data) == DEFAULTS


def test_thresholds_from_partial_dict():
    thresholds = Thresholds.from_dict(
        {"min_orders": 50.0, "phase_targets": {"2": {"drawdown_pct": -1.5, "fill_rate": 0.97}}}
    )
    assert thresholds.min_orders == 50
    assert isinstance(thresholds.min_orders, int)
    assert thresholds.target("drawdown_pct", 1) == -2.0  # overrides replaced, not merged
    assert thresholds.target("drawdown_pct", 2) == -1.5
    assert thresholds.target("fill_rate", 2) == 0.97
    assert thresholds.target("fill_rate", 3) == 0.95


def test_phase_override_changes_the_verdict():
    thresholds = Thresholds(phase_targets={2: {"fill_rate": 0.98}})
    assert evaluate(with_(fill_rate=0.97), thresholds, 1).outcome is Outcome.PASS
    assert evaluate(with_(fill_rate=0.97), thresholds, 2).outcome is Outcome.WARNING


def test_thresholds_copy_their_phase_targets():
    overrides = {1: {"drawdown_pct": -1.0}}
    thresholds = Thresholds(phase_targets=overrides)
    overrides[1]["drawdown_pct"] = -9.0
    assert thresholds.target("drawdown_pct", 1) == -1.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"latency_p95_ms_target": 1600.0}, "latency_p95_ms_target"),
        ({"latency_p95_ms_target": -1.0}, "latency_p95_ms_target"),
        ({"latency_p95_ms_fail": float("inf")}, "latency_p95_ms_fail"),
        ({"latency_p95_ms_target": float("nan")}, "latency_p95_ms_target"),
        ({"fill_rate_target": 1.1}, "fill_rate_target"),
        ({"fill_rate_fail": -0.1}, "fill_rate_fail"),
        ({"fill_rate_target": 0.85}, "fill_rate_target"),
        ({"slippage_bps_target": 31.0}, "slippage_bps_target"),
        ({"slippage_bps_fail": "30"}, "slippage_bps_fail"),
        ({"confluence_avg_target": 2.9}, "confluence_avg_target"),
        ({"confluence_avg_target": 4.5}, "confluence_avg_target"),
        ({"drawdown_pct_fail": 0.5}, "drawdown_pct_fail"),
        ({"drawdown_pct_target": -3.5}, "drawdown_pct_target"),
        ({"error_rate_fail": 1.5}, "error_rate_fail"),
        ({"error_rate_target": 0.06}, "error_rate_target"),
        ({"critical_errors_target": 0.5}, "critical_errors_target"),
        ({"critical_errors_fail": 0}, "critical_errors_target"),
        ({"stream_gap_s_fail": -1.0}, "stream_gap_s_fail"),
        ({"min_orders": 0}, "min_orders"),
        ({"min_orders": 2.5}, "min_orders"),
        ({"min_orders": True}, "min_orders"),
        ({"phase_targets": {2: {"drawdown_pct": -3.5}}}, "phase_targets.2.drawdown_pct"),
        ({"phase_targets": {1: {"fill_rate": 2.0}}}, "phase_targets.1.fill_rate"),
        ({"phase_targets": {1: {"db_ok": True}}}, "phase_targets.1.db_ok"),
        ({"phase_targets": {1: {"nope": 1.0}}}, "phase_targets.1.nope"),
        ({"phase_targets": {0: {"drawdown_pct": -1.0}}}, "phase_targets"),
    ],
)
def test_impossible_thresholds_name_the_field(changes, field):
    with pytest.raises(ThresholdError) as excinfo:
        Thresholds(**changes)
    assert excinfo.value.field == field
    assert field in str(excinfo.value)


def test_validate_can_be_called_explicitly():
    thresholds = Thresholds()
    object.__setattr__(thresholds, "fill_rate_target", 0.5)  # bypass construction checks
    with pytest.raises(ThresholdError) as excinfo:
        thresholds.validate()
    assert excinfo.value.field == "fill_rate_target"


def test_target_equal_to_fail_bound_is_allowed_when_regions_are_disjoint():
    # No WARNING band: 1500 is outside the target but not a fail.
    thresholds = Thresholds(latency_p95_ms_target=1500.0)
    assert evaluate(with_(latency_p95_ms=1500), thresholds, 1).outcome is Outcome.WARNING
    Thresholds(drawdown_pct_target=-3.0, phase_targets={})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"phase_targets": []}, "phase_targets"),
        ({"phase_targets": {"x": {}}}, "phase_targets"),
        ({"phase_targets": {"1": 5}}, "phase_targets.1"),
        ({"min_orders": "20"}, "min_orders"),
        ([], "thresholds"),
    ],
)
def test_from_dict_rejects_bad_json(data, field):
    with pytest.raises(ThresholdError) as excinfo:
        Thresholds.from_dict(data)
    assert excinfo.value.field == field


# --- lifecycle decision -------------------------------------------------------------------

P, W, F, N = Outcome.PASS, Outcome.WARNING, Outcome.FAIL, Outcome.INCONCLUSIVE

# (outcome, at_end, previous_warning, needs_manual_promote, is_last_phase, action)
DECISION_TABLE = [
    # FAIL rolls back at any moment, whatever the flags
    (F, False, False, False, False, Action.ROLLBACK),
    (F, True, False, False, False, Action.ROLLBACK),
    (F, True, True, True, True, Action.ROLLBACK),
    (F, False, True, True, True, Action.ROLLBACK),
    # before the minimum duration: nothing
    (P, False, False, False, False, Action.NONE),
    (P, False, False, False, True, Action.NONE),
    (W, False, True, False, False, Action.NONE),
    (N, False, False, False, False, Action.NONE),
    # at the end
    (P, True, False, False, False, Action.PROMOTE),
    (P, True, True, False, False, Action.PROMOTE),
    (P, True, False, True, False, Action.AWAIT_PROMOTE),
    (P, True, False, False, True, Action.MARK_LIVE),
    (P, True, False, True, True, Action.MARK_LIVE),
    (W, True, False, False, False, Action.EXTEND),
    (W, True, False, True, False, Action.EXTEND),
    (W, True, True, False, False, Action.PAUSE),
    (W, True, False, False, True, Action.EXTEND),
    (W, True, True, False, True, Action.PAUSE),
    (N, True, False, False, False, Action.EXTEND),
    (N, True, True, False, False, Action.EXTEND),
    (N, True, False, False, True, Action.EXTEND),
]


@pytest.mark.parametrize(
    ("outcome", "at_end", "previous_warning", "manual", "last", "action"), DECISION_TABLE
)
def test_decide_table(outcome, at_end, previous_warning, manual, last, action):
    decision = decide(
        Verdict(outcome),
        phase_elapsed_s=1800.0 if at_end else 1799.9,
        min_duration_s=1800.0,
        previous_warning=previous_warning,
        needs_manual_promote=manual,
        is_last_phase=last,
    )
    assert decision.action is action
    assert decision.reason


def test_decide_accepts_an_outcome_and_a_plain_string():
    flags = {"previous_warning": False, "needs_manual_promote": False, "is_last_phase": False}
    timing = {"phase_elapsed_s": 7200, "min_duration_s": 7200}
    assert decide(Outcome.PASS, **timing, **flags).action is Action.PROMOTE
    assert decide("WARNING", **timing, **flags).action is Action.EXTEND


# --- monotonicity -------------------------------------------------------------------------

HIGHER_IS_WORSE = {
    "latency_p95_ms": st.floats(0, 3000),
    "slippage_bps": st.floats(-50, 60),
    "error_rate": st.floats(0, 1),
    "critical_errors": st.integers(0, 3),
    "stream_gap_s": st.floats(0, 60),
}
LOWER_IS_WORSE = {
    "fill_rate": st.floats(0, 1),
    "confluence_avg": st.floats(0, 4),
    "drawdown_pct": st.floats(-5, 0),
    "db_ok": st.booleans(),
}
EDGES = {
    "latency_p95_ms": [500.0, 1500.0],
    "slippage_bps": [15.0, 30.0],
    "error_rate": [0.01, 0.05],
    "critical_errors": [0, 1],
    "stream_gap_s": [30.0],
    "fill_rate": [0.95, 0.90],
    "confluence_avg": [3.2, 3.0],
    "drawdown_pct": [-1.0, -2.0, -3.0],
    "db_ok": [True, False],
}
VALUE_STRATEGIES = {
    name: st.one_of(strategy, st.sampled_from(EDGES[name]))
    for name, strategy in (HIGHER_IS_WORSE | LOWER_IS_WORSE).items()
}
RANK = {Outcome.PASS: 0, Outcome.WARNING: 1, Outcome.FAIL: 2}


@st.composite
def base_and_worse(draw):
    values = {name: draw(st.none() | strategy) for name, strategy in VALUE_STRATEGIES.items()}
    metric = draw(st.sampled_from(sorted(VALUE_STRATEGIES)))
    pair = sorted([draw(VALUE_STRATEGIES[metric]), draw(VALUE_STRATEGIES[metric])])
    good, bad = pair if metric in HIGHER_IS_WORSE else pair[::-1]
    orders = draw(st.integers(0, 40))
    base = Metrics(orders=orders, **(values | {metric: good}))
    worse = Metrics(orders=orders, **(values | {metric: bad}))
    return base, worse


@settings(max_examples=300, deadline=None, database=None)
@given(pair=base_and_worse(), phase=st.integers(1, 3))
def test_a_worse_metric_never_improves_the_verdict(pair, phase):
    base, worse = pair
    before = evaluate(base, DEFAULTS, phase).outcome
    after = evaluate(worse, DEFAULTS, phase).outcome

    # orders are held fixed, so INCONCLUSIVE can only stay or turn into FAIL
    if before is Outcome.INCONCLUSIVE:
        assert after in {Outcome.INCONCLUSIVE, Outcome.FAIL}
    else:
        assert after is not Outcome.INCONCLUSIVE
        assert RANK[after] >= RANK[before]


@settings(max_examples=300, deadline=None, database=None)
@given(pair=base_and_worse(), phase=st.integers(1, 3))
def test_verdict_invariants(pair, phase):
    verdict = evaluate(pair[0], DEFAULTS, phase)
    kinds = {r.kind for r in verdict.reasons}
    assert verdict.breaker_tripped == ("fail_bound" in kinds)
    assert (verdict.outcome is Outcome.PASS) == (not verdict.reasons)
    if verdict.outcome is Outcome.INCONCLUSIVE:
        assert kinds == {"min_orders"}
    json.dumps(verdict.to_dict(), allow_nan=False)


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "-1", "one"])
def test_a_phase_key_that_is_not_an_ascii_number_is_a_threshold_error(key):
    with pytest.raises(ThresholdError, match="phase_targets"):
        Thresholds.from_dict({"phase_targets": {key: {"drawdown_pct": -1.0}}})


def test_a_threshold_beyond_a_floats_range_is_a_threshold_error():
    with pytest.raises(ThresholdError, match="finite"):
        Thresholds.from_dict({"latency_p95_ms_fail": 10**400})
