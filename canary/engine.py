"""Pure gate engine for canary phases: metrics + thresholds -> verdict -> lifecycle decision.

No Django, no clock, no I/O. Each gate criterion is a small rule object (``Criterion``) in
``CRITERIA``; the lifecycle decision is a first-match rule table (``DECISION_RULES``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, Literal

from trading.numbers import is_finite_number

Number = int | float
MetricValue = int | float | bool

# More metrics than this outside their target turn a verdict from WARNING into FAIL.
MAX_OUTSIDE_TARGET_FOR_WARNING = 2


class Outcome(StrEnum):
    PASS = "PASS"
    WARNING = "WARNING"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


class ThresholdError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class MetricsError(ValueError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Metrics:
    """Live metrics of one phase; ``None`` means "no value" and the metric is skipped."""

    orders: int | None = None
    latency_p95_ms: float | None = None
    fill_rate: float | None = None
    slippage_bps: float | None = None
    confluence_avg: float | None = None
    drawdown_pct: float | None = None
    error_rate: float | None = None
    critical_errors: int | None = None
    stream_gap_s: float | None = None
    db_ok: bool | None = None


METRIC_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Metrics))


def is_positive_int(value: Any) -> bool:
    """Phase indexes and counts: a real ``int`` (not a bool) >= 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, slots=True)
class Domain:
    """Range of legal values of a metric (inclusive bounds; ``None`` = unbounded)."""

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    boolean: bool = False

    def describe(self) -> str:
        if self.boolean:
            return "a boolean"
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {self.lo:g}..{self.hi:g}"
        if self.lo is not None:
            return f"{kind} >= {self.lo:g}"
        if self.hi is not None:
            return f"{kind} <= {self.hi:g}"
        return kind

    def check(self, value: Any) -> str | None:
        """Return why ``value`` is illegal, or ``None`` when it is legal."""
        if self.boolean:
            return None if isinstance(value, bool) else f"must be {self.describe()}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self.describe()}"
        if not is_finite_number(value):
            return "must be a finite number"
        if self.integer and value != int(value):
            return f"must be {self.describe()}"
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            return f"must be {self.describe()}, got {value!r}"
        return None


METRIC_DOMAINS: Mapping[str, Domain] = {
    "orders": Domain(lo=0, integer=True),
    "latency_p95_ms": Domain(lo=0),
    "fill_rate": Domain(lo=0, hi=1),
    "slippage_bps": Domain(),
    "confluence_avg": Domain(lo=0, hi=4),
    "drawdown_pct": Domain(hi=0),
    "error_rate": Domain(lo=0, hi=1),
    "critical_errors": Domain(lo=0, integer=True),
    "stream_gap_s": Domain(lo=0),
    "db_ok": Domain(boolean=True),
}


@dataclass(frozen=True, slots=True)
class Comparison:
    """A comparison ``value <symbol> bound``; ``negation`` is the symbol of its complement."""

    symbol: str
    negation: str
    test: Callable[[Any, Any], bool]
    lower_is_inside: bool  # the region it describes lies below the bound
    inclusive: bool

    def __call__(self, value: Any, bound: Any) -> bool:
        return self.test(value, bound)


LT = Comparison("<", ">=", operator.lt, lower_is_inside=True, inclusive=False)
LE = Comparison("<=", ">", operator.le, lower_is_inside=True, inclusive=True)
GT = Comparison(">", "<=", operator.gt, lower_is_inside=False, inclusive=False)
GE = Comparison(">=", "<", operator.ge, lower_is_inside=False, inclusive=True)
IS = Comparison("is", "is not", operator.is_, lower_is_inside=False, inclusive=True)


def _regions_overlap(target: Comparison, t: Number, fail: Comparison, f: Number) -> bool:
    """True when a value could be both on the PASS side of ``t`` and past the fail bound ``f``."""
    if t == f:
        return target.inclusive and fail.inclusive
    return t > f if target.lower_is_inside else t < f


