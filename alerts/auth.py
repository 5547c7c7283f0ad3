"""WebSocket authentication by API token in the Authorization header (non-browser
clients); browsers use their session cookie through Channels' AuthMiddlewareStack."""

from channels.db import database_sync_to_async
from django.contrib.auth.models import AnonymousUser


@database_sync_to_async
def _user_for_token(key: str):
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return AnonymousUser()
    return token.user


def token_key(scope: dict) -> str | None:
    """The API token of an ``Authorization: Token <key>`` header, if any."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin1")
    if auth.lower().startswith("token "):
        return auth.split(None, 1)[1].strip()
    return None


class TokenAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        key = token_key(scope)
        if key is not None:
            scope = dict(scope, user=await _user_for_token(key))
        return await self.inner(scope, receive, send)
