"""The serving core: queues, page reservations and lanes, shared by the engine and the simulator.

The core never runs a model and never reads a clock. The real engine and the simulator both drive
it the same way: `add` requests, ask `schedule(lane, now)` for a lane's batch, execute the batch
(a forward on the model, or the cost model's latency on a virtual clock), then `complete(batch, now,
stopped)`. So a scheduler sees exactly the same states in both, which is what lets the simulator's
prediction be checked against the engine's measurement (benchmarks/serve.py).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from llmsys.serve.errors import PromptTooLongError, SchedulerConfigError
from llmsys.serve.request import Batch, RequestState
from llmsys.serve.schedulers import Scheduler, SchedulerState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """What a finished batch did to one request."""

    request: RequestState
    new_token: bool  # a token was produced (the prompt finished, or a decode step)
    finished: bool


class ServingCore:
    """Queues and page reservations of one engine (or one simulation), driven lane by lane."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        page_size: int,
        num_pages: int,
        max_num_seqs: int,
        concurrent: bool,
    ):
        if page_size < 1 or num_pages < 1 or max_num_seqs < 1:
            raise SchedulerConfigError(
                f"need page_size, num_pages and max_num_seqs >= 1, got {page_size}, {num_pages}, {max_num_seqs}"
            )
        self.scheduler = scheduler
        scheduler.reset()
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.concurrent = concurrent
        self.waiting: list[RequestState] = []
        self.decoding: list[RequestState] = []
        self.in_flight: dict[str, Batch] = {}
        self.reserved_pages = 0
        self.admitted = 0

    # ------------------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return self.num_pages - self.reserved_pages

    @property
    def lanes(self) -> tuple[str, ...]:
        return self.scheduler.lanes

    def has_work(self) -> bool:
        return bool(self.waiting or self.decoding or self.in_flight)

    def check_fits(self, req: RequestState) -> None:
        """Raise PromptTooLongError if the request could never be admitted, whatever else runs."""
        need = req.pages_needed(self.page_size)
        if need > self.num_pages:
            raise PromptTooLongError(
                f"request {req.request_id}: prompt of {req.prompt_len} tokens + max_new_tokens={req.max_new_tokens} "
                f"needs {need} pages of {self.page_size} tokens, but the KV pool has {self.num_pages} pages "
                f"({self.num_pages * self.page_size} tokens). Shorten the prompt, lower max_new_tokens, or give the "
                "engine more pages (num_pages=...)."
            )

    def add(self, req: RequestState) -> None:
        self.check_fits(req)
        self.waiting.append(req)

    def state(self, now: float) -> SchedulerState:
        return SchedulerState(
            now=now,
            waiting=self.waiting,
            decoding=self.decoding,
            page_size=self.page_size,
            free_pages=self.free_pages,
            num_pages=self.num_pages,
            max_num_seqs=self.max_num_seqs,
            admitted=self.admitted,
            held_share={lane: b.sm_share for lane, b in self.in_flight.items()},
            concurrent=self.concurrent,
            _on_admit=self._admitted,
        )

    def _admitted(self, req: RequestState) -> None:
        self.reserved_pages += req.reserved_pages
        self.admitted += 1

    # ------------------------------------------------------------------------------------------
    def schedule(self, lane: str, now: float) -> Batch | None:
        """Ask the scheduler for `lane`'s next batch (None if the lane is busy or has nothing)."""
        if lane in self.in_flight:
            return None
        batch = self.scheduler.schedule(lane, self.state(now))
        if not batch:
            return None
        self._validate(batch, lane)
        for req in batch.requests:
            req.busy = True
        self.in_flight[lane] = batch
        return batch

    def _validate(self, batch: Batch, lane: str) -> None:
        # A scheduler is user-extensible: catch a broken one here, not as a wrong token later.
        name = type(self.scheduler).__name__
        if batch.lane != lane:
            raise SchedulerConfigError(f"{name} returned a batch for lane {batch.lane!r} when asked for {lane!r}")
        reqs = batch.requests
        if len({id(r) for r in reqs}) != len(reqs) or any(r.busy or r.finished or not r.reserved_pages for r in reqs):
            bad = [r.request_id for r in reqs if r.busy or r.finished or not r.reserved_pages] or ["(a repeated one)"]
            raise SchedulerConfigError(
                f"{name} scheduled request {bad[0]} that is busy, finished, repeated or not admitted"
            )
        for req, n in batch.prefill:
            if not 0 < n <= req.remaining_prefill:
                raise SchedulerConfigError(
                    f"{name}: chunk of {n} tokens for {req.request_id} with {req.remaining_prefill} left to prefill"
                )
        for req in batch.decode:
            if not req.prefill_done:
                raise SchedulerConfigError(f"{name}: decode of {req.request_id} before its prompt is prefilled")

    def complete(self, batch: Batch, now: float, stopped: Collection[str] = ()) -> list[Completion]:
        """Apply a finished batch: prompt progress, new tokens, finished requests (pages released).

        `stopped` holds the ids of requests whose new token ends them (EOS; the simulator's output
        lengths). A request cancelled while its batch ran is finished here, its token dropped.
        """
        if self.in_flight.get(batch.lane) is not batch:
            raise RuntimeError(f"batch of lane {batch.lane!r} completed but not in flight")
        del self.in_flight[batch.lane]
        out: list[Completion] = []
        for req, n in batch.prefill:
            req.busy = False
            req.prefilled += n
            if req.cancel_requested:
                self.finish(req, "cancelled", now)
                out.append(Completion(req, False, True))
                continue
            if not req.prefill_done:
                out.append(Completion(req, False, False))
                continue
            self.waiting.remove(req)
            bisect.insort(self.decoding, req, key=_arrival)  # decode queue in arrival order (FCFS)
            req.first_token_time = now
            out.append(self._token(req, now, stopped))
        for req in batch.decode:
            req.busy = False
            if req.cancel_requested:
                self.finish(req, "cancelled", now)
                out.append(Completion(req, False, True))
                continue
            out.append(self._token(req, now, stopped))
        return out

    def _token(self, req: RequestState, now: float, stopped: Collection[str]) -> Completion:
        req.generated += 1
        req.token_times.append(now)
        if req.request_id in stopped:
            self.finish(req, "stop", now)
        elif req.generated >= req.max_new_tokens:
            self.finish(req, "length", now)
        return Completion(req, True, req.finished)

    def finish(self, req: RequestState, reason: str, now: float) -> None:
        """Take a request out of the queues and release its reservation."""
        if req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.decoding:
            self.decoding.remove(req)
        if req.reserved_pages:
            self.reserved_pages -= req.reserved_pages
            self.admitted -= 1
            req.reserved_pages = 0
        req.finished = True
        req.finish_reason = reason
        req.finish_time = now

    def cancel(self, req: RequestState, now: float) -> bool:
        """Cancel a request: finished now (True), or when its running batch completes (False)."""
        if req.finished:
            return True
        req.cancel_requested = True
        if req.busy:
            return False
        self.finish(req, "cancelled", now)
        return True


def _arrival(req: RequestState) -> float:
    return req.arrival


def run_serial_round(
    core: ServingCore,
    now: Callable[[], float],
    execute: Callable[[Batch], Collection[str]],
    on_complete: Callable[[Batch, list[Completion]], None] | None = None,
) -> int:
    """One round over the scheduler's lanes, one forward at a time; returns the batches run.

    The real engine on a CPU and the simulator's serial mode both use this: `execute(batch)` runs
    the batch (the model, or a virtual clock advanced by the cost model) and returns the ids of the
    requests its tokens stopped.
    """
    ran = 0
    for lane in core.lanes:
        batch = core.schedule(lane, now())
        if batch is None:
            continue
        stopped = execute(batch)
        done = core.complete(batch, now(), stopped)
        if on_complete is not None:
            on_complete(batch, done)
        ran += 1
    return ran


__all__ = ["Completion", "ServingCore", "run_serial_round"]
