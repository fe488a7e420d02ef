"""The feed of real runs on real workers: an LLM step's tokens arrive as frames that add up
to its output exactly, followed by its `done`; a failing step's error arrives in its frame;
the run's end is the last word."""

from typing import Any

import pytest
from asgiref.sync import async_to_sync

from apps.runs.models import Event, Run, Step
from apps.tenants.context import tenant_context
from tests.conftest import World
from tests.harness.platform import Platform
from tests.live.feedkit import Follower, bearer, queued_run, seqs
from tests.runs.helpers import wait_for_run

pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

FAN_OUT_LLM: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "config": {"example": {"qs": ["a", "b", "c"]}}},
        {"id": "each", "type": "fanout.split", "config": {"field": "qs"}},
        {"id": "ask", "type": "llm.generate", "config": {"prompt": "{{ item }}", "max_tokens": 40}},
    ],
    "edges": [["in", "each"], ["each", "ask"]],
}

FAILING: dict[str, Any] = {
    "nodes": [
        {"id": "in", "type": "source.manual", "config": {"example": {"x": 1}}},
        {
            "id": "call",
            "type": "tool.http",
            "config": {"url": "http://127.0.0.1:9/never", "method": "POST"},
            "retry": {"max_attempts": 1},
        },
    ],
    "edges": [["in", "call"]],
}


FINAL = {"succeeded", "failed", "cancelled", "budget_exceeded"}


def follow_to_the_end(run: Run, key: str) -> list[dict[str, Any]]:
    async def scenario() -> list[dict[str, Any]]:
        follower = Follower(run.id, headers=[(b"authorization", key.encode())])
        await follower.connect()
        while not any(f["type"] == "run" and f["status"] in FINAL for f in follower.frames):
            await follower.receive(timeout=30)
            await follower.ack(follower.frames[-1]["seq"] if follower.frames else 0)
        await follower.disconnect()
        return follower.frames

    frames: list[dict[str, Any]] = async_to_sync(scenario)()
    return frames


def test_token_frames_add_up_to_each_steps_output(world: World, platform: Platform) -> None:
    run = queued_run(world, FAN_OUT_LLM, payload={"qs": ["a", "b", "c"]})
    frames = follow_to_the_end(run, bearer(world.acme))
    assert seqs(frames) == list(range(1, len(frames) + 1))
    assert frames[-1] == {**frames[-1], "type": "run", "status": "succeeded"}
    wait_for_run(run)
    with tenant_context(world.acme):
        asks = list(Step.objects.filter(run=run, node_id="ask"))
        events = Event.objects.filter(producer__in=asks)
        outputs = {e.producer_id: e.payload["text"] for e in events}
    assert len(asks) == 3
    for step in asks:
        mine = [f for f in frames if f.get("step") == str(step.id)]
        tokens = [f for f in mine if f["type"] == "tokens"]
        assert "".join(f["text"] for f in tokens) == outputs[step.id]
        assert [f["offset"] for f in tokens] == [
            sum(len(t["text"]) for t in tokens[:i]) for i in range(len(tokens))
        ]
        assert sum(f["tokens"] for f in tokens) == step.tokens_out
        statuses = [f["status"] for f in mine if f["type"] == "step"]
        assert statuses[-1] == "done"
        assert mine.index(tokens[-1]) < len(mine) - 1  # done comes after the last tokens


def test_a_failing_steps_error_is_in_its_frame(world: World, platform: Platform) -> None:
    run = queued_run(world, FAILING)
    frames = follow_to_the_end(run, bearer(world.acme))
    dead = [f for f in frames if f["type"] == "step" and f["status"] == "dead"]
    assert len(dead) == 1 and dead[0]["node"] == "call"
    with tenant_context(world.acme):
        step = Step.objects.get(run=run, node_id="call")
    assert dead[0]["error"] == step.error and step.error
    assert frames[-1]["type"] == "run" and frames[-1]["status"] == "failed"
