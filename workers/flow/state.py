"""Flow-control state in Redis, shared by every worker process: per model, the request and
token buckets, the adaptive concurrency limit with the permits held against it, and a
Retry-After pause; per provider, the circuit breaker and the counts behind its retry budget.

Each decision is one Lua script, so two workers can never both take the last permit or both
send the half-open probe. Taking a permit checks everything first and changes nothing unless
it succeeds. Permits are members of a sorted set scored by their expiry, so a worker that
dies holding one cannot shrink the limit for longer than PERMIT_TTL_S.

Nothing here is the only copy of anything (DESIGN "Redis"): losing it resets the limits to
their configured starting points and closes every breaker.
"""

import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from sluice.redis_client import redis_client
from workers.flow.config import RETRY_WINDOW_S, FlowConfig

logger = logging.getLogger(__name__)

PERMIT_TTL_S = 600.0  # longer than any generation's silence limit
PROBE_TTL_S = 60.0  # a half-open probe that never reports frees the slot after this
BUCKET_S = 3  # the retry budget's window is counted in buckets of this many seconds
DECREASE_COOLDOWN_S = 0.5  # one multiplicative decrease per burst of failures, not per failure
BACKOFF_FACTOR = 0.5
LATENCY_BACKOFF_FACTOR = 0.9
CONCURRENCY_POLL_S = 0.05  # how soon to look again when every permit is taken

# KEYS: model hash, model permits (zset), provider hash, provider window (hash of counts).
# Returns {"ok", permits held, limit} or {"wait", seconds, why, figure} or {"budget",
# retries, successes} or {"too_big", tpm}.
_ACQUIRE = """
local now, rid, est = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local rpm, tpm, maxc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local open_s, is_retry = tonumber(ARGV[7]), ARGV[8] == '1'
local ratio, rmin = tonumber(ARGV[9]), tonumber(ARGV[10])
local window, bucket = tonumber(ARGV[11]), tonumber(ARGV[12])
local permit_ttl, probe_ttl = tonumber(ARGV[13]), tonumber(ARGV[14])
local function refill(saved, at, per_minute)
  local tokens = tonumber(saved) or per_minute
  return math.min(per_minute, tokens + math.max(0, now - (tonumber(at) or now)) * per_minute / 60)
end

local p = redis.call('HMGET', KEYS[3], 'state', 'opened_at', 'probe', 'probe_until')
local state = p[1] or 'closed'
local probing = false
if state == 'open' then
  local reopen = tonumber(p[2]) + open_s
  if now < reopen then return {'wait', tostring(reopen - now), 'breaker', ''} end
  state = 'half_open'
end
if state == 'half_open' then
  if p[3] and p[3] ~= '' and tonumber(p[4]) > now then
    return {'wait', tostring(math.min(1, tonumber(p[4]) - now)), 'probe', ''}
  end
  probing = true
end

local m = redis.call(
  'HMGET', KEYS[1], 'paused_until', 'limit', 'rpm_t', 'rpm_at', 'tpm_t', 'tpm_at')
local paused = tonumber(m[1]) or 0
if now < paused then return {'wait', tostring(paused - now), 'paused', ''} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local limit = tonumber(m[2]) or maxc
local held = redis.call('ZCARD', KEYS[2])
if held >= math.max(1, math.floor(limit)) then
  return {'wait', ARGV[15], 'concurrency', tostring(math.floor(limit))}
end
local rpm_t, tpm_t
if rpm > 0 then
  rpm_t = refill(m[3], m[4], rpm)
  if rpm_t < 1 then return {'wait', tostring((1 - rpm_t) * 60 / rpm), 'rpm', tostring(rpm)} end
end
if tpm > 0 then
  if est > tpm then return {'too_big', tostring(tpm)} end
  tpm_t = refill(m[5], m[6], tpm)
  if tpm_t < est then return {'wait', tostring((est - tpm_t) * 60 / tpm), 'tpm', tostring(tpm)} end
end
local current = math.floor(now / bucket)
if is_retry then
  local counts = redis.call('HGETALL', KEYS[4])
  local oldest = current - math.ceil(window / bucket) + 1
  local ok, retries = 0, 0
  for i = 1, #counts, 2 do
    local kind, b = string.match(counts[i], '(%a+):(%d+)')
    if tonumber(b) < oldest then redis.call('HDEL', KEYS[4], counts[i])
    elseif kind == 'ok' then ok = ok + tonumber(counts[i + 1])
    else retries = retries + tonumber(counts[i + 1]) end
  end
  if retries >= rmin + ratio * ok then return {'budget', tostring(retries), tostring(ok)} end
  redis.call('HINCRBY', KEYS[4], 'retry:' .. current, 1)
end

if rpm > 0 then redis.call('HSET', KEYS[1], 'rpm_t', rpm_t - 1, 'rpm_at', now) end
if tpm > 0 then redis.call('HSET', KEYS[1], 'tpm_t', tpm_t - est, 'tpm_at', now) end
if not m[2] then redis.call('HSET', KEYS[1], 'limit', limit) end
redis.call('ZADD', KEYS[2], now + permit_ttl, rid)
if probing then
  redis.call('HSET', KEYS[3], 'state', 'half_open', 'probe', rid, 'probe_until', now + probe_ttl)
end
return {'ok', tostring(held + 1), tostring(limit)}
"""

