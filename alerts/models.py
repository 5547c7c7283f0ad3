from django.core.exceptions import ValidationError
from django.db import models

from .detectors import REGISTRY, DetectorConfigError
from .rules import RuleSpec, validate_rule


class Severity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


def _detector_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in sorted(REGISTRY)]


class AlertRule(models.Model):
    """Which detector runs on which streams, with what parameters and delivery rules.

    Blank symbol/timeframe is the wildcard; the most specific rule per detector wins.
    Without any rule, volatility (window 20, k 2.0) and engulfing run on every stream.
    """

    detector = models.CharField(max_length=40, choices=_detector_choices)
    params = models.JSONField(default=dict, blank=True)
    symbol = models.CharField(max_length=40, blank=True, help_text="Blank: every symbol")
    timeframe = models.CharField(max_length=8, blank=True, help_text="Blank: every timeframe")
    enabled = models.BooleanField(default=True)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.INFO)
    rate_limit_s = models.FloatField(
        null=True, blank=True, help_text="Seconds of event time per key; blank: the default"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["detector", "symbol", "timeframe"], name="uniq_alert_rule"
            )
        ]
        ordering = ["detector", "symbol", "timeframe"]

    def __str__(self) -> str:
        return f"{self.detector} on {self.symbol or '*'} {self.timeframe or '*'}"

    def as_spec(self) -> RuleSpec:
        return RuleSpec(
            detector=self.detector,
            params=dict(self.params or {}),
            symbol=self.symbol,
            timeframe=self.timeframe,
            enabled=self.enabled,
            severity=self.severity,
            rate_limit_s=self.rate_limit_s,
        )

    def clean(self) -> None:
        try:
            validate_rule(self.as_spec())
        except DetectorConfigError as err:
            field = err.field.split(".", 1)[0]
            raise ValidationError({field: f"{err.field}: {err.message}"}) from None


class Alert(models.Model):
    """A detection on a candle (or a raised event), its rule decision and latency stamps."""

    candle = models.ForeignKey(
        "trading.Candle", null=True, blank=True, on_delete=models.PROTECT, related_name="alerts"
    )
    source = models.CharField(max_length=40, default="detector")
    exchange = models.CharField(max_length=40, blank=True)
    symbol = models.CharField(max_length=40, blank=True)
    timeframe = models.CharField(max_length=8, blank=True)
    detector = models.CharField(max_length=40)
    direction = models.CharField(max_length=8, blank=True)
    value = models.FloatField(null=True, blank=True)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.INFO)
    message = models.CharField(max_length=300, blank=True)
    payload = models.JSONField(default=dict, blank=True)
    dedupe_key = models.CharField(max_length=200, unique=True)
    rate_key = models.CharField(max_length=200, blank=True)
    event_ms = models.BigIntegerField(default=0, help_text="Event time (candle open time), ms")
    suppressed = models.BooleanField(default=False)
    decision = models.CharField(max_length=20, default="deliver")
    suppressed_reason = models.CharField(max_length=200, blank=True)
    silence = models.ForeignKey(
        "alerts.Silence", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    candle_close_at = models.DateTimeField(null=True, blank=True)
    ingested_at = models.DateTimeField(null=True, blank=True)
    detected_at = models.DateTimeField(db_index=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-detected_at", "-id"]
        indexes = [
            models.Index(fields=["symbol", "detector", "-detected_at"]),
            models.Index(fields=["rate_key", "suppressed", "-event_ms"]),
        ]

    def __str__(self) -> str:
        return f"{self.detector} {self.direction} {self.symbol} {self.timeframe}"

    def as_message(self) -> dict:
        return {
            "id": self.pk,
            "source": self.source,
            "exchange": self.exchange,
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "detector": self.detector,
            "direction": self.direction,
            "value": self.value,
            "severity": self.severity,
            "message": self.message,
            "open_time_ms": self.event_ms if self.candle_id else None,
            "event_ms": self.event_ms,
            "candle_close_at": self.candle_close_at.isoformat() if self.candle_close_at else None,
            "detected_at": self.detected_at.isoformat(),
            "acknowledged": self.acknowledged_at is not None,
        }


class AlertComment(models.Model):
    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="comments")
    author = models.ForeignKey("auth.User", on_delete=models.PROTECT, related_name="+")
    text = models.TextField(max_length=2000)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"comment on alert {self.alert_id}"


class Silence(models.Model):
    """Suppresses alerts for a symbol and/or detector until it expires or is ended."""

    symbol = models.CharField(max_length=40, blank=True, help_text="Blank: every symbol")
    detector = models.CharField(max_length=40, blank=True, help_text="Blank: every detector")
    reason = models.CharField(max_length=300)
    author = models.ForeignKey("auth.User", on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    ended_by = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"silence {self.symbol or '*'}/{self.detector or '*'} until {self.expires_at}"


class AlertSubscription(models.Model):
    """A user's delivery choices. Without one, users of the Ops group get email."""

    user = models.OneToOneField(
        "auth.User", on_delete=models.CASCADE, related_name="alert_subscription"
    )
    email = models.BooleanField(default=True)
    symbols = models.JSONField(default=list, blank=True, help_text="Empty: every symbol")
    detectors = models.JSONField(default=list, blank=True, help_text="Empty: every detector")
    min_severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.INFO)

    def __str__(self) -> str:
        return f"alert subscription of {self.user}"

    def clean(self) -> None:
        from .rules import parse_filters

        try:
            parse_filters(
                {
                    "symbols": self.symbols,
                    "detectors": self.detectors,
                    "min_severity": self.min_severity,
                }
            )
        except ValueError as err:
            field, _, message = str(err).partition(": ")
            raise ValidationError({field: message}) from None


class Channel(models.TextChoices):
    WEBSOCKET = "websocket"
    EMAIL = "email"
    WEBHOOK = "webhook"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    OVERFLOW = "overflow"


class Delivery(models.Model):
    """One alert to one recipient over one channel."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    recipient = models.CharField(max_length=200)
    user = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    requeued_at = models.DateTimeField(
        null=True, blank=True, help_text="Last re-queued by the sweeper (its task was lost)"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["alert", "channel", "recipient"], name="uniq_delivery")
        ]
        indexes = [models.Index(fields=["channel", "status"])]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.channel} to {self.recipient}: {self.status}"


class DeliveryAttempt(models.Model):
    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="tries")
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ok = models.BooleanField()
    permanent = models.BooleanField(default=False)
    error = models.CharField(max_length=500, blank=True)
    latency_ms = models.FloatField()

    class Meta:
        ordering = ["delivery_id", "number"]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}"
