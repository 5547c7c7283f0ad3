from rest_framework import status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

from audit.permissions import requires

from .services import CandleBatchInvalid, CandleConflict, candles_ingest


class LenientJSONParser(JSONParser):
    """Lets NaN/Infinity literals through parsing so validation can name the item."""

    strict = False


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


class CandleIngestView(APIView):
    """POST a batch of closed candles: a JSON array, or {"candles": [...]}."""

    parser_classes = [LenientJSONParser]
    permission_classes = [requires("audit.ingest_candles")]
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
