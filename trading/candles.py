"""Validation of incoming candles. Pure: no ORM."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .timeframes import timeframe_ms

KEY_FIELDS = ("exchange", "symbol", "timeframe", "open_time_ms")
PRICE_FIELDS = ("open", "high", "low", "close")
REQUIRED = (*KEY_FIELDS, *PRICE_FIELDS, "volume")
BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True)
class FieldError:
    index: int
    field: str
    message: str

    def as_dict(self) -> dict:
        return {"index": self.index, "field": self.field, "message": self.message}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def _text(value: Any, limit: int = 40) -> str | None:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        return None
    return value.strip()


def storable(text: str) -> bool:
    """Text a database can store: no NUL (PostgreSQL refuses it) and no lone surrogate
    (not encodable as UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_error(text: str | None) -> str | None:
    if text is None:
        return "must be a non-empty string of <= 40 chars"
    if not storable(text):
        return "must not contain NUL characters or lone surrogates"
    return None


def _key_errors(index: int, raw: dict, clean: dict, timeframes: Sequence[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    for field in ("exchange", "symbol"):
        clean[field] = _text(raw.get(field))
        message = _name_error(clean[field])
        if message is not None:
            errors.append(FieldError(index, field, message))
    timeframe = raw.get("timeframe")
    if timeframe not in timeframes:
        errors.append(
            FieldError(
                index, "timeframe", f"unknown timeframe {timeframe!r}; one of {list(timeframes)}"
            )
        )
    clean["timeframe"] = timeframe
    open_time = raw.get("open_time_ms")
    if isinstance(open_time, bool) or not isinstance(open_time, int) or open_time < 0:
        errors.append(FieldError(index, "open_time_ms", "must be a non-negative integer (ms)"))
    elif timeframe in timeframes and open_time + timeframe_ms(timeframe) - 1 > BIGINT_MAX:
        errors.append(
            FieldError(
                index,
                "open_time_ms",
                f"too large: the candle must close by {BIGINT_MAX} ms (a 64-bit integer)",
            )
        )
    elif open_time > BIGINT_MAX:
        errors.append(FieldError(index, "open_time_ms", f"must be at most {BIGINT_MAX} (ms)"))
    clean["open_time_ms"] = open_time
    return errors


def _value_errors(index: int, raw: dict, clean: dict) -> list[FieldError]:
    errors: list[FieldError] = []
    for field in (*PRICE_FIELDS, "volume"):
        value = _number(raw.get(field))
        if value is None:
            errors.append(FieldError(index, field, "must be a finite number"))
        elif field != "volume" and value <= 0:
            errors.append(FieldError(index, field, "must be positive"))
        elif field == "volume" and value < 0:
            errors.append(FieldError(index, field, "must not be negative"))
        clean[field] = value
    if errors:
        return errors
    if clean["high"] < clean["low"]:
        errors.append(FieldError(index, "high", "high is below low"))
        return errors
    for field in ("open", "close"):
        if not clean["low"] <= clean[field] <= clean["high"]:
            errors.append(FieldError(index, field, f"{field} is outside [low, high]"))
    return errors


def validate_candle(
    index: int, raw: Any, timeframes: Sequence[str]
) -> tuple[dict, list[FieldError]]:
    """Return the cleaned candle and its errors (empty when valid)."""
    if not isinstance(raw, dict):
        return {}, [FieldError(index, "", "each candle must be a JSON object")]
    missing = [f for f in REQUIRED if f not in raw]
    if missing:
        return {}, [FieldError(index, f, "this field is required") for f in missing]
    unknown = sorted(set(raw) - set(REQUIRED))
    if unknown:
        return {}, [FieldError(index, f, "unknown field") for f in unknown]
    clean: dict = {}
    errors = _key_errors(index, raw, clean, timeframes)
    errors += _value_errors(index, raw, clean)
    if not errors:
        clean["close_time_ms"] = clean["open_time_ms"] + timeframe_ms(clean["timeframe"]) - 1
    return clean, errors


def validate_batch(
    items: Any, timeframes: Sequence[str], max_items: int
) -> tuple[list[dict], list[FieldError]]:
    if not isinstance(items, list):
        return [], [FieldError(-1, "candles", "expected a JSON array of candles")]
    if not items:
        return [], [FieldError(-1, "candles", "the batch is empty")]
    if len(items) > max_items:
        return [], [
            FieldError(-1, "candles", f"{len(items)} candles in one batch; at most {max_items}")
        ]
    cleaned: list[dict] = []
    errors: list[FieldError] = []
    seen: dict[tuple, int] = {}
    for index, raw in enumerate(items):
        clean, item_errors = validate_candle(index, raw, timeframes)
        errors += item_errors
        if item_errors:
            continue
        key = tuple(clean[f] for f in KEY_FIELDS)
        if key in seen:
            errors.append(
                FieldError(
                    index, "open_time_ms", f"same candle key as item {seen[key]} in this batch"
                )
            )
            continue
        seen[key] = index
        cleaned.append(clean)
    return cleaned, errors


def candle_key(data: dict) -> tuple:
    return tuple(data[f] for f in KEY_FIELDS)
