#!/usr/bin/env bash
# `make test`: lint, then the whole suite. With CI=true the suite runs against this
# machine's real PostgreSQL and Redis (started here when installed but not running)
# and fails, rather than skips, when they are unreachable.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql >/dev/null 2>&1; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return; sleep 1; done
  fi
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then return; fi
  if command -v redis-server >/dev/null; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    for _ in $(seq 1 20); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return; sleep 0.5; done
  fi
}

# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return; fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium for the browser tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || true
  fi
}

ensure_chromium
if [ "${CI:-}" = "true" ]; then
  ensure_postgres
  ensure_redis
  export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/14}"
  export REQUIRE_SERVICES=1
fi

"$BIN/ruff" check .
"$BIN/ruff" format --check .
exec "$BIN/python" -m pytest "$@"
