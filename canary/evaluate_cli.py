"""Logic of the ``canary evaluate`` command: JSON-lines metrics in, JSON-lines verdicts out.

No Django: the management command only wires ``add_arguments`` to its parser and calls
``run(options, stdin, stdout, stderr)``. ``evaluate_stream`` itself does no I/O.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from canary.engine import (
    METRIC_DOMAINS,
    METRIC_NAMES,
    Metrics,
    MetricsError,
    ThresholdError,
    Thresholds,
    evaluate,
    is_positive_int,
)

PHASE_KEY = "phase"
ALLOWED_KEYS = frozenset(METRIC_NAMES) | {PHASE_KEY}


def parse_metrics(obj: Mapping[str, Any]) -> tuple[Metrics, int | None]:
    """Validate one JSON object of metrics; return the metrics and its optional phase.

    ``null`` means "no value". Raises ``MetricsError`` naming the offending field.
    """
    if not isinstance(obj, Mapping):
        raise MetricsError(None, "line is not a JSON object")
    unknown = sorted(str(key) for key in obj if key not in ALLOWED_KEYS)
    if unknown:
        raise MetricsError(unknown[0], f"unknown key(s): {', '.join(unknown)}")
    values = {name: _parse_value(name, obj.get(name)) for name in METRIC_NAMES}
    return Metrics(**values), _parse_phase(obj.get(PHASE_KEY))


def _parse_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    domain = METRIC_DOMAINS[name]
    problem = domain.check(value)
    if problem:
        raise MetricsError(name, problem)
    if domain.integer:
        return int(value)
    return value


def _parse_phase(value: Any) -> int | None:
    if value is None:
        return None
    if not is_positive_int(value):
        raise MetricsError(PHASE_KEY, f"must be a positive integer, got {value!r}")
    return value


def _error(message: str, field: str | None, line_no: int) -> dict[str, Any]:
    return {"error": message, "field": field, "line": line_no}


def evaluate_records(
    lines: Iterable[str], thresholds: Thresholds, default_phase: int = 1
) -> Iterator[dict[str, Any]]:
    """Like ``evaluate_stream`` but yields the JSON-ready dicts.

    NaN/Infinity (which ``json`` accepts) are rejected by the range checks, naming the field.
    """
    if not is_positive_int(default_phase):
        raise ValueError(f"default_phase must be a positive integer, got {default_phase!r}")
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            metrics, phase = parse_metrics(json.loads(line))
        except MetricsError as exc:
            yield _error(exc.message, exc.field, line_no)
            continue
        except (ValueError, RecursionError) as exc:
            # JSONDecodeError, an integer of more digits than Python converts, or nesting
            # deeper than the parser recurses
            yield _error(f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}", None, line_no)
            continue
        verdict = evaluate(metrics, thresholds, phase if phase is not None else default_phase)
        yield verdict.to_dict()


def evaluate_stream(
    lines: Iterable[str], thresholds: Thresholds, default_phase: int = 1
) -> Iterator[str]:
    """One output JSON line per non-blank input line: a verdict, or an error naming the field.

    Error lines look like ``{"error": "...", "field": "fill_rate", "line": 3}`` (``field`` is
    null when the line is not a JSON object); later lines are still evaluated.
    """
    for record in evaluate_records(lines, thresholds, default_phase):
        yield json.dumps(record)


# --- command wiring -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--thresholds",
        metavar="PATH",
        default=None,
        help="JSON file of thresholds (partial allowed; defaults otherwise)",
    )
    parser.add_argument(
        "--phase",
        type=int,
        default=1,
        help="phase index (1-based) for lines without a 'phase' key; default 1",
    )
    parser.add_argument(
        "--input",
        metavar="PATH",
        default="-",
        help="JSON-lines metrics file, '-' for stdin (default)",
    )


def load_thresholds(text: str | None) -> Thresholds:
    """Thresholds from JSON text (``None`` -> defaults); raises ``ThresholdError``."""
    if text is None:
        return Thresholds()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ThresholdError("thresholds", f"invalid JSON: {exc}") from exc
    return Thresholds.from_dict(data)


def run(options: Mapping[str, Any], stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Run the command. Exit status: 0 all lines evaluated, 1 some line rejected,
    2 unusable arguments (thresholds or phase)."""
    try:
        thresholds = load_thresholds(_read_optional(options.get("thresholds")))
    except (OSError, ThresholdError) as exc:
        stderr.write(f"thresholds: {exc}\n")
        return 2
    default_phase = options.get("phase")
    if default_phase is None:
        default_phase = 1
    if not is_positive_int(default_phase):
        stderr.write(f"--phase must be a positive integer, got {default_phase!r}\n")
        return 2
    source = options.get("input") or "-"
    if source == "-":
        return _write_all(evaluate_records(stdin, thresholds, default_phase), stdout)
    try:
        with open(source, encoding="utf-8", errors="replace") as handle:
            return _write_all(evaluate_records(handle, thresholds, default_phase), stdout)
    except OSError as exc:
        stderr.write(f"input: {exc}\n")
        return 2


def _read_optional(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _write_all(records: Iterable[dict[str, Any]], stdout: TextIO) -> int:
    status = 0
    for record in records:
        if "error" in record:
            status = 1
        stdout.write(json.dumps(record) + "\n")
    return status
