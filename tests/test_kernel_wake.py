"""Stage workers are woken by the stage before them, not only by their poll."""

from __future__ import annotations

import asyncio

import pytest

from careloop.pipeline import run_stage


class _Stage:
    name = "probe"

    def __init__(self, results: list[int]) -> None:
        self.results, self.calls = results, asyncio.Queue[int]()

    async def run_once(self) -> int:
        n = self.results.pop(0) if self.results else 0
        await self.calls.put(n)
        return n


@pytest.mark.anyio
async def test_a_woken_stage_runs_at_once_and_wakes_the_next() -> None:
    stop, wake, then = asyncio.Event(), asyncio.Event(), asyncio.Event()
    stage = _Stage([0, 3])
    # An hour's poll: only ``wake`` can bring the second run within the test's patience.
    task = asyncio.create_task(run_stage(stage, stop, idle=3600, wake=wake, then=then))
    assert await asyncio.wait_for(stage.calls.get(), 5) == 0
    assert not then.is_set()
    wake.set()
    assert await asyncio.wait_for(stage.calls.get(), 5) == 3  # woken, not polled
    await asyncio.wait_for(then.wait(), 5)  # it handled work: the next stage is woken
    stop.set()
    await asyncio.wait_for(task, 5)
