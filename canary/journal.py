"""Local-file journal of a rollback's stage 1, and a Redis ring buffer of error log records.

The journal is what lets stage 1 run with the database down: every step, order intent
and order result is appended as one JSON line (flushed and fsynced before the exchange
call it announces), and the lines are replayed into the database once it is back
(canary.rollback.journal_replay). Folding the lines is pure: `fold(lines) -> JournalState`.

No Django models are imported here: the log handler is loaded while settings are read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ERROR_LOG_KEY = "errors"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- journal file


@dataclass
class JournalState:
    """What a journal says, last line wins per step and per client order id."""

    header: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    killswitch: list[dict[str, Any]] = field(default_factory=list)
    signals_disabled: bool = False
    alerts: list[dict[str, Any]] = field(default_factory=list)
    stage1_done: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return str(self.header.get("key", ""))


def fold(lines: Iterable[dict[str, Any]]) -> JournalState:
    state = JournalState()
    for line in lines:
        kind = line.get("kind")
        if kind == "rollback":
            state.header = {**state.header, **line}
        elif kind == "step":
            state.steps[line["name"]] = {**state.steps.get(line["name"], {}), **line}
        elif kind == "order":
            cid = line["client_order_id"]
            state.orders[cid] = {**state.orders.get(cid, {}), **line}
        elif kind == "killswitch":
            state.killswitch.append(line)
        elif kind == "signals":
            state.signals_disabled = True
        elif kind == "alert":
            state.alerts.append(line)
        elif kind == "stage1_done":
            state.stage1_done = line
    return state


class Journal:
    """Append-only JSON lines file of one rollback, `<dir>/rollback-<key>.jsonl`."""

    def __init__(self, directory: Path, key: str):
        self.directory = Path(directory)
        self.key = key
        self.path = self.directory / f"rollback-{key}.jsonl"

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, kind: str, **data: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"kind": kind, "at": now_iso(), **data}, default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def lines(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            for raw in fh:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:  # a line cut by a crash: the rest is intact
                    continue

    def state(self) -> JournalState:
        return fold(self.lines())

    def archive(self) -> Path:
        """Move the replayed journal aside (kept for the record, never replayed again)."""
        done = self.directory / "replayed"
        done.mkdir(parents=True, exist_ok=True)
        target = done / f"{self.path.stem}-{int(time.time())}.jsonl"
        os.replace(self.path, target)
        return target


def pending_journals(directory: Path) -> list[Journal]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    journals = []
    for path in sorted(directory.glob("rollback-*.jsonl")):
        journals.append(Journal(directory, path.stem.removeprefix("rollback-")))
    return journals


# --------------------------------------------------------------------------- error log


def _redis_key() -> str:
    from django.conf import settings

    return f"{settings.SAFETY_REDIS_PREFIX}:{ERROR_LOG_KEY}"


class RedisErrorLogHandler(logging.Handler):
    """Keeps the last SAFETY_ERROR_LOG_KEEP error records of every process in a Redis list,
    for the rollback report. Never raises and never logs itself (no recursion)."""

    _busy = False
    _skip_until = 0.0  # after a Redis failure, stay quiet for a while: no 1 s stall per record
    PAUSE_S = 30.0

    def emit(self, record: logging.LogRecord) -> None:
        cls = RedisErrorLogHandler
        if cls._busy or time.monotonic() < cls._skip_until:
            return
        if record.name.startswith(("redis", "kombu", "celery.")):
            return
        cls._busy = True
        try:
            self._push(record)
        except Exception:  # noqa: BLE001 - a log handler must never break the caller
            cls._skip_until = time.monotonic() + self.PAUSE_S
        finally:
            cls._busy = False

    def _push(self, record: logging.LogRecord) -> None:
        from django.conf import settings

        from .heartbeat import redis_client

        entry = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage()[:1000],
            "pid": record.process,
        }
        if record.exc_info and record.exc_info[1] is not None:
            entry["exception"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"[:500]
        client = redis_client()
        pipe = client.pipeline()
        pipe.lpush(_redis_key(), json.dumps(entry, default=str))
        pipe.ltrim(_redis_key(), 0, settings.SAFETY_ERROR_LOG_KEEP - 1)
        pipe.execute()


def recent_errors(limit: int = 200) -> list[dict[str, Any]]:
    """Newest first; empty when Redis cannot be read."""
    from .heartbeat import redis_client

    with contextlib.suppress(Exception):
        raw = redis_client().lrange(_redis_key(), 0, limit - 1)
        return [json.loads(item) for item in raw]
    return []
