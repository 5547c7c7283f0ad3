"""Settings, read once from the environment (see .env.example for every variable)."""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
_DEV_SECRET_KEY = "dev-only-insecure-key-never-used-when-debug-is-off"
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off")
    SECRET_KEY = _DEV_SECRET_KEY

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "channels",
    "audit",
    "trading",
    "alerts",
    "canary",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
# Threads of the ASGI server's process that run HTTP requests (config.asgi_handler), kept
# from one request to the next; more requests at once wait for one.
WEB_THREADS = env.int("WEB_THREADS", default=20)
if WEB_THREADS < 1:
    raise ImproperlyConfigured("WEB_THREADS must be >= 1")
# The web server process's garbage collector (config.asgi): the objects made while it starts
# (modules, classes, URL and middleware set-up), which live as long as the process, are
# moved out of its generations (gc.freeze: a full collection no longer walks them), and a
# young-generation collection runs after WEB_GC_GEN0 allocations instead of Python's 700
# (fewer objects of requests in flight promoted to the old generations, fewer full
# collections). 0 leaves the collector as Python sets it.
WEB_GC_GEN0 = env.int("WEB_GC_GEN0", default=20000)
if WEB_GC_GEN0 < 0:
    raise ImproperlyConfigured("WEB_GC_GEN0 must be >= 0 (0: Python's collector as it is)")
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite under var/ by default, in WAL mode with a busy timeout and
# immediate transactions so that web, worker and beat can all write.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (not :memory:) so end-to-end subprocesses share it; one per test process.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-db-{os.getpid()}.sqlite3")}
else:
    # 0: under an ASGI server each request runs in its own thread, and a persistent
    # connection per thread is never reused (Django #33497): it exhausts max_connections.
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=0))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # Statements run on a server-binding cursor are prepared on their connection after this
    # many executions (the order path's fill record: PostgreSQL spends longer planning it
    # than running it).
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5)
    # The ORM's cursors bind on the server too, so that every statement run again and again
    # (a candle's ingestion and processing, a monitor step) is prepared and planned once per
    # connection instead of each time: about 1 ms of PostgreSQL's CPU less per candle POST
    # (bench/bench_load.py). DB_SERVER_SIDE_BINDING=false binds on the client (statements
    # are then parsed and planned on every run), e.g. behind a pooler that cannot keep
    # prepared statements (then also set prepare_threshold to None).
    DATABASES["default"]["OPTIONS"].setdefault(
        "server_side_binding", env.bool("DB_SERVER_SIDE_BINDING", default=True)
    )
    # A server that stops answering without refusing (frozen, a dropped network path) must
    # fail a connection or a statement in seconds, not after libpq's default connect timeout
    # (130 s with psycopg) or the system's TCP retransmissions: the watchdog's database check
    # runs under a 55-s soft time limit and counts the failed checks that start the offline
    # rollback (canary.watchdogs). libpq's connection options: keepalives for an idle
    # connection, tcp_user_timeout (ms) for data sent and never acknowledged.
    for _name, _value in {
        "connect_timeout": env.int("DB_CONNECT_TIMEOUT_S", default=5),
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 15_000,
    }.items():
        DATABASES["default"]["OPTIONS"].setdefault(_name, _value)
    # A pool of connections (psycopg_pool) shared by the threads of one process: each
    # request takes one and gives it back when it ends, instead of opening its own. For the
    # web server (scripts/stack.py sets it there); not for the prefork Celery worker, which
    # closes a pool after every task. The pool keeps its connections: CONN_MAX_AGE is 0.
    DB_POOL_MAX_SIZE = env.int("DB_POOL_MAX_SIZE", default=0)
    if DB_POOL_MAX_SIZE > 0:
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": min(2, DB_POOL_MAX_SIZE),
            "max_size": DB_POOL_MAX_SIZE,
            "timeout": 10.0,
        }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env.str("CHANNELS_PREFIX", default="asgi")},
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
# No result backend: one (disabled) backend object for all threads, not one per thread (the
# ASGI server runs each request on a new thread; building it costs ~1 ms per request).
CELERY_RESULT_BACKEND_THREAD_SAFE = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A worker's pool process keeps its database connection across tasks for this many
# seconds (config/celery.py), instead of opening one per task; 0: one per task. Not with
# a connection pool (DB_POOL_MAX_SIZE), which Celery closes after each prefork task.
CELERY_WORKER_DB_CONN_MAX_AGE = env.int("WORKER_DB_CONN_MAX_AGE", default=300)
if DATABASES["default"].get("OPTIONS", {}).get("pool"):
    CELERY_WORKER_DB_CONN_MAX_AGE = 0
