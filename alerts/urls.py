from django.urls import path

from . import api

urlpatterns = [
    path("alerts/", api.AlertListView.as_view(), name="alert-list"),
    path("alerts/<int:pk>/", api.AlertDetailView.as_view(), name="alert-detail"),
    path("alerts/<int:pk>/ack", api.AlertAckView.as_view(), name="alert-ack"),
    path("alerts/<int:pk>/comments", api.AlertCommentView.as_view(), name="alert-comment"),
    path("alerts/silences/", api.SilenceListView.as_view(), name="alert-silences"),
    path("alerts/silences/<int:pk>/end", api.SilenceEndView.as_view(), name="alert-unsilence"),
    path("alerts/rules/", api.RuleListView.as_view(), name="alert-rules"),
    path("alerts/rules/<int:pk>/", api.RuleDetailView.as_view(), name="alert-rule"),
    path("alerts/latency", api.LatencyView.as_view(), name="alert-latency"),
]
