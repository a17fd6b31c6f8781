"""llama-server's continuous batching, simulated: the load a real GPU puts on a router.

A real llama-server with ``-np 32`` does not pace each stream on its own clock. It runs one
loop: each step decodes one token for *every* generating slot at once, and the prompts of
requests that arrived while a step ran are evaluated (prefilled) in the next step, which lasts
longer by their prefill time. So tokens of all streams leave in the same instant, 32 streams
that started together end together and restart together, and a request that reaches the
server a moment after a step began waits for that step and the next: the cost of arriving late.

:class:`GpuSteps` is that loop. ``await prefill(n)`` returns when the step that evaluated this
prompt of ``n`` uncached tokens ended (its first token is then due); ``await step()`` returns at
the end of the next decode step. A step lasts ``1 / tokens_per_sec`` plus the prefill time of
the prompts it took in (``tokens / prompt_tokens_per_sec``). With nobody decoding or waiting the
loop sleeps.
"""

from __future__ import annotations

import asyncio


class GpuSteps:
    def __init__(self, tokens_per_sec: float, prompt_tokens_per_sec: float) -> None:
        if tokens_per_sec <= 0:
            raise ValueError("GPU steps need a token rate")
        self.decode_s = 1.0 / tokens_per_sec
        self.prompt_rate = prompt_tokens_per_sec  # 0: prompts cost nothing beyond their step
        self._current: asyncio.Future[None] | None = None  # the step running now
        self._next: asyncio.Future[None] | None = None  # the step that takes in new prompts
        self._prefill_tokens = 0  # of prompts waiting for the next step
        self._users = 0  # awaiting a step
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0

    def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def prefill(self, uncached_tokens: int) -> None:
        """Wait for the step that evaluates this prompt (it also yields the first token)."""
        self._ensure_running()
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self._prefill_tokens += max(uncached_tokens, 0)
        await self._wait(self._next)

    async def step(self) -> None:
        """Wait for the end of the decode step running now (or of the next one, if idle)."""
        self._ensure_running()
        if self._current is None or self._current.done():
            if self._next is None:
                self._next = asyncio.get_running_loop().create_future()
            await self._wait(self._next)
        else:
            await self._wait(self._current)

    async def _wait(self, future: asyncio.Future[None]) -> None:
        self._users += 1
        try:
            await asyncio.shield(future)
        finally:
            self._users -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._users == 0 and self._next is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            step = self._next if self._next is not None else loop.create_future()
            self._next = None
            prefill, self._prefill_tokens = self._prefill_tokens, 0
            self._current = step
            await asyncio.sleep(self.decode_s + (prefill / self.prompt_rate if self.prompt_rate > 0 else 0.0))
            self.steps += 1
            # Its waiters resume only after this loop has started the next step (their count is
            # still up), so a stream that writes its token and asks again waits one step exactly.
            step.set_result(None)
