"""No secret in the logs of the whole test run (tests/faults/secrets_watch.py says what is
watched). The conftest runs this test last, after every other test of the session."""

from __future__ import annotations

from .harness import LOG_ROOT, ROOT


def test_no_secret_reaches_the_logs_of_this_run(secret_watch, tmp_path_factory):
    from tests.trading.binance_stub import API_KEY, API_SECRET

    secret_watch.add_settings()
    secret_watch.add(API_SECRET, "Binance stub secret")
    secret_watch.add(API_KEY, "Binance stub key")
    roots = [LOG_ROOT, tmp_path_factory.getbasetemp()]
    secret_watch.add_demo_credentials([*roots, ROOT / "var"])
    hits, files, records = secret_watch.scan(roots)
    kinds = sorted({kind for kind in secret_watch.secrets.values()})
    print(
        f"\nsecrets: {len(secret_watch.secrets)} watched ({', '.join(kinds)}); "
        f"{files} log files and {records} log records scanned "
        f"({secret_watch.dropped} records over the buffer cap)"
    )
    assert secret_watch.secrets and files + records > 0
    assert not hits, "\n".join(f"{h.kind} in {h.where}" for h in hits[:20])
