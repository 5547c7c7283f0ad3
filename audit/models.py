from django.conf import settings
from django.db import models

from .roles import PERMISSION_NAMES


class AuditEvent(models.Model):
    """One append-only, hash-chained record of something that happened.

    UPDATE and DELETE are rejected by database triggers (see migration 0002);
    `hash = sha256(prev_hash + canonical JSON of the event's own fields)`.
    """

    seq = models.BigIntegerField(unique=True, editable=False)
    created_at = models.DateTimeField(db_index=True, editable=False)
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,
    )
    actor = models.CharField(max_length=150, help_text="Username or system component")
    action = models.CharField(max_length=100, db_index=True)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=100, blank=True)
    payload = models.JSONField(default=dict)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["seq"]
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor}"


class AuditChainHead(models.Model):
    """A single row locked by every writer so the chain stays linear under concurrency.
    ``prev_hash`` is the hash before the last append: on PostgreSQL one UPDATE advances the
    head (seq, prev_hash, hash) and returns all three to the event's INSERT."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)
    prev_hash = models.CharField(max_length=64, default="0" * 64)

    def __str__(self) -> str:
        return f"audit chain head at #{self.seq}"


class ControlPermission(models.Model):
    """Holder of the product's permissions; no table."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = list(PERMISSION_NAMES.items())

    def __str__(self) -> str:
        return "control permissions"
