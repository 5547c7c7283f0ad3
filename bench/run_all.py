"""`make bench`: run every benchmark in bench/ (each in its own process, since each sets up
its own database) and print one table: figure, value, goal, pass / falls short.

`--readme` also rewrites the table between the BENCH markers of README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "@@BENCH-ROWS@@"
BEGIN, END = "<!-- BENCH:BEGIN -->", "<!-- BENCH:END -->"
SNIPPET = (
    "import json, sys; sys.path.insert(0, {root!r}); import importlib; "
    "rows = importlib.import_module('bench.{name}').run(); print({mark!r} + json.dumps(rows))"
)


# bench_load holds 200 POST/s for 5 minutes besides its 1,000 sockets and 100,000 orders.
LONGER = {"bench_load": 1800.0}


def modules() -> list[str]:
    """Alphabetical, bench_load last: its five minutes of POSTs leave the machine loaded for
    minutes after (load average 10 on 2 cores), which would weigh on the figures after it."""
    names = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py"))
    return sorted(names, key=lambda name: name in LONGER)


def run_module(name: str, timeout: float) -> list[dict]:
    code = SNIPPET.format(root=str(ROOT), name=name, mark=MARK)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
    except subprocess.TimeoutExpired:
        return [
            {
                "figure": f"{name}: timed out after {timeout:.0f} s",
                "value": None,
                "unit": "",
                "goal": "-",
                "ok": False,
            }
        ]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return [
        {
            "figure": f"{name}: failed ({tail[0][:120]})",
            "value": None,
            "unit": "",
            "goal": "-",
            "ok": False,
        }
    ]


def fmt_value(row: dict) -> str:
    value = row.get("value")
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        return f"{value} {row.get('unit', '')}".strip()
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{text} {row.get('unit', '')}".strip()


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| benchmark | figure | value | goal | result |", "|---|---|---|---|---|"]
    for name, row in rows:
        result = "pass" if row.get("ok") else "falls short"
        lines.append(
            f"| {name.removeprefix('bench_')} | {row['figure']} | {fmt_value(row)} | {row.get('goal', '-')} | {result} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", help="module names (bench_x) to run")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--readme", action="store_true", help="update README.md's table")
    args = parser.parse_args()
    rows: list[tuple[str, dict]] = []
    for name in args.only or modules():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += [(name, row) for row in run_module(name, max(args.timeout, LONGER.get(name, 0)))]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    db = os.environ.get("DATABASE_URL", "sqlite (default)").split("@")[-1]
    header = f"Run {stamp} on {machine()}; database: {db}."
    output = f"{header}\n\n{table(rows)}"
    print(output)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN in text and END in text:
            before, rest = text.split(BEGIN, 1)
            readme.write_text(f"{before}{BEGIN}\n{output}\n{END}{rest.split(END, 1)[1]}")
    return 0 if all(r.get("ok") for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
