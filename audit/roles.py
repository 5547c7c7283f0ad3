"""The role/permission matrix (mirrored in the README)."""

ROLE_PERMISSIONS: dict[str, list[str]] = {
    "Alpha": ["approve_alpha", "trigger_rollback", "handle_alerts", "view_desk"],
    "Planner": [
        "approve_planner",
        "promote_rollout",
        "pause_rollout",
        "trigger_rollback",
        "manage_rules",
        "handle_alerts",
        "view_desk",
    ],
    "Ops": [
        "promote_rollout",
        "pause_rollout",
        "trigger_rollback",
        "restore_database",
        "manage_rules",
        "ingest_candles",
        "handle_alerts",
        "view_desk",
    ],
    "Viewer": ["view_desk"],
}

PERMISSION_NAMES: dict[str, str] = {
    "approve_alpha": "Approve a go-live as Alpha trader",
    "approve_planner": "Approve a go-live as Planner",
    "promote_rollout": "Promote a canary phase",
    "pause_rollout": "Pause and resume a rollout",
    "trigger_rollback": "Trigger a rollback / halt trading",
    "restore_database": "Restore a database backup",
    "manage_rules": "Manage alert rules and gate thresholds",
    "handle_alerts": "Acknowledge and silence alerts",
    "view_desk": "View the desk: dashboard, reports, audit",
    "ingest_candles": "Post market candles to the ingestion API",
}


def ensure_roles(apps=None) -> None:
    """Create the role groups and their permissions (idempotent). `apps` is the
    migration state registry when called from a migration."""
    if apps is None:
        from django.apps import apps as global_apps

        apps = global_apps
    content_type_model = apps.get_model("contenttypes", "ContentType")
    permission_model = apps.get_model("auth", "Permission")
    group_model = apps.get_model("auth", "Group")
    apps.get_model("audit", "AuditChainHead").objects.get_or_create(id=1)
    ct, _ = content_type_model.objects.get_or_create(app_label="audit", model="controlpermission")
    for role, codenames in ROLE_PERMISSIONS.items():
        group, _ = group_model.objects.get_or_create(name=role)
        for codename in codenames:
            perm, _ = permission_model.objects.get_or_create(
                codename=codename, content_type=ct, defaults={"name": PERMISSION_NAMES[codename]}
            )
            group.permissions.add(perm)