@dataclass(frozen=True, slots=True)
class Reason:
    metric: str
    value: MetricValue | None
    bound: MetricValue
    kind: Literal["fail_bound", "target", "min_orders"]
    relation: str = ""  # how value relates to bound, e.g. "<=" in "-3.2 <= -3.0"
    note: str = ""

    @property
    def message(self) -> str:
        if self.relation == "is":
            text = f"{self.metric} is {self.bound}"
        else:
            text = f"{self.metric} {self.value} {self.relation} {self.bound}"
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "bound": self.bound,
            "kind": self.kind,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Criterion:
    """One gate criterion: PASS-side target comparison and fail-bound comparison of a metric.

    Bounds live in ``Thresholds`` as ``<metric>_target`` / ``<metric>_fail``.
    """

    metric: str
    target: Comparison | None
    fail: Comparison | None
    fail_note: str = "fail bound"

    def fail_reason(self, value: MetricValue | None, thresholds: Thresholds) -> Reason | None:
        if value is None or self.fail is None:
            return None
        bound = thresholds.fail_bound(self.metric)
        if not self.fail(value, bound):
            return None
        return Reason(self.metric, value, bound, "fail_bound", self.fail.symbol, self.fail_note)

    def target_reason(
        self, value: MetricValue | None, thresholds: Thresholds, phase: int
    ) -> Reason | None:
        if value is None or self.target is None:
            return None
        bound = thresholds.target(self.metric, phase)
        if self.target(value, bound):
            return None
        note = f"target {self.target.symbol} {bound}"
        return Reason(self.metric, value, bound, "target", self.target.negation, note)


CRITERIA: tuple[Criterion, ...] = (
    Criterion("latency_p95_ms", target=LT, fail=GT),
    Criterion("fill_rate", target=GT, fail=LT),
    Criterion("slippage_bps", target=LT, fail=GT),
    Criterion("confluence_avg", target=GE, fail=LT),
    Criterion("drawdown_pct", target=GT, fail=LE, fail_note="circuit breaker"),
    Criterion("error_rate", target=LT, fail=GT),
    Criterion("critical_errors", target=LE, fail=GE),
    Criterion("stream_gap_s", target=None, fail=GT),
    Criterion("db_ok", target=None, fail=IS, fail_note="database check failed"),
)
CRITERIA_BY_METRIC: Mapping[str, Criterion] = {c.metric: c for c in CRITERIA}


def _default_phase_targets() -> dict[int, dict[str, float]]:
    return {1: {"drawdown_pct": -1.0}}


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds; validated on construction. JSON form: ``to_dict`` / ``from_dict``.

    ``phase_targets`` overrides targets per 1-based phase index, e.g. ``{1: {"drawdown_pct":
    -1.0}}``: phase 1 needs drawdown > -1.0, the other phases use ``drawdown_pct_target``.
    """

    min_orders: int = 20
    latency_p95_ms_target: float = 500.0
    latency_p95_ms_fail: float = 1500.0
    fill_rate_target: float = 0.95
    fill_rate_fail: float = 0.90
    slippage_bps_target: float = 15.0
    slippage_bps_fail: float = 30.0
    confluence_avg_target: float = 3.2
    confluence_avg_fail: float = 3.0
    drawdown_pct_target: float = -2.0
    drawdown_pct_fail: float = -3.0
    error_rate_target: float = 0.01
    error_rate_fail: float = 0.05
    critical_errors_target: int = 0
    critical_errors_fail: int = 1
    stream_gap_s_fail: float = 30.0
    phase_targets: dict[int, dict[str, float]] = field(default_factory=_default_phase_targets)

    db_ok_fail: ClassVar[bool] = False  # fixed: a failed database check always fails

    def __post_init__(self) -> None:
        copied = {phase: dict(targets) for phase, targets in self.phase_targets.items()}
        object.__setattr__(self, "phase_targets", copied)
        self.validate()

    def target(self, metric: str, phase: int) -> MetricValue:
        override = self.phase_targets.get(phase, {})
        if metric in override:
            return override[metric]
        return getattr(self, f"{metric}_target")

    def fail_bound(self, metric: str) -> MetricValue:
        return getattr(self, f"{metric}_fail")

    def validate(self) -> None:
        """Raise ``ThresholdError`` naming the first impossible field."""
        _check_value("min_orders", self.min_orders, Domain(lo=1, integer=True))
        for criterion in CRITERIA:
            _validate_criterion(self, criterion)
        _validate_phase_targets(self)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["phase_targets"] = {
            str(phase): dict(targets) for phase, targets in sorted(self.phase_targets.items())
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Build from a (possibly partial) JSON object; missing keys take their defaults."""
        if not isinstance(data, Mapping):
            raise ThresholdError("thresholds", "must be a JSON object")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ThresholdError(str(key), "unknown threshold")
        values = dict(data)
        if "phase_targets" in values:
            values["phase_targets"] = _parse_phase_targets(values["phase_targets"])
        for name in ("min_orders", "critical_errors_target", "critical_errors_fail"):
            if name in values:
                values[name] = _as_int(name, values[name])
        return cls(**values)


