from rest_framework import status
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.views import APIView

from audit.permissions import requires

from .services import CandleBatchInvalid, CandleConflict, candles_ingest


class LenientJSONParser(JSONParser):
    """Lets NaN/Infinity literals through parsing so validation can name the item."""

    strict = False


class CandleIngestView(APIView):
    """POST a batch of closed candles: a JSON array, or {"candles": [...]}."""

    parser_classes = [LenientJSONParser]
    permission_classes = [requires("audit.ingest_candles")]

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
