"""The asyncio interface: concurrent streams, cancellation, rejection, failure propagation."""

from __future__ import annotations

import asyncio

import pytest

from llmsys.serve import AsyncEngine, Engine, EngineClosedError, PromptTooLongError, SamplingParams
from llmsys.testing import tiny_model


def test_concurrent_streams_equal_generate(greedy):
    model = tiny_model("qwen2")
    prompts = greedy.prompts((12, 3, 45, 28, 7), model.config.vocab_size, seed=10)
    news = (9, 14, 5, 11, 8)
    refs = [greedy.reference(model, p, n) for p, n in zip(prompts, news)]

    async def consume(engine: AsyncEngine, prompt, n, delay):
        await asyncio.sleep(delay)  # requests arrive while others are being served
        return [e.token async for e in engine.stream(prompt, SamplingParams(max_new_tokens=n))]

    async def main():
        async with AsyncEngine(Engine(model, "nexus", page_size=8, num_pages=64)) as engine:
            results = await asyncio.gather(
                *(consume(engine, p, n, 0.002 * i) for i, (p, n) in enumerate(zip(prompts, news)))
            )
            out = await engine.generate(prompts[0], SamplingParams(max_new_tokens=news[0]))
            engine.engine.check()
            return results, out

    results, out = asyncio.run(main())
    for tokens, ref in zip(results, refs):
        greedy.check(tokens, ref)
    assert out.tokens == results[0] and out.finish_reason in ("length", "stop")


def test_cancel_ends_the_stream_and_frees_pages():
    model = tiny_model("llama")

    async def main():
        engine = Engine(model, "chunked", page_size=4, num_pages=64)
        async with AsyncEngine(engine) as aengine:
            long = await aengine.submit(list(range(3, 30)), SamplingParams(max_new_tokens=50, ignore_eos=True))
            short = asyncio.ensure_future(aengine.generate([7, 8, 9], SamplingParams(max_new_tokens=4)))
            seen = []
            async for event in aengine.events(long):
                seen.append(event.token)
                if len(seen) == 3:
                    await aengine.cancel(long)
            done = await short
            assert engine.output(long).finish_reason == "cancelled"
            assert 3 <= len(seen) < 50 and len(done.tokens) == 4
            engine.check()
            assert engine.runner.pages_in_use() == 0

    asyncio.run(main())


def test_rejected_prompt_raises_in_the_caller_only():
    model = tiny_model("llama")

    async def main():
        async with AsyncEngine(Engine(model, "nexus", page_size=8, num_pages=4)) as aengine:
            ok = asyncio.ensure_future(aengine.generate([5, 6, 7], SamplingParams(max_new_tokens=5)))
            with pytest.raises(PromptTooLongError):
                await aengine.submit(list(range(3, 60)))
            out = await ok
            assert len(out.tokens) == 5 or out.finish_reason == "stop"
        with pytest.raises(EngineClosedError):
            await aengine.submit([5])

    asyncio.run(main())


def test_a_failing_step_fails_every_stream(monkeypatch):
    model = tiny_model("llama")
    engine = Engine(model, "chunked", page_size=8, num_pages=32)

    def boom():
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", boom)

    async def main():
        aengine = AsyncEngine(engine)
        with pytest.raises(RuntimeError, match="device lost"):
            await aengine.generate([5, 6, 7])
        with pytest.raises(EngineClosedError, match="device lost"):
            await aengine.submit([5])

    asyncio.run(main())
