"""What the benchmarks share: Django set-up, a throwaway migrated database, the table."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DEBUG", "true")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()


@contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """A migrated throwaway database named `name` (a temp file on SQLite), dropped on
    exit. Yields the vendor name."""
    from django.db import connection
    from django.test.utils import setup_test_environment, teardown_test_environment

    setup_test_environment(debug=False)
    test_settings = connection.settings_dict.setdefault("TEST", {})
    saved = dict(test_settings)
    tmpdir = tempfile.TemporaryDirectory(prefix=f"{name}-")
    if connection.vendor == "sqlite":
        test_settings["NAME"] = str(Path(tmpdir.name) / f"{name}.sqlite3")
    else:
        test_settings["NAME"] = name
    old_name = connection.settings_dict["NAME"]
    try:
        connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        try:
            yield connection.vendor
        finally:
            connection.creation.destroy_test_db(old_name, verbosity=0)
    finally:
        test_settings.clear()
        test_settings.update(saved)
        tmpdir.cleanup()
        teardown_test_environment()


def format_table(rows: list[dict]) -> str:
    headers = ("figure", "value", "unit", "goal", "ok")
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)
