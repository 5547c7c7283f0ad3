"""Django's HTTP side under the ASGI server, with its middleware run synchronously.

Django's own ASGIHandler builds an async middleware chain: each sync-only step (every
middleware's process_request and process_response, the view) then runs in the request's
thread through a sync_to_async hand-over of its own, some seventeen per request, each a
round trip between the event loop and that thread. The views and middleware here are all
synchronous, so this handler builds the synchronous chain and hands the request over once.
The request's thread is the same (thread-sensitive), so its database connection is too.
"""

from __future__ import annotations

import django
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase


class SyncChainASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)


def get_asgi_application() -> SyncChainASGIHandler:
    """As django.core.asgi.get_asgi_application, with the synchronous chain."""
    django.setup(set_prefix=False)
    return SyncChainASGIHandler()
