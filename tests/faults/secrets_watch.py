"""Secrets must never reach the logs of a test run.

Installed when this directory's conftest is loaded (pytest_configure), so it watches the
whole session from collection on:

- the secrets: the SECRET_KEY, every setting and environment variable named like a secret
  (password, secret, token, api key, private key), the environment of every process a
  Stack starts (its JSON values too), every API token created (post_save of Token), every
  password set (User.set_password), the Binance stub's credentials and the passwords and
  tokens of demo-credentials.json files;
- the logs: every log record of this process (message and traceback, buffered up to a
  cap), and every log file (*.log, *.txt, *.out, *.err, or in a log folder; not databases,
  backups or journals) under var/test-logs/ and this session's temporary directory (the
  logs of the processes the tests start) written since the session began.

The scan runs in the test that the conftest moves to the very end of the session.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
MIN_LENGTH = 8
BUFFER_CAP = 64 * 2**20
LOG_SUFFIXES = {".log", ".txt", ".out", ".err"}
LOG_FOLDERS = {"log", "logs", "test-logs"}
DATA_SUFFIXES = {".sqlite3", ".json", ".jsonl", ".db", ".rdb", ".aof", ".gz", ".sql", ".dump"}


@dataclass(frozen=True)
class Hit:
    kind: str
    where: str


class _Buffer(logging.Handler):
    def __init__(self, watch: SecretWatch):
        super().__init__(level=logging.NOTSET)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # noqa: BLE001 - a broken record is not this handler's business
            return
        self.watch.keep(record.name, text)


@dataclass
class SecretWatch:
    root: Path
    started: float = field(default_factory=time.time)
    secrets: dict[str, str] = field(default_factory=dict)
    records: list[tuple[str, str]] = field(default_factory=list)
    buffered: int = 0
    dropped: int = 0

    # ------------------------------------------------------------ collecting secrets

    def add(self, value: Any, kind: str) -> None:
        if isinstance(value, str) and len(value.strip()) >= MIN_LENGTH:
            self.secrets.setdefault(value.strip(), kind)

    def add_named(self, items: Iterable[tuple[str, Any]], where: str) -> None:
        for name, value in items:
            if not SECRET_NAME.search(name):
                continue
            if isinstance(value, str) and value.lstrip().startswith("{"):
                try:
                    self.add_named(json.loads(value).items(), f"{where} {name}")
                    continue
                except ValueError:
                    pass
            self.add(value, f"{where} {name}")

    def add_settings(self) -> None:
        from django.conf import settings

        self.add(settings.SECRET_KEY, "SECRET_KEY")
        self.add_named(((n, getattr(settings, n)) for n in dir(settings) if n.isupper()), "setting")
        for alias, conf in settings.DATABASES.items():
            self.add(conf.get("PASSWORD"), f"DATABASES[{alias}] password")
        self.add_named(os.environ.items(), "environment")

    def add_demo_credentials(self, roots: Iterable[Path]) -> None:
        for root in roots:
            for path in root.rglob("demo-credentials.json"):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for user in data.values() if isinstance(data, dict) else []:
                    if isinstance(user, dict):
                        self.add_named(user.items(), "demo credentials")

    # ------------------------------------------------------------ collecting logs

    def keep(self, logger: str, text: str) -> None:
        if self.buffered + len(text) > BUFFER_CAP:
            self.dropped += 1
            return
        self.records.append((logger, text))
        self.buffered += len(text)

    def install(self) -> None:
        logging.getLogger().addHandler(_Buffer(self))
        self._hook_tokens_and_passwords()
        self._hook_stacks()

    def _hook_tokens_and_passwords(self) -> None:
        from django.contrib.auth import base_user, hashers
        from django.contrib.auth import models as auth_models
        from django.db.models.signals import post_save
        from rest_framework.authtoken.models import Token

        def token_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
            self.add(instance.key, "API token")

        post_save.connect(token_saved, sender=Token, weak=False)
        original = hashers.make_password

        def make_password(password: Any, *args: Any, **kwargs: Any) -> str:
            self.add(password, "password")
            return original(password, *args, **kwargs)

        # set_password and create_user both hash through make_password, imported by name
        for module in (hashers, base_user, auth_models):
            module.make_password = make_password  # type: ignore[attr-defined]

    def _hook_stacks(self) -> None:
        try:
            from stack import Stack
        except ImportError:
            return
        original = Stack.start

        def start(stack: Any, name: str, argv: Any, **kwargs: Any) -> Any:
            env = kwargs.get("env") or stack.env
            self.add_named(env.items(), f"env of {name}")
            return original(stack, name, argv, **kwargs)

        Stack.start = start  # type: ignore[method-assign]

    # ------------------------------------------------------------ scanning

    def files(self, roots: Iterable[Path]) -> Iterator[Path]:
        """Log files (by suffix, or in a log folder) under `roots`; not databases, backups
        or journals, which hold tokens by design."""
        for root in roots:
            if not root.exists():
                continue
            for path in root.rglob("*"):
                in_logs = any(part in LOG_FOLDERS for part in path.parts)
                if not path.is_file() or not (path.suffix in LOG_SUFFIXES or in_logs):
                    continue
                if path.suffix in DATA_SUFFIXES:
                    continue
                try:
                    if path.stat().st_mtime >= self.started - 1:
                        yield path
                except OSError:
                    continue

    def scan(self, roots: Iterable[Path]) -> tuple[list[Hit], int, int]:
        """Hits (what kind of secret, where), files scanned, records scanned."""
        hits: list[Hit] = []
        scanned = 0
        for path in self.files(roots):
            try:
                text = path.read_bytes().decode("utf-8", errors="replace")
            except OSError:
                continue
            scanned += 1
            shown = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            hits += self._find(text, str(shown))
        for n, (logger, text) in enumerate(self.records):
            hits += self._find(text, f"log record {n} of logger {logger!r}")
        return hits, scanned, len(self.records)

    def _find(self, text: str, where: str) -> list[Hit]:
        """Where each secret occurs (its kind and place, never the secret itself)."""
        found = []
        for secret, kind in self.secrets.items():
            at = text.find(secret)
            if at >= 0:
                line = text.count("\n", 0, at) + 1
                found.append(Hit(kind, f"{where}:{line}"))
        return found
