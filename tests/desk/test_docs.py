"""Every command in docs/RUNBOOK.md and docs/TROUBLESHOOTING.md is checked: management
commands are parsed by their own parser (the options shown exist) and the read-only ones
are run; make targets exist; celery and uvicorn accept the options shown; the health URL
answers; redis-cli pings."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from django.core.management import call_command, get_commands, load_command_class

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "RUNBOOK.md", ROOT / "docs" / "TROUBLESHOOTING.md"]
PREFIXES = ("python manage.py ", "make ", "celery ", "uvicorn ", "curl ", "redis-cli ")
# Read-only commands run for real, by their first words.
RUN = {("check",), ("check", "--deploy"), ("audit_verify",), ("canary", "status")}

pytestmark = pytest.mark.django_db


def doc_commands(path: Path) -> list[str]:
    """Lines of ```sh blocks (continuations joined, comments dropped) and inline code spans
    that start like a command."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [s for s in re.findall(r"`([^`\n]+)`", prose) if s.startswith(PREFIXES)]
    return found


ALL = [(path.name, command) for path in DOCS for command in doc_commands(path)]


def test_the_docs_have_commands_of_each_kind():
    kinds = {command.split()[0] for _, command in ALL}
    assert kinds == {"python", "make", "celery", "uvicorn", "curl", "redis-cli"}
    sections = [
        "## Start",
        "## Stop",
        "## Health",
        "## Go-live day",
        "## Rollback",
        "## Restore",
        "## Alerts not arriving",
        "## Email not sending",
        "## WebSocket disconnecting",
        "## Stale market data",
        "## NO-GO reasons",
    ]
    text = "".join(path.read_text() for path in DOCS)
    assert all(s in text for s in sections)


def check_manage(argv: list[str], capsys, request) -> None:
    name, args = argv[0], argv[1:]
    app = get_commands().get(name)
    assert app is not None, f"no management command {name!r}"
    parser = load_command_class(app, name).create_parser("manage.py", name)
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{shlex.join(argv)}: {capsys.readouterr().err}") from exc
    if tuple(argv[:2]) in RUN or tuple(argv) in RUN:
        if argv[:2] == ["canary", "status"] and len(argv) > 2:  # the example rollout "1"
            argv = [*argv[:2], str(request.getfixturevalue("desk").rollout.pk), *argv[3:]]
        call_command(*argv)


@cache
def help_text(*program: str) -> str:
    proc = subprocess.run(
        [*program, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def check_flags(argv: list[str], help_output: str) -> None:
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-"):
            assert flag in help_output, f"{flag} is not an option of {argv[:3]}"


def check_make(argv: list[str]) -> None:
    targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    assert argv[1] in targets, f"make has no target {argv[1]!r}"


def check_curl(argv: list[str], client) -> None:
    url = next(a for a in argv if a.startswith("http"))
    path = "/" + url.split("/", 3)[3]
    response = client.get(path)
    assert response.status_code in (200, 503)
    assert {"database", "redis", "worker", "beat"} <= set(response.json()["components"])


def check_redis_cli(argv: list[str], settings) -> None:
    assert argv[-1] == "ping", "only read-only redis-cli commands in the docs"
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed here")
    args = [settings.REDIS_URL if a.startswith("redis://") else a for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0 and proc.stdout.strip() == "PONG", proc.stdout + proc.stderr


@pytest.mark.parametrize(("doc", "command"), ALL, ids=[f"{d}: {c}"[:90] for d, c in ALL])
def test_documented_command(doc, command, capsys, client, settings, request):
    argv = shlex.split(command)
    if argv[:2] == ["python", "manage.py"]:
        check_manage(argv[2:], capsys, request)
    elif argv[0] == "make":
        check_make(argv)
    elif argv[0] == "celery":
        assert argv[1:3] == ["-A", "config"]
        check_flags(argv[4:], help_text(sys.executable, "-m", "celery", "-A", "config", argv[3]))
    elif argv[0] == "uvicorn":
        assert argv[1] == "config.asgi:application"
        check_flags(argv[2:], help_text(sys.executable, "-m", "uvicorn"))
    elif argv[0] == "curl":
        check_curl(argv, client)
    elif argv[0] == "redis-cli":
        check_redis_cli(argv, settings)
    else:
        raise AssertionError(f"{doc}: no check for {command!r}")


def test_daily_report_from_the_runbook_runs(reports_in_tmp):
    lines = [
        c for _, c in ALL if c.startswith("python manage.py daily_report") and "--no-email" in c
    ]
    assert lines
    for line in lines:
        call_command(*shlex.split(line)[2:])
    assert (reports_in_tmp / "reports" / "2018-01-16.html").exists()
