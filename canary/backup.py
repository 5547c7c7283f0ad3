"""Database backups: create, verify, restore, retention.

SQLite is copied with the online backup API, PostgreSQL dumped with `pg_dump -Fc`. Each
file gets a JSON sidecar (engine, sha256, size, created) so it can be verified even when
its Backup row is gone (e.g. after restoring an older backup). A restore is refused, with
the reason, before anything is overwritten when the file is missing, truncated, corrupted,
of another engine, or does not restore into a scratch database that passes the integrity
check (engine check, migrations table, every table readable, audit chain intact).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db import connections, transaction
from django.db.migrations.loader import MigrationLoader
from django.db.utils import load_backend
from django.utils import timezone

from audit.services import GENESIS, audit_record, audit_verify, head_problem

from .models import Backup

SQLITE_MAGIC = b"SQLite format 3\x00"
PG_MAGIC = b"PGDMP"
EXTENSIONS = {"sqlite": "sqlite3", "postgresql": "dump"}
ENGINES = {"sqlite": "django.db.backends.sqlite3", "postgresql": "django.db.backends.postgresql"}


class BackupError(Exception):
    """A backup could not be made."""


class BackupRefused(Exception):
    """A backup failed verification; nothing was overwritten. `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class IntegrityReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: int = 0
    rows: int = 0
    audit_seq: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyResult:
    ok: bool
    reason: str
    path: str
    engine: str = ""
    sha256: str = ""
    integrity: IntegrityReport | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["integrity"] = self.integrity.as_dict() if self.integrity else None
        return data


# --------------------------------------------------------------------------- helpers


def current_engine(alias: str = "default") -> str:
    return connections[alias].vendor


def backup_dir() -> Path:
    path = Path(settings.SAFETY_BACKUP_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def sidecar_read(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        raise BackupRefused(f"sidecar {side.name} is missing")
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise BackupRefused(f"sidecar {side.name} is unreadable: {exc}") from exc


def _db_settings(alias: str = "default") -> dict[str, Any]:
    return connections[alias].settings_dict


def _pg_env(conf: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    if conf.get("PASSWORD"):
        env["PGPASSWORD"] = str(conf["PASSWORD"])
    return env


def _pg_args(conf: dict[str, Any]) -> list[str]:
    return [
        "-h",
        str(conf.get("HOST") or "127.0.0.1"),
        "-p",
        str(conf.get("PORT") or 5432),
        "-U",
        str(conf.get("USER") or "postgres"),
    ]


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise BackupError(f"{argv[0]} is not installed")
    try:
        return subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=settings.SAFETY_BACKUP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BackupError(f"{argv[0]} timed out after {exc.timeout:.0f} s") from exc


def _stderr(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    picked = errors[0] if errors else (lines[-1] if lines else f"exit code {proc.returncode}")
    return picked[:300]


# --------------------------------------------------------------------------- dump


def _dump_sqlite(target: Path, alias: str) -> None:
    source = sqlite3.connect(str(_db_settings(alias)["NAME"]), timeout=20)
    dest = sqlite3.connect(str(target))
    try:
        source.backup(dest)
    finally:
        dest.close()
        source.close()


def _dump_postgresql(target: Path, alias: str) -> None:
    conf = _db_settings(alias)
    proc = _run(
        ["pg_dump", "-Fc", "--no-owner", "-f", str(target), *_pg_args(conf), str(conf["NAME"])],
        env=_pg_env(conf),
    )
    if proc.returncode != 0:
        raise BackupError(f"pg_dump failed: {_stderr(proc)}")


def _write_file(engine: str, alias: str, created: datetime) -> Path:
    stamp = created.strftime("%Y%m%dT%H%M%S%f")
    final = backup_dir() / f"db-{engine}-{stamp}-{uuid.uuid4().hex[:6]}.{EXTENSIONS[engine]}"
    partial = final.with_name(final.name + ".part")
    if engine == "sqlite":
        _dump_sqlite(partial, alias)
    elif engine == "postgresql":
        _dump_postgresql(partial, alias)
    else:
        raise BackupError(f"backups of {engine} databases are not supported")
    os.replace(partial, final)
    return final


def backup_create(*, actor: Any, note: str = "", alias: str = "default") -> Backup:
    """Write a backup file and its sidecar, then its row and audit record (one transaction).
    The dump runs outside any transaction; retention runs after."""
    engine = current_engine(alias)
    created = timezone.now()
    path = _write_file(engine, alias, created)
    meta = {
        "engine": engine,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "created_at": created.isoformat(),
        "database": Path(str(_db_settings(alias)["NAME"])).name,
        "format": "sqlite3 online backup" if engine == "sqlite" else "pg_dump custom",
        "note": note[:200],
    }
    sidecar_path(path).write_text(json.dumps(meta, indent=2))
    with transaction.atomic(using=alias):
        backup = Backup.objects.using(alias).create(
            created_at=created,
            engine=engine,
            path=str(path),
            size_bytes=meta["size_bytes"],
            sha256=meta["sha256"],
            note=note[:200],
        )
        audit_record(
            action="backup.created",
            actor=actor,
            target=backup,
            payload={k: meta[k] for k in ("engine", "sha256", "size_bytes", "note")}
            | {"file": path.name},
        )
    retention_apply(keep=settings.SAFETY_BACKUP_KEEP)
    return backup


# --------------------------------------------------------------------------- verify


def _check_file(path: Path, expected_engine: str, row: Backup | None) -> dict[str, Any]:
    """Cheap checks, no database touched. Raises BackupRefused with the reason."""
    if not path.exists():
        raise BackupRefused(f"backup file {path} is missing")
    meta = sidecar_read(path)
    engine = meta.get("engine")
    for found in (engine, row.engine if row is not None else expected_engine):
        if found != expected_engine:
            raise BackupRefused(
                f"backup is of a {found} database; this database is {expected_engine}"
            )
    size = path.stat().st_size
    if size != meta.get("size_bytes"):
        raise BackupRefused(
            f"backup is truncated or grown: {size} bytes, {meta.get('size_bytes')} recorded"
        )
    digest = sha256_file(path)
    recorded = {meta.get("sha256")} | ({row.sha256} if row is not None else set())
    if recorded != {digest}:
        raise BackupRefused(
            f"checksum mismatch: file sha256 {digest[:12]}…, recorded {sorted(recorded)}"
        )
    magic = SQLITE_MAGIC if engine == "sqlite" else PG_MAGIC
    with open(path, "rb") as fh:
        if not fh.read(len(magic)) == magic:
            raise BackupRefused(f"not a {engine} backup (bad header)")
    return meta | {"sha256": digest}


def _scratch_settings(name: str, alias: str) -> dict[str, Any]:
    conf = copy.deepcopy(dict(_db_settings(alias)))
    conf["NAME"] = name
    conf["CONN_MAX_AGE"] = 0
    conf.pop("TEST", None)
    conf["TEST"] = {}
    return conf


@contextlib.contextmanager
def _alias_for(conf: dict[str, Any]) -> Iterator[str]:
    """A connection to `conf` under a throwaway alias, registered for this thread only
    (never in settings.DATABASES: nothing else can route to it)."""
    alias = f"scratch_{uuid.uuid4().hex[:8]}"
    wrapper = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, alias)
    setattr(connections._connections, alias, wrapper)
    try:
        yield alias
    finally:
        with contextlib.suppress(Exception):
            wrapper.close()
        with contextlib.suppress(AttributeError):
            delattr(connections._connections, alias)


def _pg_admin(conf: dict[str, Any]):
    import psycopg

    return psycopg.connect(
        host=conf.get("HOST") or "127.0.0.1",
        port=conf.get("PORT") or 5432,
        user=conf.get("USER") or "postgres",
        password=conf.get("PASSWORD") or None,
        dbname=conf["NAME"],
        autocommit=True,
        connect_timeout=5,
    )


@contextlib.contextmanager
def _scratch_database(path: Path, engine: str, alias: str) -> Iterator[str]:
    """Restore `path` into a throwaway database and yield a connection alias to it."""
    if engine == "sqlite":
        with tempfile.TemporaryDirectory(prefix="scratch-") as tmp:
            target = Path(tmp) / "scratch.sqlite3"
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            dest = sqlite3.connect(str(target))
            try:
                source.backup(dest)
            except sqlite3.DatabaseError as exc:
                raise BackupRefused(f"backup does not open as SQLite: {exc}") from exc
            finally:
                dest.close()
                source.close()
            with _alias_for(_scratch_settings(str(target), alias)) as scratch:
                yield scratch
        return
    conf = _db_settings(alias)
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    with _pg_admin(conf) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        proc = _run(
            ["pg_restore", "--no-owner", "--exit-on-error", "-d", name, *_pg_args(conf), str(path)],
            env=_pg_env(conf),
        )
        if proc.returncode != 0:
            raise BackupRefused(f"backup does not restore into a scratch database: {_stderr(proc)}")
        with _alias_for(_scratch_settings(name, alias)) as scratch:
            yield scratch
    finally:
        with _pg_admin(conf) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def integrity_check(alias: str = "default") -> IntegrityReport:
    """Engine check, migrations table, every table readable, audit chain intact."""
    report = IntegrityReport(ok=True)
    conn = connections[alias]
    try:
        _engine_check(conn, report)
        tables = set(conn.introspection.table_names())
        _tables_check(conn, tables, report)
        _migrations_check(conn, tables, report)
        with _snapshot(alias):
            _audit_check(alias, tables, report)
    except Exception as exc:  # noqa: BLE001 - any failure to read is an integrity problem
        report.problems.append(f"{type(exc).__name__}: {str(exc)[:300]}")
    report.ok = not report.problems
    return report


@contextlib.contextmanager
def _snapshot(alias: str) -> Iterator[None]:
    """One read snapshot for the audit check: the events and the head are compared as of
    one moment, not with a write of another session committed between the two reads."""
    conn = connections[alias]
    if conn.in_atomic_block:  # the caller's transaction decides
        yield
        return
    with transaction.atomic(using=alias):
        if conn.vendor == "postgresql":
            with conn.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


def _engine_check(conn: Any, report: IntegrityReport) -> None:
    if conn.vendor != "sqlite":
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        return
    with conn.cursor() as cursor:
        cursor.execute("PRAGMA integrity_check")
        rows = [r[0] for r in cursor.fetchall()]
    if rows != ["ok"]:
        report.problems.append(f"PRAGMA integrity_check: {'; '.join(rows[:5])}")


def _tables_check(conn: Any, tables: set[str], report: IntegrityReport) -> None:
    expected = {m._meta.db_table for m in apps.get_models() if m._meta.managed}
    missing = sorted(expected - tables)
    if missing:
        report.notes.append(f"{len(missing)} table(s) not in the backup: {', '.join(missing[:8])}")
    with conn.cursor() as cursor:
        for table in sorted(tables & expected):
            cursor.execute(f"SELECT COUNT(*) FROM {conn.ops.quote_name(table)}")
            report.rows += int(cursor.fetchone()[0])
            report.tables += 1


def _migrations_check(conn: Any, tables: set[str], report: IntegrityReport) -> None:
    if "django_migrations" not in tables:
        report.problems.append("django_migrations table is missing")
        return
    loader = MigrationLoader(conn, ignore_no_migrations=True)
    if not loader.applied_migrations:
        report.problems.append("no migration is recorded as applied")
        return
    pending = sorted(set(loader.disk_migrations) - set(loader.applied_migrations))
    if pending:
        report.notes.append(
            f"{len(pending)} migration(s) to apply before restart, e.g. {pending[0][0]}.{pending[0][1]}"
        )


def _audit_check(alias: str, tables: set[str], report: IntegrityReport) -> None:
    from audit.models import AuditChainHead, AuditEvent

    if AuditEvent._meta.db_table not in tables:
        report.problems.append("the audit table is missing")
        return
    events = AuditEvent.objects.using(alias).order_by("seq").iterator(2000)
    broken = audit_verify(events)
    if broken is not None:
        report.problems.append(f"audit chain broken at seq {broken.seq}: {broken.reason}")
    head = AuditChainHead.objects.using(alias).filter(id=1).first()
    last = AuditEvent.objects.using(alias).order_by("-seq").values_list("seq", "hash").first()
    last_seq, last_hash = last or (0, GENESIS)
    if problem := head_problem(head, last_seq, last_hash):
        report.problems.append(f"audit {problem}")
    report.audit_seq = int(last_seq)


def _resolve(backup: Backup | None, path: str | Path | None) -> tuple[Path, Backup | None]:
    if backup is not None:
        return Path(backup.path), backup
    if path is None:
        raise BackupRefused("no backup given")
    return Path(path), Backup.objects.filter(path=str(path)).first()


Probe = Callable[[str], list[str]]


def backup_check(
    *,
    backup: Backup | None = None,
    path: str | Path | None = None,
    restore_check: bool = True,
    probe: Probe | None = None,
) -> VerifyResult:
    """Verify without writing anything. Never raises BackupRefused: the result says why.
    `probe(alias)` may add problems found in the scratch restore (e.g. a missing row)."""
    try:
        file_path, row = _resolve(backup, path)
    except BackupRefused as refused:
        return VerifyResult(False, refused.reason, str(path or ""))
    engine = current_engine()
    try:
        meta = _check_file(file_path, engine, row)
        if not restore_check:
            return VerifyResult(True, "checksum ok", str(file_path), engine, meta["sha256"])
        with _scratch_database(file_path, engine, "default") as scratch:
            report = integrity_check(scratch)
            if probe is not None:
                report.problems.extend(probe(scratch))
                report.ok = not report.problems
    except (BackupRefused, BackupError) as exc:
        return VerifyResult(False, getattr(exc, "reason", str(exc)), str(file_path), engine)
    reason = "restores into a scratch database and passes the integrity check"
    if not report.ok:
        reason = "scratch restore fails the integrity check: " + "; ".join(report.problems)
    return VerifyResult(report.ok, reason, str(file_path), engine, meta["sha256"], report)


def backup_verify(
    *, backup: Backup | None = None, path: str | Path | None = None, actor: Any
) -> VerifyResult:
    """backup_check, then record the outcome on the row (if any) with an audit record."""
    result = backup_check(backup=backup, path=path)
    row = backup if backup is not None else _find_row(path)
    with transaction.atomic():
        if row is not None:
            Backup.objects.filter(pk=row.pk).update(
                verified_at=timezone.now(), verified_ok=result.ok
            )
        audit_record(
            action="backup.verified",
            actor=actor,
            target=row,
            target_type="" if row is not None else "backup.file",
            target_id="" if row is not None else Path(result.path).name,
            payload={"ok": result.ok, "reason": result.reason[:300]},
        )
    return result


def _find_row(path: str | Path | None) -> Backup | None:
    return Backup.objects.filter(path=str(path)).first() if path else None


# --------------------------------------------------------------------------- restore


@dataclass
class RestoreResult:
    path: str
    engine: str
    verify: VerifyResult
    integrity: IntegrityReport
    registered_backups: int
    audit_export: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": Path(self.path).name,
            "engine": self.engine,
            "sha256": self.verify.sha256,
            "integrity": self.integrity.as_dict(),
            "registered_backups": self.registered_backups,
            "audit_export": self.audit_export,
        }


def export_audit_after(seq: int) -> dict[str, Any]:
    """Write the audit events after `seq` (those the restore will drop) to a JSON-lines file
    next to the backups, so the trail stays complete; returns its name, sha256 and count."""
    from audit.models import AuditEvent

    events = AuditEvent.objects.filter(seq__gt=seq).order_by("seq")
    path = backup_dir() / f"audit-after-seq{seq}-{timezone.now():%Y%m%dT%H%M%S%f}.jsonl"
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for event in events.values().iterator(2000):
            fh.write(json.dumps(event, default=str, sort_keys=True) + "\n")
            count += 1
    return {"file": path.name, "sha256": sha256_file(path), "events": count, "after_seq": seq}


def _restore_sqlite(path: Path, alias: str) -> None:
    connections[alias].close()
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    dest = sqlite3.connect(str(_db_settings(alias)["NAME"]), timeout=30)
    try:
        source.backup(dest)
    finally:
        dest.close()
        source.close()


RESTORE_ATTEMPTS = 3
_LOCK_CONFLICTS = ("deadlock detected", "lock timeout")


def _restore_postgresql(path: Path, alias: str) -> None:
    """pg_restore in one transaction. Other sessions (web, workers) may go on writing
    meanwhile; a deadlock with one of them rolls the restore back whole (nothing changed),
    so it is tried again."""
    conf = _db_settings(alias)
    connections[alias].close()
    argv = [
        "pg_restore",
        "--clean",
        "--if-exists",
        "--no-owner",
        "--single-transaction",
        "--exit-on-error",
        "-d",
        str(conf["NAME"]),
        *_pg_args(conf),
        str(path),
    ]
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        proc = _run(argv, env=_pg_env(conf))
        if proc.returncode == 0:
            return
        error = _stderr(proc)
        if attempt == RESTORE_ATTEMPTS or not any(c in error for c in _LOCK_CONFLICTS):
            raise BackupError(f"pg_restore failed, nothing changed: {error}")
        time.sleep(0.5 * attempt)


def backup_restore_file(
    *, backup: Backup | None = None, path: str | Path | None = None, probe: Probe | None = None
) -> RestoreResult:
    """Verify (refusing with the reason), overwrite the live database, check its integrity
    and re-register the backups whose rows the restored database lacks. No audit record:
    the caller writes it into the restored database (restore_db, rollback_restore)."""
    verify = backup_check(backup=backup, path=path, probe=probe)
    if not verify.ok:
        raise BackupRefused(verify.reason)
    file_path = Path(verify.path)
    assert verify.integrity is not None
    exported = export_audit_after(verify.integrity.audit_seq)
    if verify.engine == "sqlite":
        _restore_sqlite(file_path, "default")
    else:
        _restore_postgresql(file_path, "default")
    integrity = integrity_check("default")
    registered = backups_sync()
    return RestoreResult(str(file_path), verify.engine, verify, integrity, registered, exported)


def backups_sync() -> int:
    """Create the Backup rows missing for sidecars on disk (after a restore). Returns how many."""
    known = set(Backup.objects.values_list("path", flat=True))
    created = 0
    for side in sorted(backup_dir().glob("db-*.json")):
        path = side.with_name(side.name.removesuffix(".json"))
        if str(path) in known or not path.exists():
            continue
        try:
            meta = json.loads(side.read_text())
            Backup.objects.create(
                created_at=datetime.fromisoformat(meta["created_at"]),
                engine=meta["engine"],
                path=str(path),
                size_bytes=int(meta["size_bytes"]),
                sha256=meta["sha256"],
                note=str(meta.get("note", ""))[:200],
            )
            created += 1
        except (OSError, ValueError, KeyError):
            continue
    return created


def retention_apply(*, keep: int) -> list[str]:
    """Keep the newest `keep` backups of this engine (files, sidecars, rows); remove older."""
    engine = current_engine()
    files = sorted(backup_dir().glob(f"db-{engine}-*.json"), key=lambda p: p.name, reverse=True)
    removed = []
    for side in files[max(keep, 1) :]:
        path = side.with_name(side.name.removesuffix(".json"))
        for victim in (path, side):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
        Backup.objects.filter(path=str(path)).delete()
        removed.append(path.name)
    if removed:
        audit_record(action="backup.pruned", actor="retention", payload={"files": removed})
    return removed


def latest_backup(max_age: timedelta | None = None) -> Backup | None:
    qs = Backup.objects.filter(engine=current_engine()).order_by("-created_at")
    if max_age is not None:
        qs = qs.filter(created_at__gte=timezone.now() - max_age)
    return qs.first()
