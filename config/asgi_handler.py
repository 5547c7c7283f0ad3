"""Django's HTTP side under the ASGI server: a request handed to a thread once.

Django's own ASGIHandler builds an async middleware chain: each sync-only step (every
middleware's process_request and process_response, the view) then runs in the request's
thread through a sync_to_async hand-over of its own, some seventeen per request, each a
round trip between the event loop and that thread. The views and middleware here are all
synchronous, so this handler builds the synchronous chain.

It also hands each request over once: the request_started signal, the middleware chain and
the view, and the response's close (request_finished, which gives the database connection
back) run in one call on a thread of a kept pool (WEB_THREADS), instead of three hand-overs
to a thread started for that request (Django's per-request ThreadSensitiveContext) and two
tasks watching for a disconnect. A request's database connection is its thread's, taken
and given back within that one call. A streaming response is sent from that thread too,
so that an iterator reading the database reads it on the connection that opened it.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django
from asgiref.sync import SyncToAsync, async_to_sync
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import FileResponse, HttpResponseBase
from django.urls import set_script_prefix


class SyncChainASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self._threads = ThreadPoolExecutor(
            max_workers=settings.WEB_THREADS, thread_name_prefix="http"
        )

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        loop = asyncio.get_running_loop()
        try:
            # What sync_to_async(thread_sensitive=False, executor=...) does, less what this
            # one call does not need: its context is a copy (nothing set in the thread
            # comes back), and it is not cancelled (the server does not cancel it).
            response = await loop.run_in_executor(
                self._threads,
                contextvars.copy_context().run,
                self._respond,
                loop,
                scope,
                body_file,
                send,
            )
        finally:
            body_file.close()
        if response is not None:
            await self.send_response(response, send)

    def _respond(
        self, loop: asyncio.AbstractEventLoop, scope: dict, body_file: Any, send: Any
    ) -> HttpResponseBase | None:
        """In the request's thread: the response to send, closed already; None when it
        was streamed from here. async_to_sync called in it (a channel-layer send, the
        streamed response) runs on the server's event loop, as under sync_to_async."""
        SyncToAsync.threadlocal.main_event_loop = loop
        SyncToAsync.threadlocal.main_event_loop_pid = os.getpid()
        SyncToAsync.threadlocal.task_context = []
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
        if not response.streaming:
            response.close()
            return response
        try:
            async_to_sync(self.send_response)(response, send)
        finally:
            response.close()
        return None


def get_asgi_application() -> SyncChainASGIHandler:
    """As django.core.asgi.get_asgi_application, with the synchronous chain."""
    django.setup(set_prefix=False)
    return SyncChainASGIHandler()
