from django.conf import settings
from django.db import models
from django.db.models import Q


class RolloutState(models.TextChoices):
    PENDING = "PENDING", "awaiting gate #1"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    LIVE = "LIVE"


class Rollout(models.Model):
    """Taking one deployment live in phases. `plan` is a list of phase specs
    ({allocation, min_duration_s, extension_s, needs_manual_promote}); `thresholds` is
    canary.engine.Thresholds.to_dict(). `config_version` increments whenever the plan,
    thresholds or the strategy parameters change: approvals of older versions are void."""

    deployment = models.ForeignKey(
        "trading.Deployment", on_delete=models.PROTECT, related_name="rollouts"
    )
    name = models.CharField(max_length=120)
    plan = models.JSONField()
    thresholds = models.JSONField(default=dict, blank=True)
    strategy_params = models.JSONField(default=dict, blank=True)
    config_version = models.PositiveIntegerField(default=1)
    state = models.CharField(
        max_length=14, choices=RolloutState.choices, default=RolloutState.PENDING
    )
    current_phase = models.PositiveSmallIntegerField(
        default=0, help_text="1-based; 0 before phase 1"
    )
    rehearsal = models.BooleanField(default=False)
    state_reason = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField()
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} [{self.state}]"


class Phase(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="phases")
    index = models.PositiveSmallIntegerField(help_text="1-based")
    allocation = models.FloatField()
    min_duration_s = models.PositiveIntegerField()
    extension_s = models.PositiveIntegerField()
    needs_manual_promote = models.BooleanField(default=False)
    started_at = models.DateTimeField(null=True, blank=True)
    ends_at = models.DateTimeField(
        null=True, blank=True, help_text="end of minimum duration + extensions"
    )
    ended_at = models.DateTimeField(null=True, blank=True)
    extensions = models.PositiveSmallIntegerField(default=0)
    consecutive_warnings = models.PositiveSmallIntegerField(default=0)
    outcome = models.CharField(max_length=14, blank=True)

    class Meta:
        ordering = ["rollout", "index"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "index"], name="uniq_phase_index")
        ]

    def __str__(self) -> str:
        return f"phase {self.index} ({self.allocation:.0%})"


class GateEvaluation(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="evaluations")
    phase = models.ForeignKey(
        Phase, null=True, on_delete=models.PROTECT, related_name="evaluations"
    )
    evaluated_at = models.DateTimeField(db_index=True)
    metrics = models.JSONField()
    verdict = models.CharField(max_length=14)
    reasons = models.JSONField(default=list)
    action = models.CharField(max_length=20, blank=True)

    class Meta:
        ordering = ["-evaluated_at", "-id"]

    def __str__(self) -> str:
        return f"{self.verdict} -> {self.action or 'none'}"


class ApprovalRole(models.TextChoices):
    ALPHA = "alpha", "Alpha trader"
    PLANNER = "planner", "Planner"


class Approval(models.Model):
    rollout = models.ForeignKey(Rollout, on_delete=models.PROTECT, related_name="approvals")
    role = models.CharField(max_length=10, choices=ApprovalRole.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    comment = models.TextField(blank=True)
    evidence = models.JSONField(default=dict, blank=True)
    config_version = models.PositiveIntegerField()
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.role} by {self.user}"


class PreflightRun(models.Model):
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField()
    decision = models.CharField(max_length=6, help_text="GO | NO-GO")
    checks = models.JSONField()
    report_path = models.CharField(max_length=300, blank=True)
    actor = models.CharField(max_length=150, default="system")

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.decision} at {self.started_at:%Y-%m-%d %H:%M:%S}"


class RollbackState(models.TextChoices):
    RUNNING = "RUNNING"
    STAGE1_DONE = "STAGE1_DONE", "flat; stage 2 pending"
    COMPLETED = "COMPLETED", "stages 1 and 2 done; halted"
    RESTORED = "RESTORED", "stage 3 done; ready for restart"
    FAILED = "FAILED"


class Rollback(models.Model):
    deployment = models.ForeignKey(
        "trading.Deployment", on_delete=models.PROTECT, related_name="rollbacks"
    )
    rollout = models.ForeignKey(
        Rollout, null=True, blank=True, on_delete=models.PROTECT, related_name="rollbacks"
    )
    trigger = models.CharField(max_length=20, help_text="gate | watchdog | person")
    cause = models.CharField(max_length=300)
    reasons = models.JSONField(default=list, blank=True)
    requested_by = models.CharField(max_length=150)
    state = models.CharField(
        max_length=12, choices=RollbackState.choices, default=RollbackState.RUNNING
    )
    started_at = models.DateTimeField()
    stage1_ended_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    report = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment"],
                condition=Q(state="RUNNING"),
                name="one_running_rollback_per_deployment",
            )
        ]

    def __str__(self) -> str:
        return f"rollback of {self.deployment_id} ({self.trigger}: {self.cause[:40]})"


class RollbackStep(models.Model):
    rollback = models.ForeignKey(Rollback, on_delete=models.PROTECT, related_name="steps")
    stage = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=40)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=10, blank=True, help_text="ok | failed | skipped")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["rollback", "stage", "id"]
        constraints = [
            models.UniqueConstraint(fields=["rollback", "name"], name="uniq_rollback_step")
        ]

    def __str__(self) -> str:
        return f"stage {self.stage} {self.name}: {self.outcome or 'running'}"


class Backup(models.Model):
    created_at = models.DateTimeField()
    engine = models.CharField(max_length=20)
    path = models.CharField(max_length=400)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    verified_at = models.DateTimeField(null=True, blank=True)
    verified_ok = models.BooleanField(null=True)
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"backup {self.pk} ({self.engine}, {self.created_at:%Y-%m-%d %H:%M})"
