"""The schedulers, behind one interface shared by the real engine and the simulator.

A scheduler owns no requests. The serving core (`core.py`) asks it, whenever one of its lanes is
idle, for that lane's next batch, handing it a `SchedulerState`: the queues in arrival order, the
page budget and the SM shares held by the other lanes' running batches.

* `FCFSPrefillFirst` (vLLM v0), one mixed lane: whole prompts first (FCFS, up to a token budget);
  decode only when no prompt waits.
* `ChunkedPrefill` (Sarathi-Serve / vLLM v1), one mixed lane: every decode first, then prompt chunks
  (FCFS) up to the token budget.
* `StaticSplit`, prefill + decode lanes: FCFS prompt chunks and decode concurrently on a fixed split.
* `Nexus`, prefill + decode lanes: shortest-prompt-first prefill, FCFS decode, the split chosen per
  batch by the cost model.

Memory: a request is admitted (its lifetime pages reserved) when its first chunk is scheduled; the
reservation makes preemption unnecessary (vLLM preempts and recomputes instead: simpler here, and
documented in docs/serve.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from llmsys.registry import register_method
from llmsys.serve.costmodel import BatchWork, CostModel, Profile
from llmsys.serve.errors import SchedulerConfigError
from llmsys.serve.request import Batch, RequestState


@dataclass
class SchedulerState:
    """What a scheduler may look at and do when it builds one lane's batch."""

    now: float
    waiting: list[RequestState]  # arrived, prompt not fully prefilled, arrival order
    decoding: list[RequestState]  # prompt done, generating, arrival order
    page_size: int
    free_pages: int  # pages not reserved by an admitted request
    num_pages: int  # pages of the KV pool (reserved + free)
    max_num_seqs: int  # most requests admitted at once
    admitted: int  # requests admitted now
    held_share: dict[str, float] = field(default_factory=dict)  # lane -> SM share of its running batch
    concurrent: bool = True  # lanes really run at once (GPU); False: one forward at a time
    _on_admit: Callable[[RequestState], None] | None = None

    def try_admit(self, req: RequestState) -> bool:
        """Reserve the request's lifetime pages if it is not admitted yet; False if they do not fit."""
        if req.reserved_pages:
            return True
        need = req.pages_needed(self.page_size)
        if need > self.free_pages or self.admitted >= self.max_num_seqs:
            return False
        req.reserved_pages = need
        self.free_pages -= need
        self.admitted += 1
        if self._on_admit is not None:
            self._on_admit(req)
        return True

    def available_share(self, lane: str) -> float:
        """The SM share the other lanes' running batches leave free."""
        return max(0.0, 1.0 - sum(s for other, s in self.held_share.items() if other != lane))


def _take_prompts(
    queue: Iterable[RequestState], state: SchedulerState, budget: int, *, chunk: bool
) -> list[tuple[RequestState, int]]:
    """Prompt (chunks) from `queue` in its order, up to `budget` tokens, admitting as it goes.

    Stops at the first request that cannot be admitted (no head-of-line overtaking, as in vLLM). With
    `chunk=False` a prompt is taken whole; one longer than the budget is taken alone.
    """
    out: list[tuple[RequestState, int]] = []
    left = budget
    for req in queue:
        if left <= 0:
            break
        if req.busy or req.cancel_requested:
            continue
        remaining = req.remaining_prefill
        if not chunk and remaining > left and out:
            break
        if not state.try_admit(req):
            break
        n = min(remaining, left) if chunk else remaining
        out.append((req, n))
        left -= n
    return out


def _ready_decodes(state: SchedulerState, limit: int | None = None) -> list[RequestState]:
    ready = [r for r in state.decoding if not r.busy and not r.cancel_requested]
    return ready if limit is None else ready[:limit]


