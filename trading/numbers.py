"""Numbers from outside (JSON bodies, files, the admin). Pure."""

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that a float holds and that is finite. JSON allows
    integers of any length; one beyond a float's range (``10**400``) makes
    ``math.isfinite`` and ``float()`` raise ``OverflowError`` instead of answering."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
