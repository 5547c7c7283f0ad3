import argparse
import io
import json

import pytest

from canary.engine import Metrics, MetricsError, ThresholdError, Thresholds
from canary.evaluate_cli import (
    add_arguments,
    evaluate_records,
    evaluate_stream,
    load_thresholds,
    parse_metrics,
    run,
)

DEFAULTS = Thresholds()

GOOD = {
    "orders": 40,
    "latency_p95_ms": 210.5,
    "fill_rate": 0.98,
    "slippage_bps": 4.2,
    "confluence_avg": 3.5,
    "drawdown_pct": -0.4,
    "error_rate": 0.002,
    "critical_errors": 0,
    "stream_gap_s": 2.0,
    "db_ok": True,
}


def line(**changes) -> str:
    return json.dumps(GOOD | changes)


def outputs(lines, thresholds=DEFAULTS, default_phase=1):
    return [json.loads(out) for out in evaluate_stream(lines, thresholds, default_phase)]


# --- good lines ---------------------------------------------------------------------------


def test_parse_metrics_full_object():
    metrics, phase = parse_metrics(GOOD | {"phase": 2})
    assert metrics == Metrics(**GOOD)
    assert phase == 2


def test_parse_metrics_nulls_and_missing_keys_mean_no_value():
    metrics, phase = parse_metrics({"orders": 3, "fill_rate": None})
    assert metrics == Metrics(orders=3)
    assert phase is None


def test_parse_metrics_accepts_integral_floats_for_counts():
    metrics, _ = parse_metrics({"orders": 20.0, "critical_errors": 0.0})
    assert metrics.orders == 20 and isinstance(metrics.orders, int)
    assert metrics.critical_errors == 0 and isinstance(metrics.critical_errors, int)


def test_parse_metrics_accepts_domain_edges():
    edges = {"fill_rate": 0, "error_rate": 1, "drawdown_pct": 0, "confluence_avg": 4}
    metrics, _ = parse_metrics(edges | {"latency_p95_ms": 0, "slippage_bps": -12.5})
    assert metrics.fill_rate == 0 and metrics.confluence_avg == 4


def test_good_lines_give_one_verdict_each():
    lines = [
        line(),
        line(latency_p95_ms=700),
        line(orders=2, drawdown_pct=-3.2),
        line(orders=5),
    ]
    assert [out["verdict"] for out in outputs(lines)] == ["PASS", "WARNING", "FAIL", "INCONCLUSIVE"]


def test_verdict_line_shape():
    [out] = outputs([line(orders=2, drawdown_pct=-3.2)])
    assert out == {
        "verdict": "FAIL",
        "reasons": [
            {
                "metric": "drawdown_pct",
                "value": -3.2,
                "bound": -3.0,
                "kind": "fail_bound",
                "message": "drawdown_pct -3.2 <= -3.0 (circuit breaker)",
            }
        ],
    }


def test_phase_key_overrides_default_phase():
    # drawdown -1.5 is outside the phase-1 target (> -1.0) but inside phase 2's (> -2.0)
    lines = [line(drawdown_pct=-1.5), line(drawdown_pct=-1.5, phase=2)]
    assert [o["verdict"] for o in outputs(lines)] == ["WARNING", "PASS"]
    assert [o["verdict"] for o in outputs(lines[:1], default_phase=3)] == ["PASS"]


def test_blank_lines_are_skipped_but_counted():
    lines = ["", line(), "   \n", "\n", "not json\n"]
    result = outputs(lines)
    assert result[0]["verdict"] == "PASS"
    assert result[1]["line"] == 5
    assert len(result) == 2


def test_custom_thresholds_are_used():
    strict = Thresholds(min_orders=100)
    assert outputs([line()], strict)[0]["verdict"] == "INCONCLUSIVE"


# --- bad lines ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        # not JSON / not an object: no field to name
        ("{not json", None),
        ("[1, 2]", None),
        ('"PASS"', None),
        ("42", None),
        # unknown keys, named (the first in sorted order; all in the message)
        (line(latency_p99_ms=3), "latency_p99_ms"),
        # non-numeric values, bools are not numbers
        (line(latency_p95_ms="fast"), "latency_p95_ms"),
        (line(fill_rate=[0.9]), "fill_rate"),
        (line(orders=True), "orders"),
        (line(slippage_bps=False), "slippage_bps"),
        (line(critical_errors=0.5), "critical_errors"),
        (line(orders=2.5), "orders"),
        # db_ok must be a bool
        (line(db_ok=1), "db_ok"),
        (line(db_ok="true"), "db_ok"),
        # non-finite numbers (json accepts these tokens and huge exponents)
        ('{"latency_p95_ms": NaN}', "latency_p95_ms"),
        ('{"slippage_bps": Infinity}', "slippage_bps"),
        ('{"stream_gap_s": -Infinity}', "stream_gap_s"),
        ('{"error_rate": 1e999}', "error_rate"),
        # an integer beyond a float's range (json reads it as an int)
        ('{"latency_p95_ms": 1' + "0" * 400 + "}", "latency_p95_ms"),
        ('{"orders": -1' + "0" * 400 + "}", "orders"),
        # out of range
        (line(fill_rate=1.01), "fill_rate"),
        (line(fill_rate=-0.01), "fill_rate"),
        (line(error_rate=1.5), "error_rate"),
        (line(error_rate=-0.1), "error_rate"),
        (line(latency_p95_ms=-1), "latency_p95_ms"),
        (line(orders=-1), "orders"),
        (line(critical_errors=-1), "critical_errors"),
        (line(stream_gap_s=-0.5), "stream_gap_s"),
        (line(drawdown_pct=0.1), "drawdown_pct"),
        (line(confluence_avg=4.01), "confluence_avg"),
        (line(confluence_avg=-0.1), "confluence_avg"),
        # phase not a positive int
        (line(phase=0), "phase"),
        (line(phase=-2), "phase"),
        (line(phase=1.5), "phase"),
        (line(phase=True), "phase"),
        (line(phase="2"), "phase"),
    ],
)
def test_bad_line_names_the_field(text, field):
    [out] = outputs([text])
    assert set(out) == {"error", "field", "line"}
    assert out["field"] == field
    assert out["line"] == 1
    assert out["error"]