class Scheduler(ABC):
    """Builds each lane's next batch. Subclasses are small dataclasses of hyper-parameters."""

    name: ClassVar[str] = "scheduler"
    lanes: ClassVar[tuple[str, ...]] = ("mixed",)

    @abstractmethod
    def schedule(self, lane: str, state: SchedulerState) -> Batch | None:
        """The next batch of `lane`, or None if it has nothing to run now."""

    def reset(self) -> None:  # noqa: B027 - optional hook, most schedulers keep no state
        """Forget per-run state (called when a core starts)."""

    @property
    def disaggregated(self) -> bool:
        return self.lanes == ("prefill", "decode")


@register_method("fcfs_prefill_first", plugin="serve")
@dataclass
class FCFSPrefillFirst(Scheduler):
    """vLLM v0: waiting prompts are prefilled whole, first come first served, before any decode."""

    max_batch_tokens: int = 8192

    name: ClassVar[str] = "fcfs"

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise SchedulerConfigError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")

    def schedule(self, lane: str, state: SchedulerState) -> Batch | None:
        prefill = _take_prompts(state.waiting, state, self.max_batch_tokens, chunk=False)
        if prefill:
            return Batch(lane, prefill=prefill)
        decode = _ready_decodes(state)
        return Batch(lane, decode=decode) if decode else None


@register_method("chunked_prefill", plugin="serve")
@dataclass
class ChunkedPrefill(Scheduler):
    """Sarathi-Serve / vLLM v1: every running decode first, then prompt chunks up to `token_budget`."""

    token_budget: int = 2048

    name: ClassVar[str] = "chunked"

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise SchedulerConfigError(f"token_budget must be >= 1, got {self.token_budget}")

    def schedule(self, lane: str, state: SchedulerState) -> Batch | None:
        decode = _ready_decodes(state, self.token_budget)
        prefill = _take_prompts(state.waiting, state, self.token_budget - len(decode), chunk=True)
        batch = Batch(lane, prefill=prefill, decode=decode)
        return batch if batch else None


@register_method("static_split", plugin="serve")
@dataclass
class StaticSplit(Scheduler):
    """Prefill and decode on two concurrent lanes with a fixed SM split (no adaptation)."""

    prefill_share: float = 0.5
    prefill_budget: int = 4096

    name: ClassVar[str] = "static"
    lanes: ClassVar[tuple[str, ...]] = ("prefill", "decode")

    def __post_init__(self) -> None:
        if not 0 < self.prefill_share < 1:
            raise SchedulerConfigError(f"prefill_share must lie in (0, 1), got {self.prefill_share}")
        if self.prefill_budget < 1:
            raise SchedulerConfigError(f"prefill_budget must be >= 1, got {self.prefill_budget}")

    def schedule(self, lane: str, state: SchedulerState) -> Batch | None:
        if lane == "prefill":
            prefill = _take_prompts(state.waiting, state, self.prefill_budget, chunk=True)
            return Batch(lane, prefill=prefill, sm_share=self.prefill_share) if prefill else None
        decode = _ready_decodes(state)
        return Batch(lane, decode=decode, sm_share=1.0 - self.prefill_share) if decode else None


