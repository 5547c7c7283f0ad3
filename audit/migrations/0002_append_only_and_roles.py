from django.db import migrations

from audit.roles import ensure_roles
from audit.triggers import install, uninstall


def create_roles(apps, schema_editor):
    ensure_roles(apps)


def install_triggers(apps, schema_editor):
    install(schema_editor.connection)


def uninstall_triggers(apps, schema_editor):
    uninstall(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(install_triggers, uninstall_triggers),
        migrations.RunPython(create_roles, migrations.RunPython.noop),
    ]
