"""The asyncio interface of the engine.

    async with AsyncEngine(Engine(model, scheduler="nexus")) as engine:
        async for event in engine.stream(prompt_ids, SamplingParams(max_new_tokens=32)):
            print(event.token)
        output = await engine.generate(other_prompt)

One background task owns the engine: it applies submissions and cancellations *between* steps and
runs each step in a worker thread (`asyncio.to_thread`), so the event loop stays responsive while
a forward runs and the engine is never touched from two threads at once. Bad input (a prompt that
can never fit, ...) raises at `submit`, in the caller, and disturbs no other request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from llmsys.serve.engine import Engine, RequestOutput, TokenEvent
from llmsys.serve.errors import EngineClosedError, RequestNotFoundError
from llmsys.serve.request import SamplingParams

logger = logging.getLogger(__name__)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class AsyncEngine:
    """An `Engine` driven by a background asyncio task."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: list[Callable[[], None]] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._reserved_ids: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._error: BaseException | None = None

    async def __aenter__(self) -> AsyncEngine:
        self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _start(self) -> None:
        if self._error is not None:
            raise EngineClosedError(f"the engine failed earlier: {self._error!r}")
        if self._closed:
            raise EngineClosedError("the AsyncEngine was closed; create a new one")
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    # ------------------------------------------------------------------------------------------
    async def submit(
        self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request; returns its id (raises here on bad input)."""
        self._start()
        if request_id is not None and request_id in self._reserved_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        live = self.engine.prepare(prompt, params, request_id)
        rid = live.state.request_id
        self._reserved_ids.add(rid)
        self._queues[rid] = asyncio.Queue()
        self._inbox.append(lambda: self.engine.enqueue(live))
        self._wake.set()
        return rid

    async def events(self, request_id: str) -> AsyncIterator[TokenEvent]:
        """The tokens of a submitted request as they are generated (ends when it finishes or is cancelled)."""
        queue = self._queues.get(request_id)
        if queue is None:
            raise RequestNotFoundError(f"no request {request_id!r} is being streamed by this AsyncEngine")
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(request_id, None)

    async def stream(
        self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Submit a request and yield its tokens."""
        rid = await self.submit(prompt, params, request_id)
        async for event in self.events(rid):
            yield event

    async def generate(
        self, prompt: Sequence[int] | torch.Tensor, params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """Submit a request and wait for its output."""
        rid = await self.submit(prompt, params, request_id)
        async for _ in self.events(rid):
            pass
        return self.engine.output(rid)

    async def cancel(self, request_id: str) -> None:
        """Cancel a request (applied before the next step); its stream ends."""
        self._start()
        self._inbox.append(lambda: self._cancel(request_id))
        self._wake.set()

    def _cancel(self, request_id: str) -> None:
        try:
            self.engine.cancel(request_id)
        except RequestNotFoundError:
            logger.warning("cancel: no request %r", request_id)

    async def close(self) -> None:
        """Stop the background task, end every stream and free every page."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self.engine.close()
        for queue in self._queues.values():
            queue.put_nowait(None)

    # ------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._closed:
            inbox, self._inbox = self._inbox, []
            for action in inbox:
                action()
            self._signal_finished()
            if not self.engine.has_work():
                self._wake.clear()
                if not self._inbox and not self._closed:
                    await self._wake.wait()
                continue
            try:
                events = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # a broken step fails every open stream, loudly
                logger.exception("llmsys.serve engine step failed")
                self._error = exc
                for queue in self._queues.values():
                    queue.put_nowait(_Failed(exc))
                self._closed = True
                return
            for event in events:
                queue = self._queues.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)
            self._signal_finished()

    def _signal_finished(self) -> None:
        # requests that ended without a final token event (cancelled) end their streams
        for rid, queue in self._queues.items():
            if rid in self._reserved_ids and self.engine.is_finished(rid):
                out = self.engine.output(rid)
                if out.finish_reason == "cancelled":
                    queue.put_nowait(None)
                self._reserved_ids.discard(rid)


__all__ = ["AsyncEngine"]
