"""benchmarks/qzo.py's CPU peak-allocated measure (the analogue of torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MB = 100 * 2**20


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("qzo_bench", ROOT / "benchmarks" / "qzo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alloc_tracker_counts_a_known_tensor_and_its_free():
    bench = _bench()
    before = torch.ones(1000)  # allocated before the tracker: not counted, its free ignored
    with bench.AllocTracker() as tracker:
        base = torch.zeros(250_000)  # 1 MB that exists before the region
        with tracker.region("alloc"):
            big = torch.empty(MB, dtype=torch.uint8)
            big.fill_(1)
        with tracker.region("free"):
            del big
        with tracker.region("transient"):
            (torch.ones(MB // 4) * 2).sum()  # two 100 MB temporaries alive together, then freed
        del before
    alloc, free, transient = tracker.summary("alloc"), tracker.summary("free"), tracker.summary("transient")
    assert alloc["live_at_start"] == base.numel() * 4
    assert alloc["peak"] - alloc["live_at_start"] == MB
    assert alloc["live_at_end"] - alloc["live_at_start"] == MB
    assert free["live_at_end"] == alloc["live_at_start"]  # the free dropped it
    assert 0 <= transient["peak"] - transient["live_at_start"] - 2 * MB < 64  # + the scalar 2 and the sum
    assert transient["live_at_end"] == transient["live_at_start"]
    blocks = tracker.live_at_peak("transient")
    assert sorted(b["bytes"] for b in blocks if not b["before_region"])[-2:] == [MB, MB]
    assert {b["op"] for b in blocks if b["bytes"] == MB} <= {"aten::empty", "aten::mul"}
    assert sum(b["bytes"] for b in blocks if b["before_region"]) == base.numel() * 4


def test_alloc_tracker_module_regions_attribute_activations():
    bench = _bench()
    model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 8))
    x = torch.randn(256, 64)
    with bench.AllocTracker() as tracker:
        tracker.annotate_modules(model)
        with tracker.region("fwd"), torch.no_grad():
            model(x)
    blocks = [b for b in tracker.live_at_peak("fwd") if not b["before_region"]]
    # the peak is inside the ReLU: the 256 x 4096 fp32 input of it and its output
    assert sum(b["bytes"] for b in blocks) == 2 * 256 * 4096 * 4
    assert {b["region"] for b in blocks} == {"module:0", "module:1"}


def test_alloc_tracker_peak_inside_matching_regions():
    bench = _bench()
    model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 8))
    x = torch.randn(256, 64)
    act = 256 * 4096 * 4
    with bench.AllocTracker() as tracker:
        tracker.annotate_modules(model)
        with tracker.region("fwd"), torch.no_grad():
            model(x)
            big = torch.empty(10 * act, dtype=torch.uint8)  # outside every module: the region's peak
            del big
    assert tracker.summary("fwd")["peak"] >= 10 * act
    peak, blocks = tracker.peak_inside(lambda n: n == "module:1", "fwd")  # inside the ReLU
    assert peak == 2 * act
    assert sorted((b["region"], b["bytes"]) for b in blocks if not b["before_region"]) == [
        ("module:0", act), ("module:1", act)]
    peak, _ = tracker.peak_inside(lambda n: n == "module:0", "fwd")
    assert peak == act


def test_alloc_tracker_ignores_blocks_of_an_earlier_session():
    bench = _bench()
    with bench.AllocTracker():
        old = torch.empty(MB, dtype=torch.uint8)  # counted by the allocator's process-wide counter
    with bench.AllocTracker() as tracker:
        with tracker.region("r"):
            del old  # its free must not make the counter negative
            new = torch.empty(MB // 2, dtype=torch.uint8)
    assert tracker.summary("r") == {"live_at_start": 0, "peak": MB // 2, "live_at_end": MB // 2}
    del new
