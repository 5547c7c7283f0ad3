"""URLs of the desk, included at the root by config/urls.py."""

from functools import partial

from django.contrib.auth import views as auth_views
from django.contrib.staticfiles.views import serve as static_serve
from django.urls import path, re_path

from . import dashboard

urlpatterns = [
    path("", dashboard.dashboard, name="desk"),
    path("desk/state.json", dashboard.state_json, name="desk-state"),
    path("desk/halt", dashboard.desk_action, {"op": "halt"}, name="desk-halt"),
    path("desk/rollback", dashboard.desk_action, {"op": "rollback"}, name="desk-rollback"),
    re_path(
        r"^desk/reports/(?P<day>\d{4}-\d{2}-\d{2})/$", dashboard.report_html, name="desk-report"
    ),
    re_path(
        r"^desk/reports/(?P<day>\d{4}-\d{2}-\d{2})/chart\.png$",
        dashboard.report_chart,
        name="desk-report-chart",
    ),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="registration/login.html", redirect_authenticated_user=True
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # The project's own static files (no CDN, no build step), served by the ASGI app
    # through the staticfiles finders whether DEBUG is on or not.
    re_path(r"^static/(?P<path>.+)$", partial(static_serve, insecure=True)),
]
