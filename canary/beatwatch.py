"""An alert when beat stops.

Beat schedules every periodic check (watchdogs, canary monitor, reconciliation, the
worker's heartbeat), so none of them can notice that beat itself stopped. Each worker
therefore runs a timer thread of its own, started on worker_ready: every
HEARTBEAT_INTERVAL_S it reads beat's heartbeat (canary.heartbeat, marked each time beat
publishes a task) and, once that is older than HEARTBEAT_STALE_S, raises one critical
alert for the stale episode. The alert's key is the heartbeat's last value, the same for
every worker reading it, so several workers (or a restarted one) raise it once: alerts
are deduplicated by key.

A worker alerts only on a stop it saw happen: a heartbeat that was already stale, or
missing, when it started and never fresh since (no beat in this deployment yet, or a key
left by an earlier run) is /health's and the pre-flight's to report, not an alert.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watch:
    """What one watcher knows between ticks."""

    seen_fresh: bool = False
    """Beat's heartbeat was fresh at least once since this watcher started."""
    last_known: float | None = None
    """The heartbeat's last value read (kept when the key then disappears)."""
    alerted: float | None = None
    """The stale episode (its heartbeat value) already alerted."""


@dataclass(frozen=True)
class Verdict:
    watch: Watch
    stale_since: float | None = None
    """Set when an alert is due: the last heartbeat of the stale episode."""
    age_s: float | None = None


def assess(watch: Watch, heartbeat: float | None, *, now: float, stale_s: float) -> Verdict:
    """One tick: ``heartbeat`` is beat's last mark (epoch seconds, None when the key is
    missing). Alert once per stale episode, never before beat was seen fresh."""
    known = heartbeat if heartbeat is not None else watch.last_known
    if known is None:
        return Verdict(watch)
    age = now - known
    if age < stale_s:
        return Verdict(Watch(seen_fresh=True, last_known=known), age_s=age)
    watch = replace(watch, last_known=known)
    if not watch.seen_fresh or watch.alerted == known:
        return Verdict(watch, age_s=age)
    return Verdict(replace(watch, alerted=known), stale_since=known, age_s=age)


def alert_key(since: float) -> str:
    return f"beat-stale:{int(since)}"


def _read_heartbeat() -> float | None:
    from .heartbeat import KEY_BEAT, last_seen

    return last_seen(KEY_BEAT)


def _raise(since: float, age_s: float) -> None:
    from django.db import close_old_connections, connection

    from .safety_adapters import raise_alert

    close_old_connections()
    try:
        last = datetime.fromtimestamp(since, tz=UTC).isoformat(timespec="seconds")
        raise_alert(
            key=alert_key(since),
            message=(
                f"beat stopped: no scheduled task published for {age_s:.0f} s (last at "
                f"{last}); watchdogs, canary monitor and reconciliation are not running"
            ),
            payload={"last_heartbeat": since, "age_s": round(age_s, 1)},
        )
    finally:
        connection.close()


@dataclass
class BeatWatch:
    """The worker's timer thread around `assess`. `tick` is one read and, when due, one
    alert; a failed read or alert changes nothing and is tried again at the next tick."""

    interval_s: float
    stale_s: float
    read: Callable[[], float | None] = _read_heartbeat
    alert: Callable[[float, float], None] = _raise
    clock: Callable[[], float] = time.time
    watch: Watch = Watch()

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> float | None:
        """Returns the stale episode alerted by this tick, if any."""
        try:
            heartbeat = self.read()
        except Exception as exc:  # Redis down: /health reports it; nothing to judge here
            log.debug("beat watch: heartbeat unreadable: %s", exc)
            return None
        verdict = assess(self.watch, heartbeat, now=self.clock(), stale_s=self.stale_s)
        if verdict.stale_since is not None:
            try:
                self.alert(verdict.stale_since, verdict.age_s or 0.0)
            except Exception:
                log.exception("beat watch: the beat-stale alert could not be raised")
                return None
            log.critical("beat stale for %.0f s: alert raised", verdict.age_s or 0.0)
        self.watch = verdict.watch
        return verdict.stale_since

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def start(self) -> BeatWatch:
        self._thread = threading.Thread(target=self.run, name="beat-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


_running: BeatWatch | None = None
_lock = threading.Lock()


def start_at_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    """Celery worker_ready (main process): start this worker's watch."""
    from django.conf import settings

    global _running
    with _lock:
        if _running is None:
            _running = BeatWatch(
                interval_s=settings.HEARTBEAT_INTERVAL_S, stale_s=settings.HEARTBEAT_STALE_S
            ).start()


def stop_at_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    """Celery worker_shutdown: stop the watch (the thread is a daemon all the same)."""
    global _running
    with _lock:
        running, _running = _running, None
    if running is not None:
        with contextlib.suppress(Exception):
            running.stop()
