"""Replay market CSVs as closed candles through the same ingestion as every other source."""

import csv
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from trading.models import MarketStream
from trading.services import CandleBatchInvalid, CandleConflict, candles_ingest

DEMO_FILES = ["ETH_BTC-5m.csv", "LTC_BTC-5m.csv"]
DATA_DIR = Path(settings.BASE_DIR) / "data" / "market"


def parse_name(path: Path) -> tuple[str, str]:
    """'ETH_BTC-5m.csv' -> ('ETH/BTC', '5m')."""
    stem, _, timeframe = path.stem.rpartition("-")
    if not stem or not timeframe:
        raise CommandError(f"{path.name}: expected a name like ETH_BTC-5m.csv")
    return stem.replace("_", "/"), timeframe


def read_rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def to_items(exchange: str, symbol: str, timeframe: str, rows: list[dict]) -> list[dict]:
    return [
        {
            "exchange": exchange,
            "symbol": symbol,
            "timeframe": timeframe,
            "open_time_ms": int(r["timestamp_ms"]),
            "open": float(r["open"]),
            "high": float(r["high"]),
            "low": float(r["low"]),
            "close": float(r["close"]),
            "volume": float(r["volume"]),
        }
        for r in rows
    ]


class Command(BaseCommand):
    help = (
        "Replay market CSVs (timestamp_ms,open,high,low,close,volume; named like "
        "ETH_BTC-5m.csv) as closed candles: stored, run through the alert detectors and the "
        "strategy of every deployment watching them (on the candle clock). --demo replays "
        "the bundled files paced in real time and creates the demo paper deployment first."
    )

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="*")
        parser.add_argument("--demo", action="store_true", help="replay the bundled demo files")
        parser.add_argument("--exchange", default="paper")
        parser.add_argument(
            "--pace",
            type=float,
            default=None,
            help="seconds between candles (default DEMO_PACE_S, or 0 without --demo)",
        )
        parser.add_argument("--batch", type=int, default=1, help="candles per ingestion")
        parser.add_argument("--limit", type=int, default=None, help="candles per file at most")

    def handle(self, *args, files, demo, exchange, pace, batch, limit, **options):
        paths = [Path(f) for f in files] + ([DATA_DIR / f for f in DEMO_FILES] if demo else [])
        if not paths:
            raise CommandError("give CSV files or --demo")
        if batch < 1:
            raise CommandError("--batch must be >= 1")
        if demo:
            call_command("trading_demo_setup", stdout=self.stdout, stderr=self.stderr)
        pace = pace if pace is not None else (settings.DEMO_PACE_S if demo else 0.0)
        streams = [self._stream(path, exchange, limit) for path in paths]
        step = 0
        while any(step < len(rows) for _, _, rows in streams):
            for symbol, timeframe, rows in streams:
                chunk = rows[step : step + batch]
                if chunk:
                    self._ingest(exchange, symbol, timeframe, chunk)
            step += batch
            if pace:
                time.sleep(pace)
        self.stdout.write("replay finished")

    def _stream(self, path: Path, exchange: str, limit: int | None):
        if not path.exists():
            raise CommandError(f"{path}: no such file")
        symbol, timeframe = parse_name(path)
        last = (
            MarketStream.objects.filter(exchange=exchange, symbol=symbol, timeframe=timeframe)
            .values_list("last_open_time_ms", flat=True)
            .first()
            or -1
        )
        rows = read_rows(path)[:limit] if limit is not None else read_rows(path)
        return symbol, timeframe, [r for r in rows if int(r["timestamp_ms"]) > last]

    def _ingest(self, exchange, symbol, timeframe, rows):
        items = to_items(exchange, symbol, timeframe, rows)
        try:
            candles_ingest(items=items, actor="replay", source="replay")
        except (CandleBatchInvalid, CandleConflict) as exc:
            self.stderr.write(f"{symbol} {timeframe}: {exc}")
