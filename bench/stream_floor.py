"""The stream benchmark's floor: a bare WebSocket server fed by raw Redis pub/sub.

    python -m bench.stream_floor --port PORT --redis REDIS_URL

A client connecting to `/ws/runs/<run id>/` gets a `hello`, then every message published
on the Redis channel `floor.<run id>` as it is, one WebSocket text message each (the
producer publishes `{"type": "frames", "frames": [...]}`, the same messages the real feed
sends). Acks are read and ignored. No authentication, no database, no storage, no
catch-up, no window: the least a server can do to carry those frames, on the same
WebSocket library, event loop (uvloop) and Redis client as the real one, and like it
without compression (the web processes run without permessage-deflate:
sluice.processes.asgi_argv). Prints `ready` on stdout once it listens and is subscribed.
"""

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

PREFIX = "floor."
PATH_PREFIX = "/ws/runs/"

followers: dict[str, set[ServerConnection]] = {}
ready = asyncio.Event()


def channel(run_id: str) -> str:
    return f"{PREFIX}{run_id}"


async def follow(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else ""
    run_id = path.removeprefix(PATH_PREFIX).strip("/")
    if not path.startswith(PATH_PREFIX) or not run_id:
        await ws.close(4404, "no such run")
        return
    followers.setdefault(run_id, set()).add(ws)
    try:
        hello = {"type": "hello", "run": run_id, "status": "running", "after": 0}
        await ws.send(json.dumps(hello))
        async for _ack in ws:
            pass
    except ConnectionClosed:
        pass
    finally:
        followers[run_id].discard(ws)
        if not followers[run_id]:
            del followers[run_id]


async def forward(client: Any) -> None:
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{PREFIX}*")
    ready.set()
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is None or message["type"] != "pmessage":
            continue
        run_id = message["channel"].decode()[len(PREFIX) :]
        for ws in list(followers.get(run_id, ())):
            with contextlib.suppress(ConnectionClosed):
                await ws.send(message["data"], text=True)


async def main(port: int, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    async with serve(follow, "127.0.0.1", port, compression=None):
        forwarder = asyncio.create_task(forward(client))
        await ready.wait()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await forwarder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.stream_floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.redis))