CELERY_DB_REUSE_MAX = 1_000_000 if CELERY_WORKER_DB_CONN_MAX_AGE > 0 else None
CELERY_TASK_TIME_LIMIT = 300
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker outlives a Redis outage of any length (Celery gives up after 100 tries by
# default and the worker exits): the watchdogs and the rollback live in it.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"


def _expiring(interval_s: float) -> dict[str, float]:
    """A periodic task's options so that a run that waited longer than its interval in the
    queue expires instead of piling up behind a busy or stopped worker: the database
    scheduler reads ``expire_seconds`` (it drops ``expires``), Celery's own ``expires``."""
    seconds = max(interval_s, 1.0)
    return {"expires": seconds, "expire_seconds": seconds}


CELERY_TIMEZONE = "UTC"
HEARTBEAT_INTERVAL_S = env.float("HEARTBEAT_INTERVAL_S", default=5.0)
HEARTBEAT_STALE_S = env.float("HEARTBEAT_STALE_S", default=30.0)
CELERY_BEAT_SCHEDULE = {
    "heartbeat": {"task": "canary.heartbeat", "schedule": HEARTBEAT_INTERVAL_S},
}

EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="canary@localhost")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "config.parsers.NulFreeJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # Per process (the default local-memory cache). "actions": each state-changing call.
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
        "rest_framework.throttling.ScopedRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env.str("API_THROTTLE_ANON", default="60/min"),
        "user": env.str("API_THROTTLE_USER", default="6000/min"),
        "actions": env.str("API_THROTTLE_ACTIONS", default="120/min"),
        "export": env.str("API_THROTTLE_EXPORT", default="60/min"),
        # Candle ingestion, per person (a feed): counted in fixed windows, not the user rate.
        "ingest": env.str("API_THROTTLE_INGEST", default="60000/min"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Canary control plane API",
    "DESCRIPTION": "Rollouts, approvals, pre-flight, rollbacks, alerts, deliveries, the audit "
    "trail and market candles. Token (`Authorization: Token <key>`) or session auth; each "
    "action needs the permission of the README's role matrix, and a refusal is recorded.",
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "RolloutStateEnum": "canary.models.RolloutState",
        "RollbackStateEnum": "canary.models.RollbackState",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "config.api.add_common_responses",
    ],
}
# Failed logins: LOGIN_FAILURE_LIMIT per username+IP within the window, then refused.
AUTHENTICATION_BACKENDS = ["audit.throttle.ThrottledModelBackend"]
LOGIN_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
LOGIN_FAILURE_WINDOW_S = env.int("LOGIN_FAILURE_WINDOW_S", default=15 * 60)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
LOGIN_URL = "/admin/login/"

# Production hardening: on whenever DEBUG is off.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^health$"]
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Market data and the demo.
MARKET_TIMEFRAMES = ["1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d"]
MAX_CANDLES_PER_BATCH = 1000

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
DEMO_PACE_S = env.float("DEMO_PACE_S", default=3.0)

