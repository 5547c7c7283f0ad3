"""DB_POOL_MAX_SIZE: a psycopg_pool for PostgreSQL, with CONN_MAX_AGE 0 (the pool keeps the
connections); off by default; the stack gives the web server a pool, not the worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRINT = (
    "import json; from django.conf import settings; d = settings.DATABASES['default']; "
    "print(json.dumps({'age': d['CONN_MAX_AGE'], 'pool': d.get('OPTIONS', {}).get('pool')}))"
)


def database_settings(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", PRINT],
        cwd=ROOT,
        env=base | {"DEBUG": "true", "DATABASE_URL": "postgres://u@127.0.0.1:5432/x"} | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_pool_by_default():
    assert database_settings() == {"age": 0, "pool": None}


def test_a_pool_of_the_size_asked_and_no_persistent_connection():
    found = database_settings(DB_POOL_MAX_SIZE="7", DB_CONN_MAX_AGE="60")
    assert found["age"] == 0
    assert found["pool"]["max_size"] == 7 and found["pool"]["min_size"] == 2


def test_the_stack_pools_the_web_server_only():
    sys.path.insert(0, str(ROOT / "scripts"))
    from stack import WEB_DB_POOL_MAX_SIZE, Stack

    stack = Stack(env={"PATH": "/usr/bin"}, log_dir=ROOT / "var" / "unused")
    assert stack.web_env()["DB_POOL_MAX_SIZE"] == str(WEB_DB_POOL_MAX_SIZE)
    assert "DB_POOL_MAX_SIZE" not in stack.env
    assert Stack(env={"DB_POOL_MAX_SIZE": "3"}, log_dir=ROOT).web_env()["DB_POOL_MAX_SIZE"] == "3"
    assert stack.web_argv(8000, workers=2)[-2:] == ["--workers", "2"]
