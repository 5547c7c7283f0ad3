"""URLs of the rollout lifecycle, pre-flight, rollback and backup API, under /api/v1/."""

from django.urls import path

from . import api

urlpatterns = [
    path("rollouts/", api.RolloutListView.as_view(), name="rollout-list"),
    path("rollouts/<int:pk>/", api.RolloutDetailView.as_view(), name="rollout-detail"),
    path("rollouts/<int:pk>/status", api.RolloutStatusView.as_view(), name="rollout-status"),
    path("rollouts/<int:pk>/export", api.RolloutExportView.as_view(), name="rollout-export"),
    path(
        "rollouts/<int:pk>/evaluations",
        api.EvaluationListView.as_view(),
        name="rollout-evaluations",
    ),
    path("rollouts/<int:pk>/approvals", api.ApprovalView.as_view(), name="rollout-approvals"),
    *(
        path(f"rollouts/<int:pk>/{op}", api.action_view(op), name=f"rollout-{op}")
        for op in api.ACTION_OPS
    ),
    path("preflight/", api.PreflightListView.as_view(), name="preflight-list"),
    path("preflight/<int:pk>/", api.PreflightDetailView.as_view(), name="preflight-detail"),
    path("rollbacks/", api.RollbackListView.as_view(), name="rollback-list"),
    path("rollbacks/<int:pk>/", api.RollbackDetailView.as_view(), name="rollback-detail"),
    path("rollbacks/<int:pk>/restore", api.RollbackRestoreView.as_view(), name="rollback-restore"),
    path("backups/", api.BackupListView.as_view(), name="backup-list"),
]