def _check_value(name: str, value: Any, domain: Domain) -> None:
    problem = domain.check(value)
    if problem:
        raise ThresholdError(name, problem)


def _validate_criterion(t: Thresholds, criterion: Criterion) -> None:
    domain = METRIC_DOMAINS[criterion.metric]
    fail_name = f"{criterion.metric}_fail"
    if criterion.fail is not None and fail_name in t.__dataclass_fields__:
        _check_value(fail_name, getattr(t, fail_name), domain)
    if criterion.target is not None:
        target_name = f"{criterion.metric}_target"
        _check_target(t, criterion, target_name, getattr(t, target_name))


def _check_target(t: Thresholds, criterion: Criterion, name: str, value: Any) -> None:
    _check_value(name, value, METRIC_DOMAINS[criterion.metric])
    if criterion.target is None or criterion.fail is None:
        return
    fail_bound = t.fail_bound(criterion.metric)
    if _regions_overlap(criterion.target, value, criterion.fail, fail_bound):
        raise ThresholdError(
            name,
            f"target {criterion.target.symbol} {value} is on the wrong side of fail bound "
            f"{criterion.fail.symbol} {fail_bound}",
        )


def _validate_phase_targets(t: Thresholds) -> None:
    for phase, targets in t.phase_targets.items():
        if not is_positive_int(phase):
            raise ThresholdError("phase_targets", f"phase {phase!r} is not a positive integer")
        for metric, value in targets.items():
            name = f"phase_targets.{phase}.{metric}"
            criterion = CRITERIA_BY_METRIC.get(metric)
            if criterion is None or criterion.target is None:
                raise ThresholdError(name, "not a metric with a target")
            _check_target(t, criterion, name, value)