@pytest.mark.parametrize(
    "text",
    [
        '{"orders": 1' + "0" * 5000 + "}",  # more digits than Python converts
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser recurses
    ],
)
def test_json_the_parser_refuses_is_an_error_line_and_the_stream_goes_on(text):
    first, second = outputs([text, line()])
    assert first["field"] is None and first["line"] == 1
    assert first["error"].startswith("invalid JSON")
    assert second["verdict"] == "PASS"


def test_unknown_keys_are_all_listed():
    [out] = outputs([line(zeta=1, alpha=2)])
    assert out["field"] == "alpha"
    assert "alpha, zeta" in out["error"]


def test_parse_metrics_raises_metrics_error_naming_the_field():
    with pytest.raises(MetricsError) as excinfo:
        parse_metrics({"fill_rate": 1.2})
    assert excinfo.value.field == "fill_rate"
    assert "fill_rate" in str(excinfo.value)


def test_stream_continues_after_errors_with_line_numbers():
    lines = [
        line(),
        "{oops",
        line(fill_rate=7),
        "",
        line(latency_p95_ms=800),
        line(bogus=1),
        line(orders=1, db_ok=False),
    ]
    result = outputs(lines)
    assert result == [
        {"verdict": "PASS", "reasons": []},
        {"error": result[1]["error"], "field": None, "line": 2},
        {"error": result[2]["error"], "field": "fill_rate", "line": 3},
        {"verdict": "WARNING", "reasons": result[3]["reasons"]},
        {"error": result[4]["error"], "field": "bogus", "line": 6},
        {"verdict": "FAIL", "reasons": result[5]["reasons"]},
    ]


def test_stream_is_lazy():
    def lines():
        yield line()
        raise AssertionError("read too far")

    assert json.loads(next(evaluate_stream(lines(), DEFAULTS)))["verdict"] == "PASS"


def test_bad_default_phase_is_rejected():
    with pytest.raises(ValueError, match="default_phase"):
        list(evaluate_records([line()], DEFAULTS, default_phase=0))


# --- command wiring -----------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(argv))


def run_command(argv, stdin_text=""):
    stdout, stderr = io.StringIO(), io.StringIO()
    status = run(parse_args(argv), io.StringIO(stdin_text), stdout, stderr)
    return status, stdout.getvalue(), stderr.getvalue()


def test_run_reads_stdin_with_defaults():
    status, out, err = run_command([], line() + "\n" + line(orders=1) + "\n")
    assert status == 0
    assert [json.loads(x)["verdict"] for x in out.splitlines()] == ["PASS", "INCONCLUSIVE"]
    assert err == ""


def test_run_exit_status_one_when_a_line_is_rejected():
    status, out, _ = run_command([], "nope\n" + line() + "\n")
    assert status == 1
    assert len(out.splitlines()) == 2


def test_run_with_files_and_phase(tmp_path):
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"phase_targets": {"2": {"drawdown_pct": -0.1}}}))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(line(drawdown_pct=-0.4) + "\n")
    argv = ["--thresholds", str(thresholds), "--input", str(metrics), "--phase", "2"]
    status, out, _ = run_command(argv)
    assert status == 0
    assert json.loads(out)["verdict"] == "WARNING"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{", "invalid JSON"),
        ('{"fill_rate_target": 0.5}', "fill_rate_target"),
        ('{"nope": 1}', "nope"),
    ],
)
def test_run_rejects_bad_thresholds(tmp_path, content, needle):
    path = tmp_path / "t.json"
    path.write_text(content)
    status, out, err = run_command(["--thresholds", str(path)], line())
    assert status == 2
    assert out == ""
    assert needle in err


def test_run_rejects_bad_phase_and_missing_files(tmp_path):
    assert run_command(["--phase", "0"], line())[0] == 2
    assert run_command(["--input", str(tmp_path / "missing.jsonl")])[0] == 2
    assert run_command(["--thresholds", str(tmp_path / "missing.json")])[0] == 2


def test_load_thresholds():
    assert load_thresholds(None) == DEFAULTS
    assert load_thresholds('{"min_orders": 5}').min_orders == 5
    with pytest.raises(ThresholdError) as excinfo:
        load_thresholds('{"min_orders": 0}')
    assert excinfo.value.field == "min_orders"
