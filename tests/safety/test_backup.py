"""Backups on the suite's own engine (SQLite locally, PostgreSQL in CI): made, verified,
restored with an integrity check; bad files refused before anything is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import call_command

from audit.models import AuditEvent
from audit.services import audit_record
from canary.backup import (
    BackupRefused,
    backup_create,
    backup_restore_file,
    retention_apply,
    sidecar_path,
)
from canary.models import Backup
from trading.models import Deployment

pytestmark = pytest.mark.django_db(transaction=True)


def test_backup_verifies_and_restores_the_data(make_deployment):
    kept = make_deployment()
    audit_record(action="test.before_backup", actor="test")
    backup = backup_create(actor="test", note="before")
    assert Path(backup.path).exists()
    side = json.loads(sidecar_path(Path(backup.path)).read_text())
    assert side["sha256"] == backup.sha256 and side["size_bytes"] == backup.size_bytes
    lost = make_deployment()
    result = backup_restore_file(backup=backup)
    assert result.verify.ok and result.verify.integrity.audit_seq >= 1, result.verify.reason
    assert result.integrity.ok, result.integrity.problems
    assert Deployment.objects.filter(pk=kept.pk).exists()
    assert not Deployment.objects.filter(pk=lost.pk).exists()
    assert Backup.objects.filter(path=backup.path).exists()


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_engine(path: Path) -> None:
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    meta["engine"] = "postgresql" if meta["engine"] == "sqlite" else "sqlite"
    side.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.unlink(), "missing"),
        (_truncate, "truncated"),
        (_corrupt, "checksum mismatch"),
        (_other_engine, "database; this database is"),
        (lambda p: sidecar_path(p).unlink(), "sidecar"),
    ],
    ids=["missing", "truncated", "corrupted", "other-engine", "no-sidecar"],
)
def test_bad_backup_is_refused_before_anything_is_overwritten(make_deployment, damage, reason):
    make_deployment()
    backup = backup_create(actor="test")
    damage(Path(backup.path))
    survivor = make_deployment()
    with pytest.raises(BackupRefused, match=reason):
        backup_restore_file(backup=backup)
    assert Deployment.objects.filter(pk=survivor.pk).exists()


def test_commands_backup_verify_restore(make_deployment, capsys):
    make_deployment()
    call_command("backup_db")
    backup = Backup.objects.latest("created_at")
    call_command("verify_backup", "--backup", str(backup.pk))
    assert "OK" in capsys.readouterr().out
    Backup.objects.filter(pk=backup.pk).update(sha256="0" * 64)
    with pytest.raises(SystemExit) as exit_info:
        call_command("verify_backup", "--backup", str(backup.pk))
    assert exit_info.value.code == 1


def test_retention_keeps_the_newest(make_deployment):
    made = [backup_create(actor="test") for _ in range(3)]
    removed = retention_apply(keep=2)
    assert removed == [Path(made[0].path).name]
    assert not Path(made[0].path).exists()
    assert Backup.objects.count() == 2


def test_restore_command_restores_or_refuses_with_the_reason(make_deployment, capsys):
    kept = make_deployment()
    backup = backup_create(actor="test")
    lost = make_deployment()
    call_command("restore_db", "--backup", str(backup.pk), "--reason", "drill")
    assert "integrity check passed" in capsys.readouterr().out
    assert Deployment.objects.filter(pk=kept.pk).exists()
    assert not Deployment.objects.filter(pk=lost.pk).exists()
    event = AuditEvent.objects.get(action="backup.restored")
    assert event.payload["reason"] == "drill" and event.payload["integrity"]["ok"]

    _corrupt(Path(backup.path))
    with pytest.raises(SystemExit) as exit_info:
        call_command("restore_db", "--backup", str(backup.pk))
    assert exit_info.value.code == 1
    assert "REFUSED: checksum mismatch" in capsys.readouterr().err
