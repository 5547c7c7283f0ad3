"""The README's run command on a fresh var/ directory: migrates, creates the demo users,
starts its own Redis, web, worker, beat and the demo replay; /health turns 200; Ctrl-C
stops every process it started."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from stack import free_port, redis_server_binary

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_run_command_brings_the_stack_up_and_ctrl_c_stops_it(tmp_path):
    if redis_server_binary() is None:
        pytest.skip("no redis-server binary for the private Redis")
    port = free_port()
    drop = {
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "ALLOWED_HOSTS",
        "DJANGO_SETTINGS_MODULE",
        "SECURE_SSL_REDIRECT",
        "EMAIL_URL",
        "CHANNELS_PREFIX",
        "REQUIRE_SERVICES",
        "DEBUG",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(VAR_DIR=str(tmp_path / "var"), PORT=str(port), DEMO_PACE_S="0.2")
    proc = subprocess.Popen(
        [sys.executable, "scripts/run.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status, body = 0, {}
        while time.monotonic() < deadline and status != 200:
            assert proc.poll() is None, proc.stdout.read()
            status, body = _get(f"http://127.0.0.1:{port}/health")
            time.sleep(0.5)
        assert status == 200, body
        assert set(body["components"]) == {"database", "redis", "channel_layer", "worker", "beat"}
        creds = json.loads((tmp_path / "var" / "demo-credentials.json").read_text())
        assert {c["role"] for c in creds.values()} == {"Alpha", "Planner", "Ops", "Viewer"}
        redis_port = _redis_port(tmp_path)
        assert _listening(redis_port)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output
    for username, cred in creds.items():
        assert f"user {username}" in output and cred["password"] in output
    assert not _listening(port), "web server still listening after Ctrl-C"
    assert not _listening(redis_port), "private Redis still running after Ctrl-C"


def _redis_port(tmp_path: Path) -> int:
    log = (tmp_path / "var" / "log" / "redis.log").read_text()
    found = re.search(r"port=(\d+)", log)
    assert found, "private Redis port not found in its log"
    return int(found.group(1))