@register_method("nexus", plugin="serve")
@dataclass
class Nexus(Scheduler):
    """Nexus: prefill and decode on disjoint SM partitions, the split chosen per batch.

    Prefill queue shortest-prompt-first (remaining tokens), decode queue FCFS. Our addition, a
    starvation guard: prompts that waited longer than `starvation_guard * ttft_slo` go first, oldest
    first (None: pure SPF, under which a long prompt can wait forever). SPF serves fresh short prompts
    at once; the tail is the long prompts it passes over, so the guard is tight (0.1: under 0.5 the
    arXiv-like P99 TTFT lost to chunked prefill on 7 of 10 workload seeds, under 0.1 on 1 of 10, in
    the simulator; chosen on seeds 0-4, checked on 5-9, docs/serve.md). When the prefill lane
    is about to launch, the cost model predicts both phases' latencies for every split at the SM
    granularity (8 SMs on Hopper), each next to the other (bandwidth contention). The split is then
    chosen by a greedy walk from the current one, one partition step at a time:

    1. while the decode latency misses the TBT target, give decode a step (unless it no longer helps:
       decode is saturated);
    2. while the prefill still speeds up by more than `hysteresis` and decode keeps its target, give
       prefill a step;
    3. while prefill is saturated (a step less costs it under `hysteresis`), give the step to decode.

    The TBT target is relaxed with the TTFT pressure of the prefill queue: with `pressure` = (the
    oldest waiting prompt's wait + the batch's prefill time) / (`ttft_headroom` * ttft_slo), clipped
    to [0, 1], the target is `tbt_slo * (floor + (tbt_headroom - floor) * pressure)`: with no
    backlog decode gets SMs until its TBT is inside `floor` of the SLO; as prompts age, prefill takes
    SMs until decode sits just inside it. Our addition, the floor follows the server's load
    (`load`: the larger of the shares of sequence seats and KV pages that admitted requests hold,
    mapped linearly from `load_range[0]` -> 0 to `load_range[1]` -> 1): `floor = tbt_floor_idle -
    (tbt_floor_idle - tbt_floor) * load`. A lightly loaded server keeps decode at 70% of the SLO and
    gives prefill the rest (long prompts: lower TTFT); as seats and pages fill, decode gets SMs
    until it is at 30%, because decode speed is what frees them (by Little's law the requests in
    flight grow with the decode time). A fixed 70% floor lost the ShareGPT-like workload (max rate
    41 -> 36 req/s in the simulator, docs/serve.md); a fixed 30% floor kept long prompts waiting.
    ``tbt_floor_idle=None``: a fixed floor, `tbt_floor`. Starting from the current split and moving
    only for gains above `hysteresis` is the hysteresis band: small changes of the batches change
    nothing.

    The decode lane takes whatever share the running prefill batch leaves (all of it when no prompt
    waits; prefill never takes the last step, so a decode partition always exists). A prefill batch
    waits for the running decode iteration to end (a stable boundary, a few ms) when that iteration
    holds SMs the chosen split gives to prefill.
    """

    cost_model: CostModel | None = None
    ttft_slo: float = 1.0
    tbt_slo: float = 0.1
    prefill_budget: int = 4096
    tbt_floor: float = 0.3
    tbt_floor_idle: float | None = 0.7
    load_range: tuple[float, float] = (0.3, 0.9)
    tbt_headroom: float = 0.9
    ttft_headroom: float = 0.9
    hysteresis: float = 0.05
    starvation_guard: float | None = 0.1

    name: ClassVar[str] = "nexus"
    lanes: ClassVar[tuple[str, ...]] = ("prefill", "decode")

    def __post_init__(self) -> None:
        if self.cost_model is None:
            self.cost_model = CostModel()
        if isinstance(self.cost_model, Profile):
            self.cost_model = CostModel(self.cost_model)
        if self.ttft_slo <= 0 or self.tbt_slo <= 0:
            raise SchedulerConfigError(f"SLOs must be > 0, got ttft_slo={self.ttft_slo}, tbt_slo={self.tbt_slo}")
        if self.prefill_budget < 1:
            raise SchedulerConfigError(f"prefill_budget must be >= 1, got {self.prefill_budget}")
        if not (0 < self.tbt_floor <= self.idle_floor <= self.tbt_headroom <= 1 and 0 < self.ttft_headroom <= 1):
            raise SchedulerConfigError(
                "need 0 < tbt_floor <= tbt_floor_idle <= tbt_headroom <= 1 and 0 < ttft_headroom <= 1, got "
                f"{self.tbt_floor}, {self.tbt_floor_idle}, {self.tbt_headroom}, {self.ttft_headroom}"
            )
        if not 0 <= self.load_range[0] < self.load_range[1] <= 1:
            raise SchedulerConfigError(f"load_range must be (low, high), 0 <= low < high <= 1, got {self.load_range}")
        if self.hysteresis < 0:
            raise SchedulerConfigError(f"hysteresis must be >= 0, got {self.hysteresis}")
        if self.starvation_guard is not None and self.starvation_guard <= 0:
            raise SchedulerConfigError(f"starvation_guard must be > 0 or None, got {self.starvation_guard}")
        self._share: float | None = None
        #: (time, prefill share) at every change of the split, for plots and tests
        self.split_history: list[tuple[float, float]] = []

    def reset(self) -> None:
        self._share = None
        self.split_history = []

    @property
    def current_split(self) -> float | None:
        """The prefill lane's current SM share (None before the first prefill batch)."""
        return self._share

    def schedule(self, lane: str, state: SchedulerState) -> Batch | None:
        if lane == "decode":
            decode = _ready_decodes(state)
            if not decode:
                return None
            # whatever the running prefill batch leaves (a partition is always left); all when it is idle
            return Batch(lane, decode=decode, sm_share=state.available_share(lane) or 1.0)
        guard = -math.inf if self.starvation_guard is None else state.now - self.starvation_guard * self.ttft_slo

        def priority(r: RequestState) -> tuple:  # starving prompts first (oldest first), then SPF
            return (0, r.arrival, 0) if r.arrival < guard else (1, r.remaining_prefill, r.arrival)

        queue = sorted((r for r in state.waiting if not r.busy), key=priority)
        # Admission cannot be undone: decide the split on the chunks that would be taken before
        # admitting anybody. Only those create TTFT pressure: a prompt held back by the page or
        # sequence limits waits for decodes to finish, and more prefill SMs would not help it.
        candidate = self._peek_prompts(queue, state)
        if not candidate:
            return None
        decoding = [r for r in state.decoding if not r.cancel_requested]
        decode_work = BatchWork.decode_only([r.prefilled + r.generated for r in decoding])  # kv_len + 1
        oldest_wait = state.now - min(r.arrival for r, _ in candidate)
        prefill_work = BatchWork.prefill_only([(r.prefilled, n) for r, n in candidate])
        share = self.choose_split(prefill_work, decode_work, oldest_wait, state.now, self.load(state))
        if state.concurrent and state.available_share(lane) + 1e-9 < share:
            return None  # the running decode iteration holds these SMs: re-split at its end
        prefill = _take_prompts(queue, state, self.prefill_budget, chunk=True)
        return Batch(lane, prefill=prefill, sm_share=share) if prefill else None

    def _peek_prompts(self, queue: list[RequestState], state: SchedulerState) -> list[tuple[RequestState, int]]:
        """The chunks `_take_prompts` would take (same order, budget and admission rule), admitting nobody."""
        out, left = [], self.prefill_budget
        free, seats = state.free_pages, state.max_num_seqs - state.admitted
        for req in queue:
            if left <= 0:
                break
            if req.cancel_requested:
                continue
            if not req.reserved_pages:
                need = req.pages_needed(state.page_size)
                if need > free or seats <= 0:
                    break
                free, seats = free - need, seats - 1
            n = min(req.remaining_prefill, left)
            out.append((req, n))
            left -= n
        return out

    @property
    def idle_floor(self) -> float:
        """The decode floor of an idle server (`tbt_floor_idle`; the fixed `tbt_floor` when that is None)."""
        return self.tbt_floor if self.tbt_floor_idle is None else self.tbt_floor_idle

    def load(self, state: SchedulerState) -> float:
        """The server's load in [0, 1]: the larger of the shares of sequence seats and of KV pages that
        admitted requests hold, mapped linearly from `load_range[0]` (0) to `load_range[1]` (1)."""
        reserved = state.num_pages - state.free_pages
        used = max(state.admitted / state.max_num_seqs, reserved / state.num_pages if state.num_pages else 0.0)
        low, high = self.load_range
        return min(1.0, max(0.0, (used - low) / (high - low)))

    def tbt_target(self, prefill_latency: float, oldest_wait: float, load: float = 0.0) -> float:
        """The decode latency the split must meet: its floor tightens with the server's `load`, and the
        target is relaxed toward `tbt_headroom` as the prefill queue's TTFT pressure grows."""
        pressure = (oldest_wait + prefill_latency) / (self.ttft_headroom * self.ttft_slo)
        pressure = min(1.0, max(0.0, pressure))
        idle = self.idle_floor
        floor = idle - (idle - self.tbt_floor) * min(1.0, max(0.0, load))
        return self.tbt_slo * (floor + (self.tbt_headroom - floor) * pressure)

    def choose_split(
        self, prefill: BatchWork, decode: BatchWork, oldest_wait: float = 0.0, now: float = 0.0, load: float = 0.0
    ) -> float:
        """The prefill lane's SM share for this batch (the decode lane gets the rest); `load` as from
        `load(state)` (0: an idle server)."""
        steps = self.cost_model.profile.partitions
        if steps < 2:  # a device with one partition step cannot be split (a CPU: the split is logical)
            return self._set(1.0, now)
        if decode.tokens == 0:  # all but one step: the decode lane keeps a partition for new arrivals
            return self._set((steps - 1) / steps, now)
        cache: dict[int, tuple[float, float]] = {}

        def pred(k: int) -> tuple[float, float]:  # (prefill, decode) latency with k steps for prefill
            if k not in cache:
                cache[k] = self.cost_model.split_latencies(prefill, decode, k / steps)
            return cache[k]

        k = steps // 2 if self._share is None else min(steps - 1, max(1, round(self._share * steps)))
        target = self.tbt_target(pred(k)[0], oldest_wait, load)
        h = self.hysteresis
        # 1. decode misses its target: give it steps while they still help (decode may saturate)
        while k > 1 and pred(k)[1] > target and pred(k - 1)[1] < pred(k)[1] * (1 - 1e-9):
            k -= 1
        # 2. prefill speeds up by more than the band and decode keeps its target: give prefill a step
        while k < steps - 1 and pred(k + 1)[1] <= target and pred(k + 1)[0] < pred(k)[0] * (1 - h):
            k += 1
        # 3. prefill is saturated (a step less costs it under the band): the step goes to decode
        while k > 1 and pred(k - 1)[0] <= pred(k)[0] * (1 + h) and pred(k - 1)[1] < pred(k)[1] * (1 - h):
            k -= 1
        return self._set(k / steps, now)

    def _set(self, share: float, now: float) -> float:
        if share != self._share:
            self._share = share
            self.split_history.append((now, share))
        return share


#: scheduler name (CLI, benchmark, Engine(scheduler="...")) -> class
SCHEDULERS: dict[str, type[Scheduler]] = {
    "fcfs": FCFSPrefillFirst,
    "chunked": ChunkedPrefill,
    "static": StaticSplit,
    "nexus": Nexus,
}


def make_scheduler(name: str | Scheduler, **kwargs) -> Scheduler:
    """A scheduler by name ("fcfs", "chunked", "static", "nexus") with its hyper-parameters."""
    if isinstance(name, Scheduler):
        if kwargs:
            raise SchedulerConfigError("pass hyper-parameters to the scheduler's constructor, not with an instance")
        return name
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise SchedulerConfigError(f"unknown scheduler {name!r}; one of {sorted(SCHEDULERS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SchedulerConfigError(f"{cls.__name__}: {exc}") from None


__all__ = [
    "SCHEDULERS",
    "ChunkedPrefill",
    "FCFSPrefillFirst",
    "Nexus",
    "Scheduler",
    "SchedulerState",
    "StaticSplit",
    "make_scheduler",
]
