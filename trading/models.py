from django.db import models


class Candle(models.Model):
    """A closed candle of one market stream (exchange, symbol, timeframe)."""

    exchange = models.CharField(max_length=40)
    symbol = models.CharField(max_length=40)
    timeframe = models.CharField(max_length=8)
    open_time_ms = models.BigIntegerField()
    close_time_ms = models.BigIntegerField()
    open = models.FloatField()
    high = models.FloatField()
    low = models.FloatField()
    close = models.FloatField()
    volume = models.FloatField()
    source = models.CharField(max_length=20, default="api")
    ingested_at = models.DateTimeField()
    processed_at = models.DateTimeField(null=True, blank=True)
    late = models.BooleanField(default=False, help_text="Arrived after a newer candle")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["exchange", "symbol", "timeframe", "open_time_ms"], name="uniq_candle"
            )
        ]
        indexes = [
            models.Index(fields=["exchange", "symbol", "timeframe", "-open_time_ms"]),
            # The candles waiting for the alerts pipeline (alerts.services.pending_streams):
            # a handful at any time, however long the history.
            models.Index(
                fields=["exchange", "symbol", "timeframe"],
                condition=models.Q(processed_at__isnull=True, late=False),
                name="candle_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}:{self.timeframe}@{self.open_time_ms}"

    VALUE_FIELDS = ("open", "high", "low", "close", "volume")

    def same_values(self, data: dict) -> bool:
        return all(getattr(self, f) == data[f] for f in self.VALUE_FIELDS)


class MarketStream(models.Model):
    """Freshness of one market stream: feeds the 'stream silent' watchdog."""

    exchange = models.CharField(max_length=40)
    symbol = models.CharField(max_length=40)
    timeframe = models.CharField(max_length=8)
    last_open_time_ms = models.BigIntegerField(default=0)
    last_received_at = models.DateTimeField(null=True, blank=True)
    candles_received = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["exchange", "symbol", "timeframe"], name="uniq_market_stream"
            )
        ]

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}:{self.timeframe}"


class KillSwitch(models.TextChoices):
    ACTIVE = "ACTIVE"
    REDUCING = "REDUCING"
    HALTED = "HALTED"


class Deployment(models.Model):
    """A strategy deployed on an exchange account: what the canary rolls out.

    `allocation` is the fraction of full order size currently allowed (0 when halted);
    `kill_switch` mirrors the authoritative flag held in Redis (canary.killswitch).
    """

    name = models.CharField(max_length=80, unique=True)
    exchange = models.CharField(max_length=40, default="paper")
    symbols = models.JSONField(default=list, help_text='e.g. ["ETH/BTC", "LTC/BTC"]')
    timeframe = models.CharField(max_length=8, default="5m")
    params = models.JSONField(default=dict, blank=True, help_text="signal parameters")
    full_order_notional = models.FloatField(help_text="full order size, in quote currency")
    allocation = models.FloatField(default=0.0)
    kill_switch = models.CharField(
        max_length=10, choices=KillSwitch.choices, default=KillSwitch.HALTED
    )
    starting_cash = models.FloatField(default=0.0)
    cash = models.FloatField(default=0.0)
    quote_currency = models.CharField(max_length=10, default="BTC")
    signals_enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name


class Signal(models.Model):
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="signals")
    candle = models.ForeignKey(Candle, null=True, blank=True, on_delete=models.PROTECT)
    symbol = models.CharField(max_length=40)
    side = models.CharField(max_length=4)
    entry = models.FloatField()
    stop = models.FloatField()
    target = models.FloatField()
    reward_risk = models.FloatField()
    score = models.PositiveSmallIntegerField()
    factors = models.JSONField(default=dict)
    ts_ms = models.BigIntegerField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["deployment", "candle"], name="uniq_signal_per_candle")
        ]

    def __str__(self) -> str:
        return f"{self.side} {self.symbol} score {self.score}"


class OrderStatus(models.TextChoices):
    PENDING = "PENDING", "persisted, not yet acknowledged"
    OPEN = "OPEN"
    PARTIAL = "PARTIAL"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED", "refused by us or the exchange"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN", "outcome could not be determined"


class Order(models.Model):
    """One order, persisted with its client order id before it is sent."""

    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="orders")
    signal = models.ForeignKey(Signal, null=True, blank=True, on_delete=models.PROTECT)
    client_order_id = models.CharField(max_length=36, unique=True)
    exchange_order_id = models.CharField(max_length=64, blank=True)
    purpose = models.CharField(max_length=12, default="entry", help_text="entry | exit | flatten")
    symbol = models.CharField(max_length=40)
    side = models.CharField(max_length=4)
    type = models.CharField(max_length=10, default="market")
    reduce_only = models.BooleanField(default=False)
    allocation = models.FloatField(default=0.0)
    requested_qty = models.FloatField()
    filled_qty = models.FloatField(default=0.0)
    reference_price = models.FloatField(null=True, blank=True)
    avg_fill_price = models.FloatField(null=True, blank=True)
    slippage_bps = models.FloatField(
        null=True, blank=True, help_text="signed: positive = against us"
    )
    fee = models.FloatField(default=0.0)
    status = models.CharField(
        max_length=10, choices=OrderStatus.choices, default=OrderStatus.PENDING
    )
    error = models.CharField(max_length=300, blank=True)
    critical = models.BooleanField(default=False)
    created_at = models.DateTimeField(db_index=True)
    submitted_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["deployment", "submitted_at"])]

    def __str__(self) -> str:
        return f"{self.side} {self.requested_qty} {self.symbol} [{self.status}]"


class Fill(models.Model):
    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="fills")
    qty = models.FloatField()
    price = models.FloatField()
    fee = models.FloatField(default=0.0)
    ts = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.qty} @ {self.price}"


class Position(models.Model):
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="positions")
    symbol = models.CharField(max_length=40)
    qty = models.FloatField(default=0.0, help_text="signed base quantity")
    avg_entry = models.FloatField(default=0.0)
    realised_pnl = models.FloatField(default=0.0)
    last_price = models.FloatField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["deployment", "symbol"], name="uniq_position")
        ]

    def __str__(self) -> str:
        return f"{self.symbol} {self.qty}"

    @property
    def unrealised_pnl(self) -> float:
        if not self.qty or self.last_price is None:
            return 0.0
        return (self.last_price - self.avg_entry) * self.qty


class EquitySnapshot(models.Model):
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, related_name="equity")
    ts = models.DateTimeField(db_index=True)
    cash = models.FloatField()
    positions_value = models.FloatField()
    equity = models.FloatField()
    peak = models.FloatField()
    drawdown_pct = models.FloatField(help_text="<= 0")

    class Meta:
        indexes = [models.Index(fields=["deployment", "ts"])]

    def __str__(self) -> str:
        return f"{self.ts:%Y-%m-%d %H:%M:%S} equity {self.equity}"


class ReconciliationReport(models.Model):
    deployment = models.ForeignKey(
        Deployment, on_delete=models.PROTECT, related_name="reconciliations"
    )
    created_at = models.DateTimeField()
    ok = models.BooleanField()
    differences = models.JSONField(default=list)

    def __str__(self) -> str:
        return f"reconciliation {self.created_at:%Y-%m-%d %H:%M} {'ok' if self.ok else 'DIFF'}"