# ARGV: now, rid, outcome (ok | throttled | failed | neutral), ttft (-1: none), reserved
# tokens, used tokens, retry-after (-1: none), tpm, max and min concurrency, failures to
# open, latency factor, bucket seconds, decrease cooldown, backoff and latency factors,
# retry window seconds. Counts older than the window are dropped here, as successes come.
_RELEASE = """
local now, rid, outcome = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local ttft, est, used = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local retry_after, tpm = tonumber(ARGV[7]), tonumber(ARGV[8])
local maxc, minc, to_open = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local factor, bucket, cooldown = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local backoff, latency_backoff = tonumber(ARGV[15]), tonumber(ARGV[16])
local window = tonumber(ARGV[17])
local function refill(saved, at, per_minute)
  local tokens = tonumber(saved) or per_minute
  return math.min(per_minute, tokens + math.max(0, now - (tonumber(at) or now)) * per_minute / 60)
end

if redis.call('ZREM', KEYS[2], rid) == 0 then return 0 end
local m = redis.call('HMGET', KEYS[1], 'limit', 'last_cut', 'ttft_base', 'tpm_t', 'tpm_at')
if tpm > 0 and used < est then
  local t = refill(m[4], m[5], tpm)
  redis.call('HSET', KEYS[1], 'tpm_t', math.min(tpm, t + est - used), 'tpm_at', now)
end
local limit = tonumber(m[1]) or maxc
local function cut(by)
  if now - (tonumber(m[2]) or 0) >= cooldown then
    limit = math.max(minc, limit * by)
    redis.call('HSET', KEYS[1], 'limit', limit, 'last_cut', now)
  end
end
local p = redis.call('HMGET', KEYS[3], 'state', 'probe', 'failures')
local state = p[1] or 'closed'
local probe = state == 'half_open' and p[2] == rid

local current = math.floor(now / bucket)
local oldest = current - math.ceil(window / bucket) + 1
for _, field in ipairs(redis.call('HKEYS', KEYS[4])) do
  if tonumber(string.match(field, ':(%d+)')) < oldest then redis.call('HDEL', KEYS[4], field) end
end
redis.call('EXPIRE', KEYS[4], window * 2)
if outcome == 'ok' then
  redis.call('HINCRBY', KEYS[4], 'ok:' .. current, 1)
  if probe or state == 'closed' then
    redis.call('HSET', KEYS[3], 'state', 'closed', 'failures', 0, 'probe', '')
  end
  if ttft >= 0 then
    local base = tonumber(m[3])
    -- The usual time: quick to learn a faster one, slow to accept a slower one, and never
    -- set by one lucky response.
    if not base then base = ttft
    elseif ttft < base then base = base + (ttft - base) * 0.2
    else base = base + (ttft - base) * 0.01 end
    redis.call('HSET', KEYS[1], 'ttft_base', base)
    if base > 0 and ttft > base * factor then
      cut(latency_backoff)
    else
      redis.call('HSET', KEYS[1], 'limit', math.min(maxc, limit + 1 / math.max(1, limit)))
    end
  end
elseif outcome == 'throttled' or outcome == 'failed' then
  cut(backoff)
  if retry_after >= 0 then
    local paused = tonumber(redis.call('HGET', KEYS[1], 'paused_until')) or 0
    redis.call('HSET', KEYS[1], 'paused_until', math.max(paused, now + retry_after))
  end
  if outcome == 'throttled' and probe then
    -- It answered: the provider is up, only busy; the pause keeps callers off it.
    redis.call('HSET', KEYS[3], 'state', 'closed', 'failures', 0, 'probe', '')
  elseif outcome == 'failed' and probe then
    redis.call('HSET', KEYS[3], 'state', 'open', 'opened_at', now, 'probe', '')
  elseif outcome == 'failed' and state == 'closed' then
    if redis.call('HINCRBY', KEYS[3], 'failures', 1) >= to_open then
      redis.call('HSET', KEYS[3], 'state', 'open', 'opened_at', now, 'failures', 0)
    end
  end
elseif probe then
  redis.call('HSET', KEYS[3], 'probe', '')
end
return 1
"""


