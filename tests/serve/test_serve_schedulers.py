"""The schedulers and the serving core, on request states alone (no model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmsys.registry import get_method
from llmsys.serve import (
    Batch,
    BatchWork,
    ChunkedPrefill,
    CostModel,
    FCFSPrefillFirst,
    Nexus,
    PromptTooLongError,
    RequestState,
    Scheduler,
    SchedulerConfigError,
    SchedulerState,
    ServingCore,
    StaticSplit,
    default_profile,
    make_scheduler,
)


def _core(scheduler, num_pages=1000, page_size=16, max_num_seqs=64, concurrent=True) -> ServingCore:
    return ServingCore(
        scheduler, page_size=page_size, num_pages=num_pages, max_num_seqs=max_num_seqs, concurrent=concurrent
    )


def _req(i, prompt, out=10, arrival=0.0) -> RequestState:
    return RequestState(f"r{i}", prompt_len=prompt, max_new_tokens=out, arrival=arrival)


def _run_prefills(core: ServingCore, lane: str = "mixed") -> None:
    while core.waiting:
        batch = core.schedule(lane, 0.0)
        core.complete(batch, 0.0)


def test_fcfs_prefills_whole_prompts_first_then_decodes():
    core = _core(FCFSPrefillFirst(max_batch_tokens=100))
    for i, n in enumerate((60, 30, 50)):
        core.add(_req(i, n))
    b = core.schedule("mixed", 0.0)
    assert [(r.request_id, n) for r, n in b.prefill] == [("r0", 60), ("r1", 30)] and not b.decode
    core.complete(b, 1.0)
    core.add(_req(3, 5))
    b = core.schedule("mixed", 1.0)  # prompts still wait: no decode yet
    assert [r.request_id for r, _ in b.prefill] == ["r2", "r3"] and not b.decode
    core.complete(b, 2.0)
    b = core.schedule("mixed", 2.0)
    assert [r.request_id for r in b.decode] == ["r0", "r1", "r2", "r3"] and not b.prefill


def test_fcfs_takes_a_prompt_longer_than_the_budget_alone():
    core = _core(FCFSPrefillFirst(max_batch_tokens=100))
    core.add(_req(0, 500))
    core.add(_req(1, 10))
    b = core.schedule("mixed", 0.0)
    assert [(r.request_id, n) for r, n in b.prefill] == [("r0", 500)]


def test_chunked_prefill_puts_decodes_first_and_respects_the_budget():
    core = _core(ChunkedPrefill(token_budget=64))
    core.add(_req(0, 10))
    _run_prefills(core)
    core.add(_req(1, 100))
    core.add(_req(2, 100))
    b = core.schedule("mixed", 0.0)
    assert [r.request_id for r in b.decode] == ["r0"]
    assert [(r.request_id, n) for r, n in b.prefill] == [("r1", 63)]
    core.complete(b, 1.0)
    b = core.schedule("mixed", 1.0)
    assert [(r.request_id, n) for r, n in b.prefill] == [("r1", 37), ("r2", 26)] and b.num_tokens == 64
    assert all(len(req.token_times) for req in b.decode)


def test_static_split_runs_two_lanes_on_fixed_shares():
    core = _core(StaticSplit(prefill_share=0.25, prefill_budget=50))
    core.add(_req(0, 30))
    core.add(_req(1, 40))
    p = core.schedule("prefill", 0.0)
    assert p.sm_share == 0.25 and [(r.request_id, n) for r, n in p.prefill] == [("r0", 30), ("r1", 20)]
    assert core.schedule("prefill", 0.0) is None  # the lane is busy
    assert core.schedule("decode", 0.0) is None  # nothing to decode yet
    core.complete(p, 1.0)
    d = core.schedule("decode", 1.0)
    assert d.sm_share == 0.75 and [r.request_id for r in d.decode] == ["r0"]
    p = core.schedule("prefill", 1.0)  # concurrently: r1's second chunk
    assert [(r.request_id, n) for r, n in p.prefill] == [("r1", 20)]


def test_nexus_prefills_shortest_prompt_first_and_decodes_fcfs():
    core = _core(Nexus(prefill_budget=100))
    for i, n in enumerate((80, 10, 40, 25)):
        core.add(_req(i, n, arrival=0.001 * i))
    b = core.schedule("prefill", 0.01)
    assert [(r.request_id, n) for r, n in b.prefill] == [("r1", 10), ("r3", 25), ("r2", 40), ("r0", 25)]
    core.complete(b, 0.02)
    d = core.schedule("decode", 0.02)
    assert [r.request_id for r in d.decode] == ["r1", "r2", "r3"]  # FCFS: arrival order


def test_admission_reserves_lifetime_pages_and_caps_requests():
    core = _core(ChunkedPrefill(token_budget=1000), num_pages=10, page_size=10)
    core.add(_req(0, 50, out=11))  # 60 tokens of lifetime KV: 6 pages
    core.add(_req(1, 30, out=11))  # 4 pages: fits next to r0
    core.add(_req(2, 5, out=1))  # 1 page: does not fit any more, and waits behind nobody (FCFS stop)
    b = core.schedule("mixed", 0.0)
    assert [r.request_id for r, _ in b.prefill] == ["r0", "r1"] and core.free_pages == 0
    core.complete(b, 0.0)
    for req in list(core.decoding):
        core.cancel(req, 0.0)
    assert core.free_pages == 10 and core.admitted == 0
    with pytest.raises(PromptTooLongError, match="num_pages"):
        core.add(_req(3, 95, out=10))
    capped = _core(ChunkedPrefill(), max_num_seqs=2)
    for i in range(3):
        capped.add(_req(i, 5))
    assert len(capped.schedule("mixed", 0.0).prefill) == 2


def test_requests_finish_by_length_and_stop():
    core = _core(ChunkedPrefill())
    a, b = _req(0, 5, out=3), _req(1, 5, out=3)
    core.add(a)
    core.add(b)
    batch = core.schedule("mixed", 0.0)
    done = core.complete(batch, 1.0, stopped={"r1"})
    assert a.generated == 1 and not a.finished
    assert b.finished and b.finish_reason == "stop" and done[1].finished
    for t in (2.0, 3.0):
        core.complete(core.schedule("mixed", t), t)
    assert a.finished and a.finish_reason == "length" and a.token_times == [1.0, 2.0, 3.0]
    assert not core.has_work() and core.reserved_pages == 0


def test_cancel_while_running_is_applied_when_the_batch_completes():
    core = _core(ChunkedPrefill())
    r = _req(0, 20)
    core.add(r)
    batch = core.schedule("mixed", 0.0)
    assert core.cancel(r, 0.5) is False and not r.finished
    (c,) = core.complete(batch, 1.0)
    assert r.finished and r.finish_reason == "cancelled" and not c.new_token and core.reserved_pages == 0


def test_the_core_rejects_a_broken_scheduler():
    class Twice(Scheduler):
        def schedule(self, lane, state):
            state.try_admit(state.waiting[0])
            return Batch(lane, prefill=[(state.waiting[0], 1), (state.waiting[0], 1)])

    class TooMuch(Scheduler):
        def schedule(self, lane, state):
            state.try_admit(state.waiting[0])
            return Batch(lane, prefill=[(state.waiting[0], 99)])

    class Unadmitted(Scheduler):
        def schedule(self, lane, state):
            return Batch(lane, prefill=[(state.waiting[0], 1)])

    for scheduler, match in ((Twice(), "repeated"), (TooMuch(), "chunk of 99"), (Unadmitted(), "not admitted")):
        core = _core(scheduler)
        core.add(_req(0, 5))
        with pytest.raises(SchedulerConfigError, match=match):
            core.schedule("mixed", 0.0)


def test_nexus_split_choice():
    cost = CostModel(default_profile())
    nexus = Nexus(cost_model=cost)
    steps = default_profile().partitions
    big_prefill = BatchWork.prefill_only([(0, 4096)])
    # nothing to decode: prefill gets every partition but one (kept for the decode lane)
    assert nexus.choose_split(big_prefill, BatchWork()) == (steps - 1) / steps
    few = BatchWork.decode_only([512] * 8)
    many = BatchWork.decode_only([4096] * 256)
    nexus.reset()
    s_few = nexus.choose_split(big_prefill, few)
    nexus.reset()
    s_many = nexus.choose_split(big_prefill, many)
    assert s_many < s_few  # a heavier decode batch gets more SMs
    for decode in (few, BatchWork.decode_only([2048] * 64)):
        nexus.reset()
        share = nexus.choose_split(big_prefill, decode)
        tp, td = cost.split_latencies(big_prefill, decode, share)
        target = nexus.tbt_target(cost.split_latencies(big_prefill, decode, 0.5)[0], 0.0)
        assert td <= target  # decode meets its target ...
        up = share + 1 / steps
        if up < 1:  # ... and one more step for prefill would break it or gain less than the band
            tp_up, td_up = cost.split_latencies(big_prefill, decode, up)
            assert td_up > target or tp_up >= tp * (1 - nexus.hysteresis)
    # a prompt that waited long relaxes the TBT target: prefill gets more SMs (on a loaded server, whose
    # floor leaves room to relax)
    nexus.reset()
    fresh = nexus.choose_split(big_prefill, BatchWork.decode_only([2048] * 64), oldest_wait=0.0, load=1.0)
    nexus.reset()
    late = nexus.choose_split(big_prefill, BatchWork.decode_only([2048] * 64), oldest_wait=0.85, load=1.0)
    assert late > fresh
    assert nexus.tbt_target(0.0, 10.0) == pytest.approx(0.9 * 0.1) and nexus.tbt_target(0.0, 0.0) == pytest.approx(0.07)
    assert nexus.tbt_target(0.0, 0.0, load=1.0) == pytest.approx(0.03)  # a full server: decode's floor tightens
    assert nexus.tbt_target(0.0, 10.0, load=1.0) == pytest.approx(0.9 * 0.1)
    assert Nexus(cost_model=cost, tbt_floor_idle=None).tbt_target(0.0, 0.0) == pytest.approx(0.03)  # fixed floor
    # under load the same batches leave decode at least as many SMs, and more for some
    shares = {}
    for load in (0.0, 1.0):
        shares[load] = []
        for decode in (few, BatchWork.decode_only([2048] * 64), many):
            nexus.reset()
            shares[load].append(nexus.choose_split(big_prefill, decode, load=load))
    assert all(hi <= lo for lo, hi in zip(shares[0.0], shares[1.0])) and shares[1.0] != shares[0.0]


def test_nexus_load_is_the_fuller_of_seats_and_pages():
    def state(admitted, max_seqs, reserved, free):
        reqs = [SimpleNamespace(reserved_pages=r) for r in reserved]
        return SchedulerState(now=0.0, waiting=reqs[:1], decoding=reqs[1:], page_size=16, free_pages=free,
                              num_pages=free + sum(reserved), max_num_seqs=max_seqs, admitted=admitted)  # fmt: skip

    nexus = Nexus(load_range=(0.3, 0.9))
    assert nexus.load(state(0, 8, [], 100)) == 0.0
    assert nexus.load(state(3, 10, [10, 10, 10], 70)) == pytest.approx(0.0)  # 30% of seats and of pages
    assert nexus.load(state(6, 10, [1] * 6, 94)) == pytest.approx(0.5)  # seats: 60%
    assert nexus.load(state(2, 10, [30, 30], 40)) == pytest.approx(0.5)  # pages: 60%
    assert nexus.load(state(10, 10, [1] * 10, 0)) == 1.0
    with pytest.raises(SchedulerConfigError, match="load_range"):
        Nexus(load_range=(0.9, 0.3))
    with pytest.raises(SchedulerConfigError, match="tbt_floor_idle"):
        Nexus(tbt_floor=0.5, tbt_floor_idle=0.4)


def test_nexus_starvation_guard():
    core = _core(Nexus(prefill_budget=50, ttft_slo=1.0))  # the guard: 0.1 x ttft_slo
    core.add(_req(0, 40, arrival=0.0))
    core.add(_req(1, 10, arrival=0.04))
    # at t=0.08 nobody starves: shortest first
    assert [r.request_id for r, _ in core.schedule("prefill", 0.08).prefill] == ["r1", "r0"]
    late = _core(Nexus(prefill_budget=50, ttft_slo=1.0))
    late.add(_req(0, 40, arrival=0.0))
    late.add(_req(1, 10, arrival=0.04))
    # at t=0.12 r0 waited > 0.1 s, r1 not: r0 goes first
    assert [r.request_id for r, _ in late.schedule("prefill", 0.12).prefill] == ["r0", "r1"]
    pure = _core(Nexus(prefill_budget=20, starvation_guard=None))
    guarded = _core(Nexus(prefill_budget=20))
    for core in (pure, guarded):
        core.add(_req(0, 40, arrival=0.0))
        core.add(_req(1, 10, arrival=0.4))
    assert [r.request_id for r, _ in pure.schedule("prefill", 0.6).prefill] == ["r1", "r0"]
    assert [r.request_id for r, _ in guarded.schedule("prefill", 0.6).prefill] == ["r0"]


def test_nexus_hysteresis_keeps_the_split_for_small_changes():
    cost = CostModel(default_profile())
    sticky = Nexus(cost_model=cost, hysteresis=0.5)
    prefill = BatchWork.prefill_only([(0, 2048)])
    first = sticky.choose_split(prefill, BatchWork.decode_only([1024] * 64))
    assert sticky.choose_split(prefill, BatchWork.decode_only([1024] * 72)) == first
    assert len(sticky.split_history) == 1
    eager = Nexus(cost_model=cost, hysteresis=0.0)
    eager.choose_split(prefill, BatchWork.decode_only([1024] * 64))
    eager.choose_split(prefill, BatchWork.decode_only([4096] * 256))
    assert len(eager.split_history) == 2


def test_nexus_waits_for_the_decode_iteration_to_free_sms():
    core = _core(Nexus())
    core.add(_req(0, 10))
    core.complete(core.schedule("prefill", 0.0), 0.01)
    decode = core.schedule("decode", 0.01)
    assert decode.sm_share == 1.0  # no prompt waits: decode takes the device
    core.add(_req(1, 500, arrival=0.01))
    assert core.schedule("prefill", 0.011) is None  # the running decode iteration holds every SM
    core.complete(decode, 0.02)
    prefill = core.schedule("prefill", 0.02)
    decode = core.schedule("decode", 0.02)
    assert prefill is not None and decode.sm_share == pytest.approx(1 - prefill.sm_share)
    # serial (CPU) execution never waits: the split is logical there
    serial = _core(Nexus(), concurrent=False)
    serial.add(_req(0, 10))
    serial.complete(serial.schedule("prefill", 0.0), 0.0)
    serial.add(_req(1, 500))
    assert serial.schedule("prefill", 0.0) is not None


def test_scheduler_configuration_errors_and_registry():
    with pytest.raises(SchedulerConfigError, match="token_budget"):
        ChunkedPrefill(token_budget=0)
    with pytest.raises(SchedulerConfigError, match="prefill_share"):
        StaticSplit(prefill_share=1.0)
    with pytest.raises(SchedulerConfigError, match="SLOs"):
        Nexus(tbt_slo=0)
    with pytest.raises(SchedulerConfigError, match="unexpected keyword"):
        make_scheduler("chunked", budget=5)
    with pytest.raises(SchedulerConfigError, match="one of"):
        make_scheduler("sjf")
    with pytest.raises(SchedulerConfigError, match="constructor"):
        make_scheduler(Nexus(), tbt_slo=1)
    assert isinstance(make_scheduler("static", prefill_share=0.3), StaticSplit)
    assert get_method("nexus") is Nexus and get_method("chunked_prefill") is ChunkedPrefill
