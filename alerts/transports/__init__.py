"""Delivery transports: one class per channel, a registry, errors that say whether a
retry can help. Transports do network I/O only; the delivery service records outcomes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


class TransportError(Exception):
    """A failed send. ``permanent`` means retrying cannot help (bad address, 4xx)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class Outgoing:
    """One delivery's content: the alert message and the recipient label."""

    delivery_id: int
    recipient: str
    alert: dict[str, Any]


class Transport(ABC):
    kind: ClassVar[str]
    queued: ClassVar[bool] = True
    """True: one Celery task per delivery. False: pushed in a batch after commit."""

    @abstractmethod
    def send(self, outgoing: Outgoing) -> None:
        """Deliver or raise TransportError."""


REGISTRY: dict[str, type[Transport]] = {}


def register(cls: type[Transport]) -> type[Transport]:
    REGISTRY[cls.kind] = cls
    return cls


def get_transport(kind: str) -> Transport:
    _load()
    try:
        return REGISTRY[kind]()
    except KeyError:
        raise TransportError(f"unknown channel {kind!r}", permanent=True) from None


def queued_kinds() -> list[str]:
    _load()
    return sorted(kind for kind, cls in REGISTRY.items() if cls.queued)


def _load() -> None:
    from . import email, webhook, websocket  # noqa: F401


def summary(alert: dict[str, Any]) -> str:
    """One line describing an alert, shared by the email subject and chat payloads."""
    where = " ".join(p for p in (alert.get("symbol"), alert.get("timeframe")) if p)
    what = " ".join(p for p in (alert.get("detector"), alert.get("direction")) if p)
    value = alert.get("value")
    shown = f" ({value:.3g})" if isinstance(value, int | float) else ""
    return f"[{str(alert.get('severity', '')).upper()}] {what} {where}{shown}".strip()
