"""The simulator: it runs the engine's scheduler code; metrics; workloads."""

from __future__ import annotations

import numpy as np
import pytest

from llmsys.serve import (
    DATASETS,
    ChunkedPrefill,
    Engine,
    FCFSPrefillFirst,
    Nexus,
    PromptTooLongError,
    RequestRecord,
    SamplingParams,
    Scheduler,
    SimulationError,
    StaticSplit,
    WorkloadError,
    WorkloadRequest,
    burst_workload,
    load_csv_workload,
    max_rate_under_slo,
    simulate,
    summarize,
    synthetic_workload,
)
from llmsys.serve.profile import fit_cpu_profile
from llmsys.testing import tiny_model


class Recording(Scheduler):
    """Wraps a scheduler and records every batch it hands out (lane, prompt chunks, decode rows)."""

    def __init__(self, inner: Scheduler):
        self.inner = inner
        self.log: list[tuple] = []

    @property
    def lanes(self):  # type: ignore[override]
        return self.inner.lanes

    @property
    def name(self):  # type: ignore[override]
        return self.inner.name

    def reset(self):
        self.inner.reset()
        self.log = []

    def schedule(self, lane, state):
        batch = self.inner.schedule(lane, state)
        if batch:
            key = lambda rid: int(rid.split("-")[-1].lstrip("r"))  # noqa: E731 - "req-3" and "r3" alike
            self.log.append(
                (
                    lane,
                    [(key(r.request_id), n) for r, n in batch.prefill],
                    sorted(key(r.request_id) for r in batch.decode),
                )
            )
        return batch


@pytest.mark.parametrize(
    "make",
    [lambda: Nexus(), lambda: ChunkedPrefill(token_budget=40), lambda: FCFSPrefillFirst(), lambda: StaticSplit()],
)
def test_simulator_and_engine_schedule_the_same_batches(make):
    # same scheduler code, same burst: the CPU engine and the serial simulator see the same states
    prompts, outputs = [30, 5, 61, 12, 44, 9], [6, 9, 3, 7, 5, 8]
    model = tiny_model("llama", num_hidden_layers=1)
    real = Recording(make())
    engine = Engine(model, real, page_size=8, num_pages=64)
    engine.generate([[7] * n for n in prompts], [SamplingParams(max_new_tokens=o, ignore_eos=True) for o in outputs])
    sim = Recording(make())
    profile = fit_cpu_profile(_fake_samples(), _shape(model))
    result = simulate(sim, burst_workload(prompts, outputs), profile, page_size=8, num_pages=64)
    assert real.log == sim.log and len(real.log) >= max(outputs)
    assert [r.output_len for r in result.records] == outputs


def _shape(model):
    from llmsys.serve import ModelShape

    return ModelShape.from_model(model)


def _fake_samples():
    from llmsys.serve import BatchWork
    from llmsys.serve.profile import Sample

    works = [BatchWork.prefill_only([(0, n)]) for n in (8, 64, 256)] + [BatchWork.prefill_only([(64, 32)] * 2)]
    works += [BatchWork.decode_only([kv] * b) for b in (1, 8) for kv in (16, 128)]
    return [
        Sample(w, 1e-3 + 1e-4 * w.seqs + 2e-6 * w.tokens + 1e-8 * w.decode_kv + 1e-8 * w.prefill_pairs) for w in works
    ]


def test_concurrent_lanes_overlap_and_every_request_completes():
    workload = synthetic_workload("sharegpt", rate=30, num_requests=150, seed=1)
    res = simulate(Nexus(), workload)
    m = res.metrics
    assert m.completed == 150 and m.ttft.count == 150
    assert [r.output_len for r in res.records] == [w.output_len for w in sorted(workload, key=lambda w: w.arrival)]
    makespan = max(r.finish_time for r in res.records)
    assert res.busy_s["prefill"] + res.busy_s["decode"] > makespan  # the two lanes ran at the same time
    assert res.split_history and all(0 < s < 1 for _, s in res.split_history)
    for r in res.records:
        assert r.ttft >= 0 and all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
    serial = simulate(Nexus(), workload, concurrent=False)
    assert serial.busy_s["prefill"] + serial.busy_s["decode"] <= max(r.finish_time for r in serial.records) + 1e-9


def test_decode_heavy_load_tbt_is_lower_with_disaggregation():
    # with the default (8B/H100-shaped) profile, a mixed batch makes every decode wait for its prompt
    # chunk; Nexus's decode lane does not wait for prefill
    workload = synthetic_workload("arxiv", rate=2.0, num_requests=60, seed=0)
    nexus = simulate(Nexus(), workload).metrics
    chunked = simulate(ChunkedPrefill(), workload).metrics
    assert nexus.tbt.p99 < chunked.tbt.p99


def test_simulation_errors():
    with pytest.raises(PromptTooLongError, match="num_pages"):
        simulate("chunked", [WorkloadRequest(0.0, 5000, 10)], num_pages=100)
    cpu = fit_cpu_profile(_fake_samples(), _shape(tiny_model("llama")))
    with pytest.raises(SimulationError, match="num_pages"):
        simulate("chunked", [WorkloadRequest(0.0, 50, 10)], cpu)

    class Lazy(Scheduler):
        def schedule(self, lane, state):
            return None

    with pytest.raises(SimulationError, match="scheduled nothing"):
        simulate(Lazy(), [WorkloadRequest(0.0, 50, 10)])


