import gc
import os

from config.asgi_handler import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from alerts.auth import TokenAuthMiddleware  # noqa: E402
from alerts.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
        ),
    }
)


def tune_gc(gen0: int) -> bool:
    """The collector of a web server process once its application is built (WEB_GC_GEN0):
    what exists now lives as long as the process and is frozen out of the collections;
    young collections every ``gen0`` allocations. False (untouched) for 0."""
    if gen0 <= 0:
        return False
    gc.freeze()
    gc.set_threshold(gen0, *gc.get_threshold()[1:])
    return True


tune_gc(settings.WEB_GC_GEN0)
