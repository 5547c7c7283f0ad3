"""URLs of the audit trail API, under /api/v1/."""

from django.urls import path

from . import api

urlpatterns = [
    path("audit/events/", api.AuditEventListView.as_view(), name="audit-events"),
    path("audit/export", api.AuditExportView.as_view(), name="audit-export"),
    path("audit/verify", api.AuditVerifyView.as_view(), name="audit-verify"),
]