@dataclass(frozen=True)
class Permit:
    """Leave to send one request to `model`; given back through `release`."""

    model: str
    request_id: str
    reserved_tokens: int


@dataclass(frozen=True)
class Denial:
    """Why a model cannot take the request now. `kind` is "wait" (it may in `wait_s`),
    "budget" (the provider's retry budget is spent) or "too_big" (never, at this TPM)."""

    kind: str
    wait_s: float
    reason: str
    # For waits: breaker | probe | paused | concurrency | rpm | tpm.
    why: str = ""


@dataclass(frozen=True)
class Outcome:
    kind: str  # ok | throttled | failed | neutral
    ttft_s: float | None = None
    used_tokens: int = 0
    retry_after_s: float | None = None


def keys(model: str, config: FlowConfig) -> list[str]:
    return [
        f"sluice:flow:model:{model}",
        f"sluice:flow:model:{model}:permits",
        f"sluice:flow:provider:{config.provider}",
        f"sluice:flow:provider:{config.provider}:window",
    ]


def acquire(
    model: str, config: FlowConfig, request_id: str, tokens: int, *, retry: bool
) -> Permit | Denial:
    reply = redis_client().eval(
        _ACQUIRE,
        4,
        *keys(model, config),
        time.time(),
        request_id,
        tokens,
        config.rpm or 0,
        config.tpm or 0,
        config.max_concurrency,
        config.breaker_open_s,
        int(retry),
        config.retry_ratio,
        config.retry_min,
        RETRY_WINDOW_S,
        BUCKET_S,
        PERMIT_TTL_S,
        PROBE_TTL_S,
        CONCURRENCY_POLL_S,
    )
    kind, *rest = (part.decode() for part in reply)
    if kind == "ok":
        return Permit(model, request_id, tokens)
    if kind == "budget":
        retries, successes = rest
        return Denial(
            "budget",
            0.0,
            f"{config.provider}'s retry budget is spent: {retries} retries against"
            f" {successes} successes in the last {RETRY_WINDOW_S} s"
            f" (at most {config.retry_ratio:g} per success + {config.retry_min})",
        )
    if kind == "too_big":
        return Denial("too_big", 0.0, f"{model} needs {tokens} tokens, over its TPM of {rest[0]}")
    wait_s, why, figure = float(rest[0]), rest[1], rest[2]
    return Denial("wait", wait_s, _wait_reason(model, config, why, figure, wait_s), why)


def _wait_reason(model: str, config: FlowConfig, why: str, figure: str, wait_s: float) -> str:
    if why == "breaker":
        return f"{config.provider}'s circuit breaker is open for {wait_s:.1f} s more"
    if why == "probe":
        return f"{config.provider}'s circuit breaker is half-open and a probe is in flight"
    if why == "paused":
        return f"{config.provider} asked to retry after {wait_s:.1f} s (Retry-After)"
    if why == "concurrency":
        return f"{model} is at its concurrency limit of {figure}"
    return f"{model} is at its {why.upper()} limit of {figure}; next room in {wait_s:.1f} s"


def release(config: FlowConfig, permit: Permit, outcome: Outcome) -> None:
    """Gives the permit back and feeds the outcome to the limiter, breaker and budget. A
    Redis failure here is logged, not raised: the permit expires on its own."""
    try:
        redis_client().eval(
            _RELEASE,
            4,
            *keys(permit.model, config),
            time.time(),
            permit.request_id,
            outcome.kind,
            -1 if outcome.ttft_s is None else outcome.ttft_s,
            permit.reserved_tokens,
            outcome.used_tokens,
            -1 if outcome.retry_after_s is None else outcome.retry_after_s,
            config.tpm or 0,
            config.max_concurrency,
            config.min_concurrency,
            config.breaker_failures,
            config.latency_factor,
            BUCKET_S,
            DECREASE_COOLDOWN_S,
            BACKOFF_FACTOR,
            LATENCY_BACKOFF_FACTOR,
            RETRY_WINDOW_S,
        )
    except RedisError:
        logger.warning("flow: could not release %s's permit; it expires", permit.model)
