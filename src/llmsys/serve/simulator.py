"""A discrete-event simulator of a serving engine: the engine's scheduler code, the cost model's time.

The simulated engine is the real `ServingCore` with the real scheduler object; only the forward is
replaced by the cost model's latency on a virtual clock. Two execution modes:

* concurrent (a GPU; `profile.concurrent`): a disaggregated scheduler's prefill and decode lanes
  run at the same time. While both run, each one's remaining work proceeds at the rate the cost
  model predicts *next to the other* (bandwidth contention); when one starts or finishes, the other's
  finish time is recomputed.
* serial (a CPU): one forward at a time, lanes in the scheduler's order, exactly like the real
  engine's loop on a CPU (`core.run_serial_round`).

Requests generate exactly their workload output length (`max_new_tokens = output_len`, as serving
benchmarks do with `ignore_eos`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmsys.serve.core import ServingCore, run_serial_round
from llmsys.serve.costmodel import BatchWork, CostModel, Profile
from llmsys.serve.errors import SimulationError
from llmsys.serve.metrics import RequestRecord, ServingMetrics, summarize
from llmsys.serve.request import Batch, RequestState
from llmsys.serve.schedulers import Scheduler, make_scheduler
from llmsys.serve.workload import WorkloadRequest

logger = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    scheduler: str
    records: list[RequestRecord]
    metrics: ServingMetrics
    batches: dict[str, int]  # forwards per lane
    busy_s: dict[str, float]  # seconds each lane was running
    split_history: list[tuple[float, float]] = field(default_factory=list)  # Nexus: (time, prefill share)

    def to_dict(self) -> dict:
        return {
            "scheduler": self.scheduler,
            "metrics": self.metrics.to_dict(),
            "batches": self.batches,
            "busy_s": self.busy_s,
            "split_changes": len(self.split_history),
        }


@dataclass
class _Running:
    batch: Batch
    work: BatchWork  # computed once: a running batch's requests do not change until it completes
    duration: float  # the whole batch's latency under the current conditions
    left: float  # fraction of the batch still to run
    since: float  # when `left` was last brought up to date
    start: float

    def end(self) -> float:
        return self.since + self.left * self.duration


def _as_cost_model(profile: Profile | CostModel | None) -> CostModel:
    if isinstance(profile, CostModel):
        return profile
    return CostModel(profile)


def simulate(
    scheduler: Scheduler | str,
    workload: Sequence[WorkloadRequest],
    profile: Profile | CostModel | None = None,
    *,
    page_size: int = 16,
    num_pages: int | None = None,
    max_num_seqs: int | None = None,
    ttft_slo: float = 1.0,
    tbt_slo: float = 0.1,
    concurrent: bool | None = None,
) -> SimulationResult:
    """Run `workload` through `scheduler` on the cost model of `profile` (default: `default_profile()`).

    `num_pages` defaults to the KV capacity of the profile's device (`Profile.kv_capacity_tokens`),
    `max_num_seqs` to vLLM's default for that device (`Profile.default_max_num_seqs`: 1024 on an
    H100-class GPU, 256 otherwise).
    """
    cost = _as_cost_model(profile)
    sched = make_scheduler(scheduler)
    prof = cost.profile
    if num_pages is None:
        capacity = prof.kv_capacity_tokens()
        if capacity <= 0:
            raise SimulationError(
                f"profile {prof.name!r} does not know the device memory: pass num_pages= to simulate()"
            )
        num_pages = capacity // page_size
    if max_num_seqs is None:
        max_num_seqs = prof.default_max_num_seqs()
    concurrent = prof.concurrent if concurrent is None else concurrent
    core = ServingCore(
        sched, page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs, concurrent=concurrent
    )
    arrivals = sorted(workload, key=lambda w: w.arrival)
    states = [
        RequestState(f"r{i}", prompt_len=w.prompt_len, max_new_tokens=w.output_len, arrival=w.arrival)
        for i, w in enumerate(arrivals)
    ]
    for req in states:
        core.check_fits(req)  # reject before simulating anything
    batches = {lane: 0 for lane in core.lanes}
    busy = {lane: 0.0 for lane in core.lanes}
    if concurrent and sched.disaggregated:
        _run_concurrent(core, cost, states, batches, busy)
    else:
        _run_serial(core, cost, states, batches, busy)
    records = [RequestRecord.of(r) for r in states]
    return SimulationResult(
        scheduler=sched.name,
        records=records,
        metrics=summarize(records, ttft_slo, tbt_slo),
        batches=batches,
        busy_s=busy,
        split_history=list(getattr(sched, "split_history", [])),
    )


def _run_serial(core: ServingCore, cost: CostModel, states, batches, busy) -> None:
    clock = [0.0]
    nxt = 0

    def execute(batch: Batch) -> tuple[str, ...]:
        dt = cost.batch_latency(batch)
        clock[0] += dt
        batches[batch.lane] += 1
        busy[batch.lane] += dt
        return ()

    while True:
        while nxt < len(states) and states[nxt].arrival <= clock[0]:
            core.add(states[nxt])
            nxt += 1
        ran = run_serial_round(core, lambda: clock[0], execute)
        if ran:
            continue
        if nxt < len(states):
            clock[0] = max(clock[0], states[nxt].arrival)
            continue
        if core.has_work():
            raise SimulationError(_stall_message(core))
        return


def _run_concurrent(core: ServingCore, cost: CostModel, states, batches, busy) -> None:
    now = 0.0
    nxt = 0
    running: dict[str, _Running] = {}

    def reprice(at: float) -> None:
        # conditions changed (a lane started or stopped): bring both up to date, re-predict their rates
        for lane, run in running.items():
            run.left = max(0.0, run.left - (at - run.since) / run.duration) if run.duration > 0 else 0.0
            run.since = at
            other = next((r for other_lane, r in running.items() if other_lane != lane), None)
            if other is None:
                run.duration = cost.latency(run.work, run.batch.sm_share)
            else:
                run.duration = cost.latency(run.work, run.batch.sm_share, other.work, other.batch.sm_share)

    while True:
        while nxt < len(states) and states[nxt].arrival <= now:
            core.add(states[nxt])
            nxt += 1
        launched = False
        for lane in core.lanes:
            if lane in running:
                continue
            batch = core.schedule(lane, now)
            if batch is None:
                continue
            running[lane] = _Running(batch, BatchWork.of(batch), duration=math.inf, left=1.0, since=now, start=now)
            batches[lane] += 1
            launched = True
        if launched:
            reprice(now)
        if not running:
            if nxt < len(states):
                now = states[nxt].arrival
                continue
            if core.has_work():
                raise SimulationError(_stall_message(core))
            return
        lane, run = min(running.items(), key=lambda kv: kv[1].end())
        end = run.end()
        if nxt < len(states) and states[nxt].arrival < end:
            now = states[nxt].arrival  # an arrival may fill an idle lane before this batch ends
            continue
        now = end
        reprice(now)
        del running[lane]
        busy[lane] += now - run.start
        core.complete(run.batch, now)
        reprice(now)


def _stall_message(core: ServingCore) -> str:
    waiting = [(r.request_id, r.prompt_len) for r in core.waiting[:5]]
    return (
        f"{type(core.scheduler).__name__} scheduled nothing although requests remain (waiting: {waiting}, "
        f"decoding: {len(core.decoding)}, free pages: {core.free_pages}/{core.num_pages}). A request may need more "
        "pages than can ever be free while others hold theirs, or max_num_seqs is too small."
    )


def rate_sweep(
    scheduler_factory,
    workload_factory,
    rates: Sequence[float],
    profile: Profile | CostModel | None = None,
    **kwargs,
) -> list[tuple[float, SimulationResult]]:
    """Simulate each rate with a fresh scheduler (`scheduler_factory()`) and workload (`workload_factory(rate)`)."""
    return [(rate, simulate(scheduler_factory(), workload_factory(rate), profile, **kwargs)) for rate in rates]


def max_rate_under_slo(
    scheduler_factory,
    workload_factory,
    profile: Profile | CostModel | None = None,
    *,
    low: float,
    high: float,
    iterations: int = 6,
    **kwargs,
) -> float:
    """The highest request rate in [low, high] whose run meets the SLO (bisection; 0 if even `low` fails).

    Assumes latency grows with the rate (true of every scheduler here up to simulation noise; the
    workload of each rate uses the same seed, so the noise is common to the points compared).
    """

    def ok(rate: float) -> bool:
        return simulate(scheduler_factory(), workload_factory(rate), profile, **kwargs).metrics.meets_slo()

    if not ok(low):
        return 0.0
    if ok(high):
        return high
    for _ in range(iterations):
        mid = (low + high) / 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


__all__ = ["SimulationResult", "max_rate_under_slo", "rate_sweep", "simulate"]
