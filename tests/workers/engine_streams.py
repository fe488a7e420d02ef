"""Reading an engine's stream whole, checking the interface's promise on the way: token
deltas, then exactly one Finished, then nothing."""

from workers.inference.base import Engine, Finished, GenerationRequest, TokenDelta


async def collect(engine: Engine, req: GenerationRequest) -> tuple[list[TokenDelta], Finished]:
    deltas: list[TokenDelta] = []
    finished: list[Finished] = []
    async for item in engine.generate(req):
        assert not finished, "an item came after Finished"
        if isinstance(item, Finished):
            finished.append(item)
        else:
            deltas.append(item)
    assert len(finished) == 1
    return deltas, finished[0]