# Alerts
ALERTS_RATE_LIMIT_S = env.float("ALERTS_RATE_LIMIT_S", default=60.0)
ALERTS_PENDING_LIMIT = env.int("ALERTS_PENDING_LIMIT", default=100)
ALERTS_MAX_ATTEMPTS = env.int("ALERTS_MAX_ATTEMPTS", default=5)
ALERTS_RETRY_BASE_S = env.float("ALERTS_RETRY_BASE_S", default=2.0)
ALERTS_RETRY_MAX_S = env.float("ALERTS_RETRY_MAX_S", default=300.0)
ALERTS_CLAIM_STALE_S = env.float("ALERTS_CLAIM_STALE_S", default=120.0)
ALERTS_SILENCE_MAX_S = env.float("ALERTS_SILENCE_MAX_S", default=7 * 86400.0)
ALERTS_EMAIL_TIMEOUT_S = env.float("ALERTS_EMAIL_TIMEOUT_S", default=10.0)
ALERTS_WEBHOOK_URLS = env.list("ALERTS_WEBHOOK_URLS", default=[])
ALERTS_WEBHOOK_SECRET = env.str("ALERTS_WEBHOOK_SECRET", default="")
ALERTS_WEBHOOK_FORMAT = env.str("ALERTS_WEBHOOK_FORMAT", default="json")
ALERTS_WEBHOOK_TIMEOUT_S = env.float("ALERTS_WEBHOOK_TIMEOUT_S", default=5.0)
ALERTS_PRESENCE_TTL_S = env.float("ALERTS_PRESENCE_TTL_S", default=60.0)
ALERTS_WS_RATE = env.float("ALERTS_WS_RATE", default=10.0)
ALERTS_WS_BURST = env.float("ALERTS_WS_BURST", default=20.0)
ALERTS_PROCESS_BATCH = env.int("ALERTS_PROCESS_BATCH", default=2000)
# One candle-processing run at a time (alerts.services.candles_queue): its flag holds off
# sending another while it is queued or running; the run renews it on every pass, so the
# expiry (seconds) only matters if the run is lost.
ALERTS_QUEUED_FLAG_TTL_S = env.int("ALERTS_QUEUED_FLAG_TTL_S", default=30)
if ALERTS_QUEUED_FLAG_TTL_S <= 0:
    raise ImproperlyConfigured("ALERTS_QUEUED_FLAG_TTL_S must be > 0")
# Seconds a run waits for more candles before it ends (a feed posting many a second is
# then one run); ALERTS_RUN_MAX_S: after that long a run hands over to a new task.
ALERTS_RUN_LINGER_S = env.float("ALERTS_RUN_LINGER_S", default=0.1)
if not 0 <= ALERTS_RUN_LINGER_S <= 1:
    raise ImproperlyConfigured("ALERTS_RUN_LINGER_S must be between 0 and 1 (seconds)")
# ALERTS_RUN_PASS_S: while candles keep coming, a run starts a pass over the pending
# streams at most this often (seconds), so that a pass takes several streams' candles in
# one transaction (alerts.services.streams_process) instead of one each.
ALERTS_RUN_PASS_S = env.float("ALERTS_RUN_PASS_S", default=0.02)
if not 0 <= ALERTS_RUN_PASS_S <= 0.5:
    raise ImproperlyConfigured("ALERTS_RUN_PASS_S must be between 0 and 0.5 (seconds)")
ALERTS_RUN_MAX_S = env.float("ALERTS_RUN_MAX_S", default=20.0)
if not 0 < ALERTS_RUN_MAX_S <= 60:
    raise ImproperlyConfigured("ALERTS_RUN_MAX_S must be > 0 and <= 60 (seconds)")
# The sweeper (alerts.services.deliveries_sweep, beat and each worker start) queues again
# the deliveries whose task was lost: pending or overdue for ALERTS_SWEEP_AFTER_S, or
# sending and claimed longer than ALERTS_CLAIM_STALE_S ago. A stale claim is taken over,
# so it must outlast a send: the alerts.deliver task's hard time limit (60 s).
ALERTS_SWEEP_INTERVAL_S = env.float("ALERTS_SWEEP_INTERVAL_S", default=5.0)
ALERTS_SWEEP_AFTER_S = env.float("ALERTS_SWEEP_AFTER_S", default=10.0)
ALERTS_SWEEP_BATCH = env.int("ALERTS_SWEEP_BATCH", default=200)
if ALERTS_SWEEP_INTERVAL_S <= 0 or ALERTS_SWEEP_AFTER_S <= 0 or ALERTS_SWEEP_BATCH <= 0:
    raise ImproperlyConfigured(
        "ALERTS_SWEEP_INTERVAL_S, ALERTS_SWEEP_AFTER_S and ALERTS_SWEEP_BATCH must be > 0"
    )
if ALERTS_CLAIM_STALE_S <= 60 and not DEBUG:
    raise ImproperlyConfigured(
        "ALERTS_CLAIM_STALE_S must exceed the alerts.deliver time limit (60 s) when DEBUG is "
        "off: a claim taken over while its send still runs would send it twice"
    )
