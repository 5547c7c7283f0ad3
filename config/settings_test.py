"""Settings for the test suite: production settings with test-only defaults."""

import os
import secrets

os.environ.setdefault("DEBUG", "false")
os.environ.setdefault("SECRET_KEY", "test-" + secrets.token_urlsafe(32))
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
os.environ.setdefault("EMAIL_URL", "consolemail://")
# The suite imports config.asgi in its own process: its collector is left as it is.
os.environ.setdefault("WEB_GC_GEN0", "0")

from .settings import *  # noqa: E402,F403
