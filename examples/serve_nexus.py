"""Nexus in a notebook: serve concurrent requests, stream tokens, then ask the simulator about a GPU.

    python examples/serve_nexus.py                 # a tiny random Llama on the CPU (seconds, no download)
    python examples/serve_nexus.py /path/to/model  # a local Llama / Mistral / Qwen2 / Qwen3 / Phi-3 checkpoint

1. The engine: continuous batching on paged KV with the Nexus scheduler (prefill and decode lanes;
   on a CPU the split between them is logical, on CUDA they run on SM partitions or streams).
2. asyncio: requests arriving at different times, streamed as they are generated.
3. The simulator: the same scheduler code on the default cost-model profile (shaped like an 8B model
   on an H100 -- not a measurement; `llmsys serve profile` measures one on a GPU).
"""

import asyncio
import sys

import torch

from llmsys.serve import AsyncEngine, ChunkedPrefill, Engine, Nexus, SamplingParams, simulate, synthetic_workload

torch.set_num_threads(1)

# 1. a model and a few prompts of different lengths
if len(sys.argv) > 1:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.bfloat16).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
    texts = ["The capital of France is", "Write a haiku about GPUs:", "def fibonacci(n):"]
    prompts = [tok(t).input_ids for t in texts]
else:
    from llmsys.testing import tiny_model

    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (12, 70, 30)]

engine = Engine(model, scheduler="nexus", page_size=16, num_pages=512)
print(engine.execution.describe())

outputs = engine.generate(prompts, SamplingParams(max_new_tokens=16))
for out in outputs:
    print(f"{out.request_id}: {len(out.prompt)} prompt tokens -> {out.tokens[:8]}... TTFT {out.ttft * 1e3:.1f} ms")

# streaming one request while another one is served alongside it
other = engine.submit(prompts[0], SamplingParams(max_new_tokens=8))
rid = engine.submit(prompts[1], SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0))
print("streamed:", [event.token for event in engine.stream(rid)])
engine.run()  # finish the other one
engine.close()


# 2. the asyncio interface: three clients arriving 5 ms apart
async def client(aengine: AsyncEngine, prompt, delay: float) -> list[int]:
    await asyncio.sleep(delay)
    return [event.token async for event in aengine.stream(prompt, SamplingParams(max_new_tokens=8))]


async def serve() -> None:
    async with AsyncEngine(Engine(model, "nexus", page_size=16, num_pages=512)) as aengine:
        results = await asyncio.gather(*(client(aengine, p, 0.005 * i) for i, p in enumerate(prompts)))
    print("async:", [r[:4] for r in results])


asyncio.run(serve())

# 3. the simulator: Nexus vs chunked prefill on a long-prompt (arXiv-summarisation-like) load
workload = synthetic_workload("arxiv", rate=2.0, num_requests=200, seed=0)
for scheduler in (Nexus(ttft_slo=5.0), ChunkedPrefill(token_budget=2048)):
    m = simulate(scheduler, workload, ttft_slo=5.0, tbt_slo=0.1).metrics
    print(
        f"simulated {scheduler.name:8s} TTFT P50/P99 {m.ttft.p50:.2f}/{m.ttft.p99:.2f} s  "
        f"TBT P50/P99 {m.tbt.p50 * 1e3:.0f}/{m.tbt.p99 * 1e3:.0f} ms  SLO attainment {m.slo_attainment:.0%}"
    )
