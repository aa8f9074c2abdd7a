"""CUDA paths: lanes on streams / green contexts, the Triton decode kernel, GPU profiling (skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from llmsys.serve import Engine, Profile, SamplingParams, StaticSplit, green_context_support
from llmsys.testing import tiny_model

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("scheduler", ["nexus", "chunked", "static"])
def test_engine_on_cuda_equals_generate(scheduler, greedy):
    model = tiny_model("llama").cuda()
    prompts = greedy.prompts((5, 40, 17, 90, 3, 64), model.config.vocab_size, seed=0)
    news = (10, 6, 12, 5, 14, 8)
    refs = [greedy.reference(model, p.cuda(), n) for p, n in zip(prompts, news)]
    sched = StaticSplit(prefill_budget=32) if scheduler == "static" else scheduler
    with Engine(model, sched, page_size=8, num_pages=256) as engine:
        assert engine.execution.mode in ("green-contexts", "streams")
        outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in news])
        engine.check()
    for out, ref in zip(outs, refs):
        greedy.check(out.tokens, ref)


@needs_cuda
def test_execution_reports_green_contexts_or_why_not():
    ok, reason = green_context_support()
    engine = Engine(tiny_model("llama").cuda(), "nexus", page_size=8, num_pages=64)
    if ok:
        assert engine.execution.mode == "green-contexts" and engine.execution.partitions
        assert engine.execution.granularity in (4, 8)
    else:
        assert engine.execution.mode == "streams" and engine.execution.reason
    assert engine.execution.describe()


@needs_cuda
def test_cancel_while_a_lane_runs_frees_pages_on_cuda():
    engine = Engine(tiny_model("llama").cuda(), "nexus", page_size=8, num_pages=256)
    ids = [engine.submit(list(range(3, 3 + n)), SamplingParams(max_new_tokens=20, ignore_eos=True)) for n in (50, 7)]
    engine.step()
    for rid in ids:
        engine.cancel(rid)
    engine.run()
    engine.check()
    assert engine.runner.pages_in_use() == 0


@needs_cuda
def test_gpu_profile_quick(tmp_path):
    from llmsys.serve.profile import gpu_model, profile_gpu

    profile = profile_gpu(gpu_model(layers=2), quick=True, repeats=2)
    path = profile.save(tmp_path / "gpu.json")
    loaded = Profile.load(path)
    assert loaded.concurrent and loaded.num_sms == torch.cuda.get_device_properties(0).multi_processor_count
    assert loaded.fit["median_abs_rel_error"] < 1.0
