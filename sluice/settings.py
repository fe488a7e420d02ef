"""Django settings. Everything that differs between machines comes from the environment
(see sluice/env.py); with no variables set Sluice uses the embedded PostgreSQL and Redis
that `make run` starts under var/."""

import secrets
from pathlib import Path

from sluice import embedded_paths
from sluice.env import (
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_json_object,
    env_str,
    redis_url_with_db,
)

BASE_DIR = embedded_paths.BASE_DIR
VAR_DIR = embedded_paths.var_dir()


def _secret_key() -> str:
    """SLUICE_SECRET_KEY, or a random key kept in var/ so sessions survive restarts."""
    configured = env_str("SLUICE_SECRET_KEY", "")
    if configured:
        return configured
    key_file = VAR_DIR / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    key_file.write_text(key)
    key_file.chmod(0o600)
    return key


SECRET_KEY = _secret_key()
DEBUG = env_bool("SLUICE_DEBUG", False)
ALLOWED_HOSTS = [
    h for h in env_str("SLUICE_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h
]
CSRF_TRUSTED_ORIGINS = [o for o in env_str("SLUICE_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "apps.tenants",
    "apps.audit",
    "apps.graphs",
    "apps.runs",
    "apps.live",
    "apps.streams",
    "apps.secrets",
    "apps.usage",
    "apps.editor",
    "apps.api",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "apps.tenants.middleware.TenantMiddleware",
]

ROOT_URLCONF = "sluice.urls"
ASGI_APPLICATION = "sluice.asgi.application"
WSGI_APPLICATION = None

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
                "apps.tenants.context_processors.current_tenant",
            ],
        },
    },
]

_database_url = env_str("DATABASE_URL", "")
if not _database_url:
    _database_url = embedded_paths.embedded_database_url(embedded_paths.postgres_data_dir(VAR_DIR))
