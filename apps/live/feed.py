"""Where a run's feed lives in Redis, and the script that numbers, stores and publishes
frames in one step. Shared by the writer (publisher.py) and the readers (store.py).

- `sluice:feed:{<run>}:seq`: the run's frame counter.
- `sluice:feed:{<run>}`: a Redis stream of the run's recent frames, entry id `<seq>-0`,
  field `f` = the frame's JSON. PostgreSQL (RunFrame) has them all; this is the hot tail.
- `sluice:feed:t<tenant>:{<run>}`: the pub/sub channel live followers hear, partitioned by
  tenant and run. The script publishes each batch there as `<first seq> <last seq>\n`
  followed by the frames' JSON objects, one per line (JSON text has no raw newline): a web
  process's hub (apps/live/hub.py) reads the header only and passes the text on unparsed.
"""

import asyncio
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aioredis
from django.conf import settings

# How long Redis keeps a run's tail after its last frame (PostgreSQL keeps everything),
# and its counter (a run quiet for longer re-seeds it from PostgreSQL).
STREAM_TTL_S = 3600
COUNTER_TTL_S = 7 * 86400
STREAM_MAX_LEN = 20_000
# Redis connections per web process for feed reads and viewer bookkeeping (the hub's
# subscription has its own): each is held for one short round trip.
ASYNC_POOL_SIZE = 400


def run_channel(tenant_id: int, run_id: object) -> str:
    return f"sluice:feed:t{tenant_id}:{{{run_id}}}"


def counter_key(run_id: object) -> str:
    # The braces keep a run's two keys in one Redis Cluster slot (the script needs both).
    return f"sluice:feed:{{{run_id}}}:seq"


def stream_key(run_id: object) -> str:
    return f"sluice:feed:{{{run_id}}}"


def numbered(seq: int, body: str) -> str:
    """A frame body (a JSON object without seq) with its sequence number first; the script
    does the same in Lua."""
    return f'{{"seq":{seq},{body[1:]}' if body != "{}" else f'{{"seq":{seq}}}'


def seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.split("-", 1)[0])


# KEYS: counter, stream. ARGV: run channel, stream ttl, counter ttl, stream max length,
# then the frames (JSON objects without seq). Returns the first frame's seq, or -1 when the
# run has no counter (new, or expired): the caller seeds it from PostgreSQL and tries again.
APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = #ARGV - 4
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
local frames = {}
for i = 1, n do
  local seq = first + i - 1
  local body = ARGV[4 + i]
  local frame
  if body == '{}' then frame = '{"seq":' .. seq .. '}'
  else frame = '{"seq":' .. seq .. ',' .. string.sub(body, 2) end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], seq .. '-0', 'f', frame)
  frames[i] = frame
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[1], first .. ' ' .. last .. '\\n' .. table.concat(frames, '\\n'))
return first
"""


T = TypeVar("T")


def feed_redis_url() -> str:
    return str(settings.SLUICE_FEED_REDIS_URL)


@cache
def feed_redis() -> Any:
    """A thread-safe client (connection pool) for this process."""
    return redis.Redis.from_url(feed_redis_url(), socket_timeout=5, socket_connect_timeout=5)


class PerLoop(Generic[T]):
    """One T per running event loop, made on first use. A web process has one loop; tests
    run one per scenario, and what a loop's T holds (connections, tasks) is that loop's."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        found = self._by_loop.get(loop)
        if found is None:
            found = self._by_loop[loop] = self._make()
        return found


def _async_client() -> Any:
    # A blocking pool: at its limit a caller waits for a connection instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(
        feed_redis_url(), max_connections=ASYNC_POOL_SIZE, timeout=10, socket_connect_timeout=5
    )
    return aioredis.Redis(connection_pool=pool)


_async_clients: PerLoop[Any] = PerLoop(_async_client)


def async_feed_redis() -> Any:
    """The asyncio client of the running event loop."""
    return _async_clients.get()
