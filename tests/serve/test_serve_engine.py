"""The engine: greedy outputs equal `model.generate` per request, streaming, cancellation, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from llmsys.models import UnsupportedModelError
from llmsys.serve import (
    ChunkedPrefill,
    Engine,
    EngineClosedError,
    PromptTooLongError,
    RequestNotFoundError,
    SamplingParams,
    SchedulerConfigError,
    StaticSplit,
)
from llmsys.testing import every_dense_family, tiny_model

LENGTHS = (5, 17, 33, 1, 64, 40, 9, 100, 23, 2)
NEWS = (12, 5, 20, 8, 16, 3, 25, 10, 7, 14)


def _check_all(greedy, model, scheduler, prompts, refs, **engine_kwargs):
    with Engine(model, scheduler, page_size=8, num_pages=160, **engine_kwargs) as engine:
        outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in NEWS])
        engine.check()
        assert engine.runner.pages_in_use() == 0  # every finished request gave its pages back
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.finished and out.finish_reason in ("length", "stop")
        greedy.check(
            out.tokens, ref, f"{type(scheduler).__name__ if not isinstance(scheduler, str) else scheduler} #{i}"
        )
    return outs


@every_dense_family
def test_concurrent_requests_equal_generate(family, greedy):
    # ten requests of mixed lengths at once; a small chunk budget makes chunked prefill split prompts
    # across iterations and mix them with decodes, Nexus runs its two lanes
    model = tiny_model(family)
    prompts = greedy.prompts(LENGTHS, model.config.vocab_size)
    refs = [greedy.reference(model, p, n) for p, n in zip(prompts, NEWS)]
    _check_all(greedy, model, "nexus", prompts, refs)
    _check_all(greedy, model, ChunkedPrefill(token_budget=24), prompts, refs)


def test_every_scheduler_equals_generate(greedy):
    model = tiny_model("llama", seed=1)
    prompts = greedy.prompts(LENGTHS, model.config.vocab_size, seed=1)
    refs = [greedy.reference(model, p, n) for p, n in zip(prompts, NEWS)]
    for scheduler in ("fcfs", StaticSplit(prefill_budget=40), ChunkedPrefill(token_budget=7)):
        _check_all(greedy, model, scheduler, prompts, refs)
    # a page of one token and a page larger than any request
    for page_size in (1, 128):
        with Engine(model, "nexus", page_size=page_size, num_pages=4096 // page_size) as engine:
            outs = engine.generate(prompts[:4], [SamplingParams(max_new_tokens=n) for n in NEWS[:4]])
        for out, ref in zip(outs, refs):
            greedy.check(out.tokens, ref, f"page_size={page_size}")


def test_requests_arriving_while_others_decode(greedy):
    model = tiny_model("qwen3")
    prompts = greedy.prompts((30, 7, 55, 12), model.config.vocab_size, seed=2)
    refs = [greedy.reference(model, p, 10) for p in prompts]
    engine = Engine(model, "nexus", page_size=4, num_pages=200)
    params = SamplingParams(max_new_tokens=10)
    ids = [engine.submit(prompts[0], params)]
    for p in prompts[1:]:  # each new request joins two steps later, while the others are decoding
        engine.step()
        engine.step()
        ids.append(engine.submit(p, params))
    engine.run()
    for rid, ref in zip(ids, refs):
        greedy.check(engine.output(rid).tokens, ref, rid)
    engine.check()


def test_stream_yields_tokens_in_order():
    model = tiny_model("llama")
    engine = Engine(model, "chunked", page_size=8, num_pages=64)
    a = engine.submit(list(range(3, 40)), SamplingParams(max_new_tokens=6, ignore_eos=True))
    b = engine.submit(list(range(10, 15)), SamplingParams(max_new_tokens=9, ignore_eos=True))
    events = list(engine.stream(a))
    assert [e.index for e in events] == list(range(6))
    assert [e.token for e in events] == engine.output(a).tokens
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert not any(e.finished for e in events[:-1])
    assert all(x.time <= y.time for x, y in zip(events, events[1:]))
    assert not engine.is_finished(b)  # b advanced alongside a and is still running
    assert 0 < len(engine.output(b).tokens) < 9
    assert [e.token for e in engine.stream(b)] == engine.output(b).tokens
    out = engine.output(b)
    assert out.ttft is not None and out.ttft > 0 and len(out.tbts) == 8


def test_stop_tokens_and_eos():
    model = tiny_model("llama")
    engine = Engine(model, "nexus", page_size=8, num_pages=64)
    prompt = list(range(3, 20))
    free = engine.output(engine.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    engine.run()
    tokens = engine.output(free.request_id).tokens
    stop_at = tokens[4]
    rid = engine.submit(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(stop_at,)))
    engine.run()
    out = engine.output(rid)
    assert out.tokens == tokens[: tokens.index(stop_at) + 1] and out.finish_reason == "stop"


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model("llama")
    engine = Engine(model, "chunked", page_size=8, num_pages=128)
    prompt = list(range(3, 30))
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate([prompt, prompt], [sampled, sampled])
    assert a.tokens == b.tokens  # same seed, same tokens
    c = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=1.0, seed=8, ignore_eos=True))[0]
    assert c.tokens != a.tokens
    greedy_out, top1 = engine.generate(
        [prompt, prompt],
        [
            SamplingParams(max_new_tokens=10, ignore_eos=True),
            SamplingParams(max_new_tokens=10, temperature=0.7, top_k=1, seed=1, ignore_eos=True),
        ],
    )
    assert top1.tokens == greedy_out.tokens


def test_cancel_frees_pages_and_spares_the_others(greedy):
    model = tiny_model("mistral")
    prompts = greedy.prompts((20, 35, 8), model.config.vocab_size, seed=3)
    refs = [greedy.reference(model, p, 12) for p in prompts]
    engine = Engine(model, "nexus", page_size=4, num_pages=100)
    ids = [engine.submit(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    engine.step()
    engine.step()
    assert engine.cancel(ids[1]) is True
    engine.check()
    assert ids[1] not in engine.runner.pages
    engine.run()
    assert engine.output(ids[1]).finish_reason == "cancelled"
    assert engine.cancel(ids[1]) is False  # already finished
    for i in (0, 2):
        greedy.check(engine.output(ids[i]).tokens, refs[i], ids[i])
    assert engine.runner.pages_in_use() == 0
    with pytest.raises(RequestNotFoundError, match="nope"):
        engine.cancel("nope")


def test_no_page_leaks_after_1000_random_submit_cancel_operations():
    model = tiny_model("llama", num_hidden_layers=1)
    engine = Engine(model, "nexus", page_size=4, num_pages=120, max_num_seqs=12)
    rng = random.Random(0)
    live: list[str] = []
    peak = 0
    for op in range(1000):
        r = rng.random()
        if r < 0.45:
            n = rng.randint(1, 40)
            live.append(engine.submit([rng.randint(3, 500) for _ in range(n)], SamplingParams(rng.randint(1, 6))))
        elif r < 0.75 and live:
            engine.cancel(live.pop(rng.randrange(len(live))))
        else:
            engine.step()
            live = [rid for rid in live if not engine.is_finished(rid)]
        peak = max(peak, engine.runner.pages_in_use())
        if op % 50 == 0:
            engine.check()
    engine.check()
    reasons = [engine.output(rid).finish_reason for rid in engine._done]
    assert peak > 60 and reasons.count("cancelled") > 100 and reasons.count("length") > 100  # not vacuous
    for rid in live:
        engine.cancel(rid)
    engine.run()
    engine.check()
    assert engine.runner.pages_in_use() == 0 and engine.core.reserved_pages == 0 and engine.num_live == 0
    for pool in engine.runner.pools:
        assert pool.owned() == []


def test_prompt_too_long_is_rejected_without_disturbing_others(greedy):
    model = tiny_model("llama")
    prompts = greedy.prompts((10, 25), model.config.vocab_size, seed=4)
    refs = [greedy.reference(model, p, 8) for p in prompts]
    engine = Engine(model, "nexus", page_size=8, num_pages=8)  # 64 tokens of KV in all
    ids = [engine.submit(p, SamplingParams(max_new_tokens=8)) for p in prompts]
    engine.step()
    before = (engine.core.reserved_pages, engine.runner.pages_in_use(), engine.num_live)
    with pytest.raises(PromptTooLongError, match="num_pages"):
        engine.submit(list(range(3, 70)), SamplingParams(max_new_tokens=4))
    with pytest.raises(PromptTooLongError, match="max_new_tokens"):
        engine.submit(list(range(3, 50)), SamplingParams(max_new_tokens=40))
    with pytest.raises(PromptTooLongError, match="max_position_embeddings"):
        Engine(model, page_size=8, num_pages=2048).submit([5] * 8190, SamplingParams(max_new_tokens=8))
    assert (engine.core.reserved_pages, engine.runner.pages_in_use(), engine.num_live) == before
    engine.run()
    for rid, ref in zip(ids, refs):
        greedy.check(engine.output(rid).tokens, ref, rid)


def test_requests_wait_for_pages_instead_of_failing(greedy):
    # the pool holds one request at a time: the others queue, then run, with the same outputs
    model = tiny_model("phi3")
    prompts = greedy.prompts((20, 18, 22), model.config.vocab_size, seed=5)
    refs = [greedy.reference(model, p, 6) for p in prompts]
    engine = Engine(model, "chunked", page_size=8, num_pages=4)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for out, ref in zip(outs, refs):
        greedy.check(out.tokens, ref)
    first_done = min(o.record.finish_time for o in outs)
    assert sorted(o.record.first_token_time for o in outs)[1] >= first_done  # admitted one after another


def test_bad_input_errors():
    model = tiny_model("llama")
    engine = Engine(model, page_size=8, num_pages=32)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([])
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 2, 10_000])
    engine.submit([5, 6], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.submit([5, 6], request_id="x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(SchedulerConfigError, match="unknown scheduler"):
        Engine(model, "round-robin")
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        Engine(tiny_model("mistral", sliding_window=16))
    with pytest.raises(UnsupportedModelError, match="dense"):
        Engine(tiny_model("mixtral"))
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit([5])
    assert engine.runner.pages_in_use() == 0


def test_paged_attention_refuses_to_run_outside_the_engine():
    from llmsys.serve.runner import ATTENTION_NAME

    model = tiny_model("llama")
    model.config._attn_implementation = ATTENTION_NAME
    with pytest.raises(RuntimeError, match="only runs inside"):
        model(torch.tensor([[3, 4, 5]]))


def test_engine_with_the_triton_decode_kernel(greedy):
    # `make test` sets TRITON_INTERPRET=1: then the paged decode kernel itself runs in the interpreter
    from llmsys.kernels import use_triton

    if not use_triton(torch.device("cpu")):
        pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported)")
    model = tiny_model("llama", num_hidden_layers=1)
    prompts = greedy.prompts((9, 20), model.config.vocab_size, seed=6)
    refs = [greedy.reference(model, p, 4) for p in prompts]
    with Engine(model, "chunked", page_size=8, num_pages=16, kernel_backend="triton") as engine:
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    for out, ref in zip(outs, refs):
        greedy.check(out.tokens, ref)


def test_direct_slot_writes_of_the_cuda_path(greedy):
    # on CUDA the runner writes K/V straight into the pool's slots (no host sync); check that path here
    model = tiny_model("qwen3")
    prompts = greedy.prompts((14, 33, 5), model.config.vocab_size, seed=7)
    refs = [greedy.reference(model, p, 9) for p in prompts]
    engine = Engine(model, "nexus", page_size=8, num_pages=64)
    engine.runner.direct_writes = True
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=9))
    for out, ref in zip(outs, refs):
        greedy.check(out.tokens, ref)


def test_the_concurrent_lane_loop(greedy):
    # the CUDA loop (launch every idle lane, complete whichever finishes) driven on a CPU: each lane's
    # forward runs synchronously, so both lanes of a round are in flight together, as on a GPU
    class CPULanes:
        def stream(self, lane, share):
            return None

    model = tiny_model("llama")
    prompts = greedy.prompts((30, 8, 51, 3, 20), model.config.vocab_size, seed=8)
    refs = [greedy.reference(model, p, 11) for p in prompts]
    for scheduler in ("nexus", StaticSplit(prefill_budget=24), ChunkedPrefill(token_budget=16)):
        engine = Engine(model, scheduler, page_size=8, num_pages=96, record_batches=True)
        engine._streams = CPULanes()
        engine.core.concurrent = True
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=11))
        for out, ref in zip(outs, refs):
            greedy.check(out.tokens, ref, str(scheduler))
        engine.check()
        lanes = {lane for lane, _, _ in engine.batch_log}
        assert lanes == set(engine.scheduler.lanes) and all(s > 0 for _, _, s in engine.batch_log)
