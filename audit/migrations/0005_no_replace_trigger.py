from django.db import migrations

from audit.triggers import install


def install_triggers(apps, schema_editor):
    """The SQLite trigger refusing an INSERT OR REPLACE onto an existing event (install is
    idempotent: the others exist already)."""
    install(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0004_auditchainhead_prev_hash"),
    ]

    operations = [
        migrations.RunPython(install_triggers, migrations.RunPython.noop),
    ]
