from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from canary.views import health
from config.api import DeliveryListView
from trading.api import CandleIngestView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", health, name="health"),
    path("api/v1/market/candles", CandleIngestView.as_view(), name="candle-ingest"),
    path("api/v1/", include("alerts.urls")),
    path("api/v1/", include("canary.urls")),
    path("api/v1/", include("audit.urls")),
    path("api/v1/deliveries/", DeliveryListView.as_view(), name="delivery-list"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("canary.dashboard_urls")),
]

handler403 = "audit.permissions.forbidden_view"
handler404 = "config.api.not_found"