def _as_int(name: str, value: Any) -> Any:
    """JSON editors may write 20.0 for 20; anything else is left for validation to reject."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def _parse_phase_targets(raw: Any) -> dict[int, dict[str, float]]:
    if not isinstance(raw, Mapping):
        raise ThresholdError("phase_targets", "must be an object {phase: {metric: target}}")
    parsed: dict[int, dict[str, float]] = {}
    for key, targets in raw.items():
        phase = _parse_phase_key(key)
        if not isinstance(targets, Mapping):
            raise ThresholdError(f"phase_targets.{key}", "must be an object {metric: target}")
        parsed[phase] = dict(targets)
    return parsed


def _parse_phase_key(key: Any) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise ThresholdError("phase_targets", f"phase {key!r} is not a positive integer")


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reasons: tuple[Reason, ...] = ()
    breaker_tripped: bool = False  # any fail bound crossed

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.outcome.value, "reasons": [r.to_dict() for r in self.reasons]}


def evaluate(metrics: Metrics, thresholds: Thresholds, phase: int) -> Verdict:
    """FAIL on any fail bound; else INCONCLUSIVE below min_orders; else count target misses."""
    if not is_positive_int(phase):
        raise ValueError(f"phase must be a positive integer, got {phase!r}")
    values = [(c, getattr(metrics, c.metric)) for c in CRITERIA]

    fails = [r for c, v in values if (r := c.fail_reason(v, thresholds)) is not None]
    if fails:
        return Verdict(Outcome.FAIL, tuple(fails), breaker_tripped=True)

    orders = metrics.orders or 0
    if orders < thresholds.min_orders:
        reason = Reason("orders", orders, thresholds.min_orders, "min_orders", "<", "min_orders")
        return Verdict(Outcome.INCONCLUSIVE, (reason,))

    misses = tuple(r for c, v in values if (r := c.target_reason(v, thresholds, phase)) is not None)
    if not misses:
        return Verdict(Outcome.PASS)
    if len(misses) <= MAX_OUTSIDE_TARGET_FOR_WARNING:
        return Verdict(Outcome.WARNING, misses)
    return Verdict(Outcome.FAIL, misses)


# --- lifecycle decision -------------------------------------------------------------------


class Action(StrEnum):
    NONE = "NONE"
    PROMOTE = "PROMOTE"
    AWAIT_PROMOTE = "AWAIT_PROMOTE"
    EXTEND = "EXTEND"
    PAUSE = "PAUSE"
    ROLLBACK = "ROLLBACK"
    MARK_LIVE = "MARK_LIVE"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class DecisionContext:
    outcome: Outcome
    at_end: bool  # the phase's minimum duration has elapsed
    previous_warning: bool
    needs_manual_promote: bool
    is_last_phase: bool


@dataclass(frozen=True, slots=True)
class DecisionRule:
    applies: Callable[[DecisionContext], bool]
    action: Action
    reason: str


# First matching rule wins.
DECISION_RULES: tuple[DecisionRule, ...] = (
    DecisionRule(lambda c: c.outcome is Outcome.FAIL, Action.ROLLBACK, "verdict FAIL"),
    DecisionRule(lambda c: not c.at_end, Action.NONE, "minimum duration not reached"),
    DecisionRule(
        lambda c: c.outcome is Outcome.PASS and c.is_last_phase,
        Action.MARK_LIVE,
        "last phase passed",
    ),
    DecisionRule(
        lambda c: c.outcome is Outcome.PASS and c.needs_manual_promote,
        Action.AWAIT_PROMOTE,
        "phase passed; promotion needs manual approval",
    ),
    DecisionRule(lambda c: c.outcome is Outcome.PASS, Action.PROMOTE, "phase passed"),
    DecisionRule(
        lambda c: c.outcome is Outcome.WARNING and c.previous_warning,
        Action.PAUSE,
        "second WARNING in a row",
    ),
    DecisionRule(lambda c: c.outcome is Outcome.WARNING, Action.EXTEND, "first WARNING"),
    DecisionRule(
        lambda c: c.outcome is Outcome.INCONCLUSIVE, Action.EXTEND, "not enough orders yet"
    ),
)


def decide(
    verdict: Verdict | Outcome,
    *,
    phase_elapsed_s: float,
    min_duration_s: float,
    previous_warning: bool,
    needs_manual_promote: bool,
    is_last_phase: bool,
) -> Decision:
    """Lifecycle action for the canary monitor; time is passed in, never read from a clock."""
    outcome = verdict.outcome if isinstance(verdict, Verdict) else Outcome(verdict)
    context = DecisionContext(
        outcome=outcome,
        at_end=phase_elapsed_s >= min_duration_s,
        previous_warning=previous_warning,
        needs_manual_promote=needs_manual_promote,
        is_last_phase=is_last_phase,
    )
    for rule in DECISION_RULES:
        if rule.applies(context):
            return Decision(rule.action, rule.reason)
    raise AssertionError(f"no decision rule for {context}")  # unreachable: rules are exhaustive
