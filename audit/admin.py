"""The audit trail in the admin: readable by desk viewers, writable by no one."""

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from .models import AuditEvent

VIEW_PERMISSION = "audit.view_desk"


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("seq", "created_at", "actor", "action", "target")
    list_filter = ("action", "actor")
    search_fields = ("actor", "action", "target_type", "target_id", "hash")
    date_hierarchy = "created_at"
    ordering = ("-seq",)
    actions = None
    fields = (
        "seq",
        "created_at",
        "actor",
        "actor_user",
        "action",
        "target_type",
        "target_id",
        "pretty_payload",
        "ip",
        "user_agent",
        "prev_hash",
        "hash",
    )
    readonly_fields = fields

    @admin.display(description="target")
    def target(self, event: AuditEvent) -> str:
        if not event.target_type:
            return "-"
        return f"{event.target_type}:{event.target_id}"

    @admin.display(description="payload")
    def pretty_payload(self, event: AuditEvent) -> str:
        return format_html("<pre>{}</pre>", json.dumps(event.payload, indent=2, sort_keys=True))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return super().has_module_permission(request) or request.user.has_perm(VIEW_PERMISSION)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm(VIEW_PERMISSION)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
