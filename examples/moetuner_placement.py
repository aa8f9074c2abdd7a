"""MoETuner end to end: record routing -> solve a placement -> check it -> export it for an engine.

    python examples/moetuner_placement.py                 # a tiny random Mixtral (seconds, no download)
    python examples/moetuner_placement.py /path/to/model  # a local Mixtral / Qwen-MoE / OLMoE checkpoint

Writes placement.json (llmsys), init_expert_location.json (SGLang --init-expert-location),
physical_to_logical_map.pt (vLLM) and expert_map.json (vLLM-Ascend) into ./moetuner_out/.
"""

import sys
from pathlib import Path

import torch

from llmsys.models import forward
from llmsys.moe import EPLBGreedy, MoETuner, RoutingRecorder, Topology, evaluate, to_sglang, to_vllm, to_vllm_ascend
from llmsys.testing import tiny_model

out = Path("moetuner_out")
out.mkdir(exist_ok=True)

# 1. the model: a local checkpoint if given, else a tiny random Mixtral with 8 experts x 8 layers
if len(sys.argv) > 1:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True, dtype=torch.bfloat16).eval()
else:
    model = tiny_model("mixtral", num_local_experts=8, num_hidden_layers=8)

# 2. profile routing on a sample of the workload (here: random token ids; use real prompts in practice)
def record(num_sequences: int, seed: int):
    ids = torch.randint(3, model.config.vocab_size, (num_sequences, 128), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        for batch in ids.split(4):
            forward(model, batch)
    return recorder.trace()


trace = record(16, seed=0)  # the profile the placement is solved on
held_out = record(8, seed=1)  # other traffic of the same workload, to check that the gain carries over
print(f"trace: {trace.num_tokens} tokens x {trace.num_layers} MoE layers, top-{trace.top_k} of {trace.num_experts}")
print("structure to exploit:", trace.stats())  # skew; inter-layer mutual information vs independent layers

# 3. solve for 4 GPUs in one node (Topology.make(16, num_nodes=2) for two 8-GPU nodes)
topology = Topology.make(4)
greedy = EPLBGreedy(topology)(trace)
placement = MoETuner(topology, time_limit=10)(trace)
placement.save(out / "placement.json")

# 4. compare: per-layer load balance and the heaviest GPU pair's inter-layer traffic
#    on the profile itself and on the held-out traffic (what a deployment would see)
for name, p in (("EPLB greedy", greedy), ("MoETuner", placement)):
    for where, t in (("profile", trace), ("held out", held_out)):
        r = evaluate(p, t)
        print(f"{name:12s} {where:9s} max/mean load {r.max_mean_load:.3f}   max pair traffic "
              f"{r.max_pair_traffic:8.0f}   cross-GPU share {r.cross_fraction:.2f}")  # fmt: skip
print("MoETuner stages:", placement.meta["method"], "| MIP gap:", placement.meta.get("mip_gap"))

# 5. export for the engines (each raises PlacementConstraintError if the engine cannot load it)
to_sglang(placement, out / "init_expert_location.json")  # sglang ... --init-expert-location <file>
to_vllm(placement, out / "physical_to_logical_map.pt")  # vLLM EPLB state
to_vllm_ascend(placement, out / "expert_map.json")  # vLLM-Ascend expert_map_path
print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}/")
