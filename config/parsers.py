"""Request body parsers of the API (no view imports here: DRF loads this while defining
its views)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rest_framework import exceptions
from rest_framework.parsers import JSONParser

NUL = "\x00"


class NulFreeJSONParser(JSONParser):
    """JSON bodies; a NUL character anywhere (no database column can store it) is a
    parse error naming where it is."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        data = super().parse(stream, media_type, parser_context)
        where = nul_path(data)
        if where is not None:
            raise exceptions.ParseError(f"{where or 'body'}: NUL characters are not allowed")
        return data


def nul_path(value: Any, path: str = "") -> str | None:
    """Where the first NUL character in a JSON document is ("" for the top), or None."""
    if isinstance(value, str):
        return path if NUL in value else None
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for key, item in items:
        here = f"{path}.{key}" if path else str(key)
        if NUL in str(key):
            return here
        found = nul_path(item, here)
        if found is not None:
            return found
    return None