DATABASES = {"default": database_from_url(_database_url)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", f"redis://127.0.0.1:{embedded_paths.DEFAULT_REDIS_PORT}/0")
# The live feed's Redis database: runs' frame counters and recent frames, the channels their
# frames are published on (one PUBLISH per run and batch, from the script that numbers and
# stores them: apps/live/publisher.py), and viewer bookkeeping. Each web process subscribes
# once per followed run (apps/live/hub.py); nothing queues in Redis for a slow follower.
SLUICE_FEED_REDIS_URL = redis_url_with_db(REDIS_URL, 2)

# Kafka, for stream deployments that read a topic: `make run` and the test harness start a
# one-node broker when Java and Maven are present. Empty means no Kafka: deploying a stream
# from Kafka is refused with an error that says so.
KAFKA_BOOTSTRAP_SERVERS = env_str("KAFKA_BOOTSTRAP_SERVERS", "")

# Celery: the broker is Redis by default; PostgreSQL stays the truth (DESIGN "Shape").
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", redis_url_with_db(REDIS_URL, 0))
CELERY_TASK_DEFAULT_QUEUE = "cpu"
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes the database connection after every task unless told to
# reuse it; reconnecting cost more than a whole durable step (bench/chain). Reused for
# this many tasks (times two), then recycled; a broken connection is still replaced.
CELERY_DB_REUSE_MAX = env_int("SLUICE_WORKER_DB_REUSE_MAX", 500, minimum=0)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# Execution: how long a claimed step is leased before the sweeper may hand it to another
# worker, and how often the sweeper looks. A background thread in each worker process renews
# the leases of its running steps four times per lease, so a step may run for hours; a
# killed worker's steps are running again within about lease + sweep interval.
SLUICE_STEP_LEASE_S = env_float("SLUICE_STEP_LEASE_S", 6.0, minimum=1.0)
SLUICE_SWEEP_INTERVAL_S = env_float("SLUICE_SWEEP_INTERVAL_S", 1.0, minimum=0.2)
# Stream deployments (apps/streams): a signed webhook older than this is refused (replays);
# how often beat looks for due schedule ticks, and how many missed ticks a schedule fires
# when it runs again after a stop or an outage.
SLUICE_WEBHOOK_TOLERANCE_S = env_float("SLUICE_WEBHOOK_TOLERANCE_S", 300.0, minimum=1.0)
SLUICE_SCHEDULE_POLL_S = env_float("SLUICE_SCHEDULE_POLL_S", 5.0, minimum=0.2)
SLUICE_SCHEDULE_CATCH_UP = env_int("SLUICE_SCHEDULE_CATCH_UP", 10, minimum=1)
# A queued step whose message has not been picked up for this long gets a new message.
SLUICE_REQUEUE_AFTER_S = env_float("SLUICE_REQUEUE_AFTER_S", 30.0, minimum=0.5)
# A run may re-attempt at most this share of its steps, plus a fixed allowance, so a failing
# dependency cannot multiply the load on itself (retries beyond it dead-letter the step).
SLUICE_RETRY_BUDGET_RATIO = env_float("SLUICE_RETRY_BUDGET_RATIO", 0.1)
SLUICE_RETRY_BUDGET_MIN = env_int("SLUICE_RETRY_BUDGET_MIN", 10)
# Outbound HTTP from graphs (tool.http, sink.webhook): the longest timeout a node may ask.
SLUICE_HTTP_MAX_TIMEOUT_S = env_float("SLUICE_HTTP_MAX_TIMEOUT_S", 60.0, minimum=1.0)
SLUICE_DEFAULT_MAX_FANOUT = env_int("SLUICE_DEFAULT_MAX_FANOUT", 1000, minimum=1)
# A batch job's completion webhook (apps/api/webhooks.py): attempts before it is marked failed,
# each POST's timeout, and the delay before the first retry (doubling per attempt, with
# jitter, up to 10 minutes).
SLUICE_WEBHOOK_MAX_ATTEMPTS = env_int("SLUICE_WEBHOOK_MAX_ATTEMPTS", 8, minimum=1)
SLUICE_WEBHOOK_TIMEOUT_S = env_float("SLUICE_WEBHOOK_TIMEOUT_S", 10.0, minimum=1.0)
SLUICE_WEBHOOK_BACKOFF_S = env_float("SLUICE_WEBHOOK_BACKOFF_S", 2.0, minimum=0.1)

# The simulated engine's defaults; a graph's llm.generate config may not change them.
SLUICE_SIM_TTFT_MS = env_float("SLUICE_SIM_TTFT_MS", 150.0)
SLUICE_SIM_TOKENS_PER_S = env_float("SLUICE_SIM_TOKENS_PER_S", 80.0, minimum=1.0)
# Fault injection for tests and demos: fail the first N attempts of every generation.
SLUICE_SIM_FAIL_FIRST_ATTEMPTS = env_int("SLUICE_SIM_FAIL_FIRST_ATTEMPTS", 0)
# Concurrent requests one simulated engine decodes at full speed; beyond, each step slows.
SLUICE_SIM_BATCH_CAPACITY = env_int("SLUICE_SIM_BATCH_CAPACITY", 64, minimum=1)

# The model registry (workers/inference/registry.py): entries merged over the built-in
# simulated models, e.g. {"llama-8b": {"engine": "openai", "params": {"base_url": ...,
# "model": ...}, "usd_per_mtok_in": 0.2, "usd_per_mtok_out": 0.6, "quality": 2}}.
SLUICE_MODELS = env_json_object("SLUICE_MODELS")

# The live run view (apps/live): token deltas of one stream are coalesced into frames at
# most this far apart; a WebSocket client may have this many frames un-acknowledged before
# it is switched to catching up from storage; SSE sends a keep-alive comment this often;
# a run with on_disconnect: cancel is cancelled this long after its last viewer left
# (policies.disconnect_grace_s overrides it per graph).
SLUICE_FEED_FRAME_MS = env_float("SLUICE_FEED_FRAME_MS", 30.0, minimum=1.0)
SLUICE_FEED_WINDOW = env_int("SLUICE_FEED_WINDOW", 512, minimum=8)
SLUICE_SSE_HEARTBEAT_S = env_float("SLUICE_SSE_HEARTBEAT_S", 15.0, minimum=0.1)
SLUICE_VIEWER_GRACE_S = env_float("SLUICE_VIEWER_GRACE_S", 15.0, minimum=0.0)

# The test harness sets this: every test's fixture users are hashed with a hasher that costs
# microseconds instead of PBKDF2's deliberate half second (five users a test, across the
# suite, was minutes). Never for a real installation: the value says so.
if env_str("SLUICE_PASSWORD_HASHING", "") == "insecure-fast-for-tests":
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
# Invitation links and other mail go to the web process's stdout unless a real backend is
# configured (SLUICE_EMAIL_BACKEND, e.g. django.core.mail.backends.smtp.EmailBackend).
EMAIL_BACKEND = env_str("SLUICE_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("SLUICE_FROM_EMAIL", "sluice@localhost")

# Key for tenant secrets (apps/secrets), a Fernet key (urlsafe base64 of 32 bytes). Empty:
# derived from SECRET_KEY, so secrets stay readable as long as SECRET_KEY does.
SLUICE_SECRETS_KEY = env_str("SLUICE_SECRETS_KEY", "")

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "graphs:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Set for `collectstatic` in production; unset, static files are served straight from the
# source folders, so `make run` needs no collectstatic step.
STATIC_ROOT = Path(env_str("SLUICE_STATIC_ROOT", "")) if env_str("SLUICE_STATIC_ROOT", "") else None
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("SLUICE_LOG_LEVEL", "INFO")},
}