def test_metrics_summary():
    def rec(i, arrival, first, gaps, reason="length"):
        times = tuple(np.cumsum([first, *gaps]).tolist())
        return RequestRecord(f"r{i}", arrival, 10, len(times), first, times, times[-1], reason)

    records = [rec(0, 0.0, 0.5, [0.05, 0.05]), rec(1, 0.0, 2.0, [0.3]), rec(2, 1.0, 1.2, [], "cancelled")]
    m = summarize(records, ttft_slo=1.0, tbt_slo=0.1)
    assert m.completed == 2 and m.num_requests == 3
    assert m.ttft.mean == pytest.approx(1.25) and m.ttft.count == 2
    assert m.tbt.count == 3 and m.tbt.p50 == pytest.approx(0.05)
    assert m.slo_attainment == pytest.approx(1 / 3)  # r0 only: r1 misses both, r2 was cancelled
    assert m.duration_s == pytest.approx(2.3) and m.throughput_tps == pytest.approx(5 / 2.3)
    assert not m.meets_slo()
    assert summarize(records[:1], 1.0, 0.1).meets_slo()
    assert set(m.to_dict()) >= {"ttft", "tbt", "goodput_rps", "meets_slo"}


def test_synthetic_workloads_have_their_documented_shape():
    means = {}
    for name in DATASETS:
        w = synthetic_workload(name, rate=4.0, num_requests=4000, seed=0)
        means[name] = (np.mean([r.prompt_len for r in w]), np.mean([r.output_len for r in w]))
        gaps = np.diff([r.arrival for r in w])
        assert np.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert 140 < means["sharegpt"][0] < 190 and 290 < means["sharegpt"][1] < 360
    assert 6500 < means["longbench"][0] < 9500 and means["longbench"][1] < 100
    assert 6500 < means["arxiv"][0] < 9000 and 200 < means["arxiv"][1] < 300
    assert synthetic_workload("sharegpt", 1.0, 5, seed=3) == synthetic_workload("sharegpt", 1.0, 5, seed=3)
    with pytest.raises(WorkloadError, match="unknown dataset"):
        synthetic_workload("wiki", 1.0, 5)
    with pytest.raises(WorkloadError, match="rate"):
        synthetic_workload("sharegpt", 0.0, 5)


def test_csv_workloads(tmp_path):
    with_times = tmp_path / "a.csv"
    with_times.write_text("prompt_len,output_len,arrival\n10,5,3.0\n20,6,1.0\n")
    w = load_csv_workload(with_times)
    assert [(r.arrival, r.prompt_len) for r in w] == [(0.0, 20), (2.0, 10)]
    no_times = tmp_path / "b.csv"
    no_times.write_text("prompt_len,output_len\n10,5\n20,6\n")
    assert len(load_csv_workload(no_times, rate=2.0, num_requests=5)) == 5
    with pytest.raises(WorkloadError, match="--rate"):
        load_csv_workload(no_times)
    bad = tmp_path / "c.csv"
    bad.write_text("prompt,output\n1,2\n")
    with pytest.raises(WorkloadError, match="missing column"):
        load_csv_workload(bad)
    bad.write_text("prompt_len,output_len\nten,2\n")
    with pytest.raises(WorkloadError, match="non-numeric"):
        load_csv_workload(bad)
    with pytest.raises(WorkloadError, match="no workload file"):
        load_csv_workload(tmp_path / "missing.csv")


def test_max_rate_under_slo_brackets_the_knee():
    def workload(rate):  # long prompts: a few requests per second saturate the (simulated) GPU
        return synthetic_workload("longbench", rate, 60, seed=0)

    rate = max_rate_under_slo(lambda: ChunkedPrefill(), workload, low=0.5, high=100.0, iterations=5)
    assert 0.5 <= rate < 100.0
    assert not simulate(ChunkedPrefill(), workload(100.0)).metrics.meets_slo()
    assert simulate(ChunkedPrefill(), workload(rate)).metrics.meets_slo()


def test_max_num_seqs_defaults_to_vllms_rule_for_the_device():
    from dataclasses import replace

    from llmsys.serve import default_profile

    h100 = default_profile()
    assert h100.default_max_num_seqs() == 1024  # vLLM v1 on GPUs of >= 70 GiB
    assert replace(h100, device="A100 SXM 80GB").default_max_num_seqs() == 256  # vLLM excludes the A100
    assert replace(h100, memory_bytes=40e9).default_max_num_seqs() == 256
    assert fit_cpu_profile(_fake_samples(), _shape(tiny_model("llama"))).default_max_num_seqs() == 256
    # the cap really binds: with 8 seats, the 9th of 16 simultaneous requests starts after one finishes
    burst = [WorkloadRequest(0.0, 32, 16) for _ in range(16)]
    capped = simulate("chunked", burst, max_num_seqs=8).records
    first_finish = min(r.finish_time for r in capped)
    assert sum(r.first_token_time >= first_finish for r in capped) == 8
    free = simulate("chunked", burst).records  # default: 1024 seats, nobody waits for a seat
    assert all(r.first_token_time < min(r.finish_time for r in free) for r in free)
    with Engine(tiny_model("llama"), page_size=8, num_pages=16) as engine:  # a CPU engine: 64 seats
        assert engine.core.max_num_seqs == 64