CELERY_BEAT_SCHEDULE["alerts-sweep-deliveries"] = {
    "task": "alerts.sweep_deliveries",
    "schedule": ALERTS_SWEEP_INTERVAL_S,
    "options": _expiring(ALERTS_SWEEP_INTERVAL_S),
}
# Candle processing and deliveries have queues of their own, so alerts never wait behind
# the strategy's tasks ("celery") or a backlog of emails and webhooks. A worker started
# without -Q consumes every queue in turn; for latency, give each queue its own worker
# (`celery -A config worker -Q alerts.candles`, `-Q alerts.deliver`, `-Q celery`), as the
# alerts benchmark does.
from kombu import Queue  # noqa: E402

CELERY_TASK_QUEUES = (Queue("celery"), Queue("alerts.candles"), Queue("alerts.deliver"))
CELERY_TASK_ROUTES = {
    "alerts.process_candles": {"queue": "alerts.candles"},
    "alerts.deliver": {"queue": "alerts.deliver"},
}
if ALERTS_WEBHOOK_FORMAT not in ("json", "slack"):
    raise ImproperlyConfigured("ALERTS_WEBHOOK_FORMAT must be json or slack")
if ALERTS_WEBHOOK_URLS and not ALERTS_WEBHOOK_SECRET and not DEBUG:
    raise ImproperlyConfigured("ALERTS_WEBHOOK_SECRET is required for webhooks when DEBUG is off")
# redis-py 8 reads with a 5 s socket timeout by default, equal to channels_redis' 5 s
# blocking pop: the receive loop of a consumer idle for 5 s then fails and its WebSocket
# drops. Give the channel layer's connections a read timeout above the pop's.
ALERTS_CHANNEL_LAYER_SOCKET_TIMEOUT_S = env.float(
    "ALERTS_CHANNEL_LAYER_SOCKET_TIMEOUT_S", default=30.0
)
if CHANNEL_LAYERS["default"]["BACKEND"] == "channels_redis.core.RedisChannelLayer":
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [
        {"address": host, "socket_timeout": ALERTS_CHANNEL_LAYER_SOCKET_TIMEOUT_S}
        if isinstance(host, str)
        else host
        for host in CHANNEL_LAYERS["default"]["CONFIG"]["hosts"]
    ]

# Safety
# Pre-flight, rollback, watchdogs and backups (canary/preflight.py, rollback.py, backup.py,
# watchdogs.py, journal.py). Every value is read once from the environment.
from celery.schedules import crontab  # noqa: E402