# The REST API (apps/api): API keys or the browser session, problem+json errors, cursor
# pagination; the OpenAPI schema is generated from the views (drf-spectacular).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.api.auth.ApiKeyAuthentication",
        "apps.api.auth.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["apps.api.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "apps.api.schema.SluiceSchema",
    "EXCEPTION_HANDLER": "apps.api.problems.exception_handler",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Sluice API",
    "DESCRIPTION": (
        "Graphs, runs, batch jobs and stream events. Authenticate with an API key "
        "(`Authorization: Bearer sk_…`, created under Settings → API keys) or the browser "
        "session. Errors are `application/problem+json` and name the field at fault."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # What the URL converters accept, so clients (and schemathesis) know it.
    "PATH_CONVERTER_OVERRIDES": {
        "slug": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
        "int": {"type": "integer", "minimum": 0},
    },
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "apps.runs.models.RunStatus",
        "RunKindEnum": "apps.runs.models.RunKind",
        "StepStatusEnum": "apps.runs.models.StepStatus",
        "DeploymentStatusEnum": "apps.streams.models.DeploymentStatus",
    },
}
# Admission control: platform defaults for a tenant that sets none (apps/api/admission.py).
SLUICE_MAX_QUEUED_STEPS = env_int("SLUICE_MAX_QUEUED_STEPS", 1_000_000, minimum=1)
SLUICE_MAX_EVENTS_PER_S = env_int("SLUICE_MAX_EVENTS_PER_S", 5_000, minimum=1)
SLUICE_API_REQUESTS_PER_MIN = env_int("SLUICE_API_REQUESTS_PER_MIN", 1_200, minimum=1)
# The largest request body the API reads (a batch job's inputs come in one request).
SLUICE_API_MAX_BODY_BYTES = env_int("SLUICE_API_MAX_BODY_MB", 64, minimum=1) * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = SLUICE_API_MAX_BODY_BYTES
# The most inputs one batch job or one bulk events request may carry.
SLUICE_MAX_BATCH_ITEMS = env_int("SLUICE_MAX_BATCH_ITEMS", 50_000, minimum=1)
