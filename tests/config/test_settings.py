"""Production settings pass `check --deploy`, and refuse to start without a secret key."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRODUCTION = {
    "DJANGO_SETTINGS_MODULE": "config.settings",
    "DEBUG": "false",
    "SECRET_KEY": "x" * 20 + "production-like-key-with-enough-entropy-1234567890",
    "ALLOWED_HOSTS": "desk.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://desk.example.com",
    "DATABASE_URL": "sqlite:////tmp/deploy-check.sqlite3",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "EMAIL_URL": "smtp+tls://alerts@example.com@mail.example.com:587",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    inherited = set(PRODUCTION) | {"DEBUG", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS"}
    base = {k: v for k, v in os.environ.items() if k not in inherited}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_values():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_flags_debug_on():
    result = manage(
        "check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION | {"DEBUG": "true"}
    )
    assert result.returncode != 0
    assert "DEBUG" in result.stdout + result.stderr


def test_secret_key_is_required_when_debug_is_off():
    env = {k: v for k, v in PRODUCTION.items() if k != "SECRET_KEY"}
    result = manage("check", env=env)
    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr
