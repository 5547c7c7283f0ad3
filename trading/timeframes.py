UNIT_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def timeframe_ms(timeframe: str) -> int:
    """'5m' -> 300000. Raises ValueError for an unknown timeframe."""
    try:
        return int(timeframe[:-1]) * UNIT_MS[timeframe[-1]]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"unknown timeframe {timeframe!r}") from None
