from django.apps import AppConfig


class CanaryConfig(AppConfig):
    name = "canary"
    verbose_name = "Canary rollout"

    def ready(self) -> None:
        from . import heartbeat  # noqa: F401  (connects the beat signals)