SAFETY_REDIS_PREFIX = env.str("SAFETY_REDIS_PREFIX", default="safety")
SAFETY_BACKUP_DIR = Path(env.str("SAFETY_BACKUP_DIR", default=str(VAR_DIR / "backups")))
SAFETY_BACKUP_KEEP = env.int("SAFETY_BACKUP_KEEP", default=14)
SAFETY_BACKUP_MAX_AGE_H = env.float("SAFETY_BACKUP_MAX_AGE_H", default=24.0)
SAFETY_BACKUP_TIMEOUT_S = env.float("SAFETY_BACKUP_TIMEOUT_S", default=600.0)
SAFETY_BACKUP_VERIFIED_TTL_H = env.float("SAFETY_BACKUP_VERIFIED_TTL_H", default=6.0)
SAFETY_JOURNAL_DIR = Path(env.str("SAFETY_JOURNAL_DIR", default=str(VAR_DIR / "journal")))
SAFETY_PREFLIGHT_DIR = Path(env.str("SAFETY_PREFLIGHT_DIR", default=str(VAR_DIR / "preflight")))
SAFETY_PREFLIGHT_TIMEOUT_S = env.float("SAFETY_PREFLIGHT_TIMEOUT_S", default=10.0)
SAFETY_MAX_CLOCK_SKEW_MS = env.float("SAFETY_MAX_CLOCK_SKEW_MS", default=1000.0)
SAFETY_STREAM_SILENT_S = env.float("SAFETY_STREAM_SILENT_S", default=30.0)
SAFETY_STREAM_WAIT_S = env.float("SAFETY_STREAM_WAIT_S", default=3.0)
SAFETY_CANDLES_FRESH_BARS = env.float("SAFETY_CANDLES_FRESH_BARS", default=2.0)
SAFETY_ROLLBACK_LEASE_S = env.float("SAFETY_ROLLBACK_LEASE_S", default=5.0)
SAFETY_ROLLBACK_MAX_RUNS = env.int("SAFETY_ROLLBACK_MAX_RUNS", default=20)
SAFETY_STAGE1_TARGET_S = env.float("SAFETY_STAGE1_TARGET_S", default=30.0)
SAFETY_FLATTEN_ROUNDS = env.int("SAFETY_FLATTEN_ROUNDS", default=3)
SAFETY_FLATTEN_WORKERS = env.int("SAFETY_FLATTEN_WORKERS", default=4)
SAFETY_FLAT_CHECKS = env.int("SAFETY_FLAT_CHECKS", default=5)
SAFETY_FLAT_CHECK_PAUSE_S = env.float("SAFETY_FLAT_CHECK_PAUSE_S", default=0.2)
SAFETY_ORDER_GRACE_S = env.float("SAFETY_ORDER_GRACE_S", default=6.0)
# Test only: a pause before each closing order, so a test can kill the worker mid-way.
SAFETY_CLOSE_DELAY_S = env.float("SAFETY_CLOSE_DELAY_S", default=0.0)
# Test/rehearsal only: build the safety code's exchange adapter from this ExchangeConfig
# (JSON: kind, exchange_id, base_url, api_key, api_secret...) instead of the router's.
SAFETY_EXCHANGE_OVERRIDE = env.json("SAFETY_EXCHANGE_OVERRIDE", default={})
SAFETY_WATCHDOG_INTERVAL_S = env.float("SAFETY_WATCHDOG_INTERVAL_S", default=5.0)
SAFETY_DB_DOWN_TICKS = env.int("SAFETY_DB_DOWN_TICKS", default=2)
SAFETY_ERROR_LOG_KEEP = env.int("SAFETY_ERROR_LOG_KEEP", default=200)
CELERY_BEAT_SCHEDULE["safety-watchdogs"] = {
    "task": "canary.watchdogs",
    "schedule": SAFETY_WATCHDOG_INTERVAL_S,
    "options": _expiring(SAFETY_WATCHDOG_INTERVAL_S),
}
CELERY_BEAT_SCHEDULE["safety-nightly-backup"] = {
    "task": "canary.backup_nightly",
    "schedule": crontab(hour=2, minute=30),
}
LOGGING["handlers"]["safety_errors"] = {
    "class": "canary.journal.RedisErrorLogHandler",
    "level": "ERROR",
}
LOGGING["root"]["handlers"].append("safety_errors")

# Canary lifecycle
# The monitor (canary/monitor_tasks.py) every CANARY_MONITOR_INTERVAL_S; gate #1 wants a GO
# pre-flight younger than CANARY_PREFLIGHT_MAX_AGE_S.
CANARY_MONITOR_INTERVAL_S = env.float("CANARY_MONITOR_INTERVAL_S", default=10.0)
CANARY_PREFLIGHT_MAX_AGE_S = env.float("CANARY_PREFLIGHT_MAX_AGE_S", default=3600.0)
if CANARY_MONITOR_INTERVAL_S <= 0 or CANARY_PREFLIGHT_MAX_AGE_S <= 0:
    raise ImproperlyConfigured(
        "CANARY_MONITOR_INTERVAL_S and CANARY_PREFLIGHT_MAX_AGE_S must be > 0"
    )
CELERY_BEAT_SCHEDULE["canary-monitor"] = {
    "task": "canary.monitor",
    "schedule": CANARY_MONITOR_INTERVAL_S,
    "options": _expiring(CANARY_MONITOR_INTERVAL_S),
}

# Desk
from celery.schedules import crontab  # noqa: E402

DESK_POLL_S = env.float("DESK_POLL_S", default=3.0)
DESK_URL = env.str("DESK_URL", default="http://127.0.0.1:8000/")
DESK_REPORT_HOUR = env.int("DESK_REPORT_HOUR", default=6)
DESK_REPORT_MINUTE = env.int("DESK_REPORT_MINUTE", default=5)
DESK_REPORT_RECIPIENTS = env.list("DESK_REPORT_RECIPIENTS", default=[])
if not (0 <= DESK_REPORT_HOUR <= 23 and 0 <= DESK_REPORT_MINUTE <= 59):
    raise ImproperlyConfigured("DESK_REPORT_HOUR must be 0..23 and DESK_REPORT_MINUTE 0..59")
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"
CELERY_IMPORTS = [*globals().get("CELERY_IMPORTS", ()), "canary.desk_tasks"]
CELERY_BEAT_SCHEDULE["desk-daily-report"] = {
    "task": "canary.desk_daily_report",
    "schedule": crontab(hour=DESK_REPORT_HOUR, minute=DESK_REPORT_MINUTE),
}
CELERY_BEAT_SCHEDULE["desk-uptime-sample"] = {
    "task": "canary.desk_uptime_sample",
    "schedule": 60.0,
}

