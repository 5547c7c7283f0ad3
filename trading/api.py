from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.models import Exists, OuterRef
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import status
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from alerts.selectors import Prepared
from audit.permissions import requires

from .services import CandleBatchInvalid, CandleConflict, candles_ingest


class LenientJSONParser(JSONParser):
    """Lets NaN/Infinity literals through parsing so validation can name the item."""

    strict = False


INGEST = "audit.ingest_candles"


def _token_with_user(key: str):
    user_model = get_user_model()
    app_label, _, codename = INGEST.partition(".")
    perms = Permission.objects.filter(content_type__app_label=app_label, codename=codename)
    return Token.objects.filter(key=key).values_list(
        *(f.name for f in Token._meta.concrete_fields),
        *(f"user__{f.name}" for f in user_model._meta.concrete_fields),
        Exists(perms.filter(user=OuterRef("user")))
        | Exists(perms.filter(group__user=OuterRef("user"))),
    )


_TOKEN_WITH_USER = Prepared(_token_with_user, key=("sample-a", "sample-b"))


class IngestTokenAuthentication(TokenAuthentication):
    """DRF's token authentication, with the token, its user and whether the user holds the
    ingestion permission (directly or through a group) read as one row by SQL compiled once
    (the ORM builds and compiles its select_related query on every request, and the
    permission check would be a query of its own; a feed posts hundreds of times a second).
    The permission check (audit.permissions.holds) takes that answer. A missing token or
    inactive user goes through DRF's own check, which refuses it in its words."""

    def authenticate_credentials(self, key):
        rows = _TOKEN_WITH_USER.rows(key=key)
        if not rows:
            return super().authenticate_credentials(key)
        *row, granted = rows[0]
        split = len(Token._meta.concrete_fields)
        token = Token.from_db(
            "default", [f.attname for f in Token._meta.concrete_fields], row[:split]
        )
        user_model = get_user_model()
        token.user = user_model.from_db(
            "default", [f.attname for f in user_model._meta.concrete_fields], row[split:]
        )
        if not token.user.is_active:
            return super().authenticate_credentials(key)
        token.user.granted_permissions = {INGEST: bool(granted)}
        return token.user, token


class IngestTokenScheme(OpenApiAuthenticationExtension):
    """The ingestion endpoint's token in the OpenAPI schema: the same header and keyword
    as DRF's token scheme, under its own name (drf-spectacular gives each authentication
    class its own security scheme)."""

    target_class = IngestTokenAuthentication
    name = "ingestTokenAuth"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix=self.target.keyword
        )


class IngestRateThrottle(SimpleRateThrottle):
    """The "ingest" rate per person, counted in fixed windows (a counter per window, per
    process). A feed posts hundreds of times a second: the user throttle's sliding log would
    keep, copy and store a timestamp per request of the last minute on every request."""

    scope = "ingest"

    def get_cache_key(self, request, view):
        user = request.user
        ident = user.pk if user and user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def allow_request(self, request, view):
        if self.rate is None:
            return True
        self.now = self.timer()
        window = int(self.now // self.duration)
        key = f"{self.get_cache_key(request, view)}:{window}"
        try:
            count = self.cache.incr(key)
        except ValueError:  # the window's first request (or its counter expired)
            count = 1 if self.cache.add(key, 1, self.duration + 1) else self.cache.incr(key)
        return count <= self.num_requests

    def wait(self):
        return self.duration - self.now % self.duration


class JSONAnswers(DefaultContentNegotiation):
    """Answers in JSON whatever the Accept header says (HTTP lets a server disregard it):
    a feed's endpoint has one representation, and choosing it by parsing the header on
    every request cost several per cent of the web server's CPU per POST. The body is
    still parsed by the parser its Content-Type names (DRF's own choice)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class CandleIngestView(APIView):
    """POST a batch of closed candles: a JSON array, or {"candles": [...]}."""

    authentication_classes = [IngestTokenAuthentication, SessionAuthentication]
    parser_classes = [LenientJSONParser]
    renderer_classes = [JSONRenderer]  # a feed's endpoint: no browsable page to negotiate
    content_negotiation_class = JSONAnswers
    permission_classes = [requires(INGEST)]
    throttle_classes = [IngestRateThrottle]

    def post(self, request):
        body = request.data
        items = body.get("candles") if isinstance(body, dict) else body
        try:
            result = candles_ingest(items=items, actor=request.user, request=request)
        except CandleBatchInvalid as invalid:
            return Response(
                {
                    "error": "invalid candles; nothing was stored",
                    "errors": [e.as_dict() for e in invalid.errors],
                },
                status=status.HTTP_400_BAD_REQUEST,
            )
        except CandleConflict as conflict:
            return Response(
                {
                    "error": "candle key already stored with different values; nothing was stored",
                    "conflicts": conflict.conflicts,
                },
                status=status.HTTP_409_CONFLICT,
            )
        code = status.HTTP_201_CREATED if result.created_ids else status.HTTP_200_OK
        return Response(
            {
                "created": len(result.created_ids),
                "duplicates": result.duplicates,
                "late": len(result.late_ids),
                "ids": result.created_ids,
            },
            status=code,
        )
