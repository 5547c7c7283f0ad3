import pytest


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:
    """make_user hashes a password per user; the slow default hasher is not under test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