# Trading
# Paper deployments trade on the candles of this Candle.exchange ("paper" = CSV replay).
TRADING_PAPER_MARKET_EXCHANGE = env.str("TRADING_PAPER_MARKET_EXCHANGE", default="paper")
TRADING_PAPER_FEE_BPS = env.float("TRADING_PAPER_FEE_BPS", default=10.0)
TRADING_PAPER_SLIPPAGE_BPS = env.float("TRADING_PAPER_SLIPPAGE_BPS", default=2.0)
TRADING_EXCHANGE_API_KEY = env.str("TRADING_EXCHANGE_API_KEY", default="")
TRADING_EXCHANGE_API_SECRET = env.str("TRADING_EXCHANGE_API_SECRET", default="")
TRADING_EXCHANGE_SANDBOX = env.bool("TRADING_EXCHANGE_SANDBOX", default=False)
TRADING_EXCHANGE_BASE_URL = env.str("TRADING_EXCHANGE_BASE_URL", default="")
TRADING_EXCHANGE_TIMEOUT_MS = env.int("TRADING_EXCHANGE_TIMEOUT_MS", default=10_000)
TRADING_SIGNAL_MAX_AGE_S = env.float("TRADING_SIGNAL_MAX_AGE_S", default=120.0)
TRADING_UNKNOWN_GRACE_S = env.float("TRADING_UNKNOWN_GRACE_S", default=10.0)
TRADING_EQUITY_INTERVAL_S = env.float("TRADING_EQUITY_INTERVAL_S", default=60.0)
TRADING_RECONCILE_INTERVAL_S = env.float("TRADING_RECONCILE_INTERVAL_S", default=60.0)
TRADING_ENGINE_LOOKBACK = env.int("TRADING_ENGINE_LOOKBACK", default=500)
MARKET_POLL_ENABLED = env.bool("MARKET_POLL_ENABLED", default=False)
MARKET_POLL_INTERVAL_S = env.float("MARKET_POLL_INTERVAL_S", default=10.0)
MARKET_POLL_EXCHANGE = env.str("MARKET_POLL_EXCHANGE", default="binance")
MARKET_POLL_BASE_URL = env.str("MARKET_POLL_BASE_URL", default="")
# Streams to poll: empty = the symbols and timeframes of the deployments with signals on.
MARKET_POLL_SYMBOLS = env.list("MARKET_POLL_SYMBOLS", default=[])
MARKET_POLL_TIMEFRAMES = env.list("MARKET_POLL_TIMEFRAMES", default=[])
MARKET_POLL_BACKFILL = env.int("MARKET_POLL_BACKFILL", default=500)
MARKET_POLL_CLOSE_GRACE_MS = env.int("MARKET_POLL_CLOSE_GRACE_MS", default=2_000)
if TRADING_SIGNAL_MAX_AGE_S <= 0 or TRADING_EQUITY_INTERVAL_S <= 0:
    raise ImproperlyConfigured("TRADING_SIGNAL_MAX_AGE_S and TRADING_EQUITY_INTERVAL_S must be > 0")
CELERY_BEAT_SCHEDULE["trading-reconcile"] = {
    "task": "trading.reconcile",
    "schedule": TRADING_RECONCILE_INTERVAL_S,
}
CELERY_BEAT_SCHEDULE["trading-equity"] = {
    "task": "trading.equity_snapshots",
    "schedule": TRADING_EQUITY_INTERVAL_S / 2,
}
if MARKET_POLL_ENABLED:
    CELERY_BEAT_SCHEDULE["market-poll"] = {
        "task": "trading.market_poll",
        "schedule": MARKET_POLL_INTERVAL_S,
    }
