"""MoETuner: expert placement for expert-parallel MoE serving (balanced load, less inter-GPU traffic).

    from llmsys.moe import RoutingRecorder, MoETuner, evaluate, to_sglang

    with RoutingRecorder(model) as rec:          # 1. profile routing on a sample of the task
        model(input_ids)
    trace = rec.trace()
    placement = MoETuner(topology=4)(trace)      # 2. solve (ILP 1 balance, ILP 2 routing)
    print(evaluate(placement, trace).summary())  # 3. load balance, GPU-pair traffic
    to_sglang(placement, "placement.json")       # 4. deploy (--init-expert-location)

Also: baselines (`Contiguous`, `RoundRobin`, `EPLBGreedy`), expert-parallel execution over
torch.distributed (`ExpertParallel`, `launch`; `load_expert_parallel` reads only a rank's experts
from a checkpoint), vLLM / SGLang trace importers and exporters, and synthetic traces at real
shapes. See docs/moe.md.
"""

from llmsys.moe.errors import InfeasiblePlacementError, PlacementConstraintError, PlacementError, TraceError
from llmsys.moe.evaluate import (
    Hardware,
    PlacementReport,
    StepEstimate,
    default_homes,
    ep_dispatch_tokens,
    evaluate,
    plot_reports,
    predict_ep_bytes,
)
from llmsys.moe.exact import exact_placement
from llmsys.moe.export import (
    FORMATS,
    check_deployable,
    export,
    pad_with_replicas,
    to_sglang,
    to_vllm,
    to_vllm_ascend,
    vllm_eplb_state,
)
from llmsys.moe.load import load_expert_parallel
from llmsys.moe.moetuner import MoETuner
from llmsys.moe.parallel import (
    CommStats,
    EPCase,
    EPCheck,
    ExpertParallel,
    check_expert_parallel,
    launch,
    rank_experts,
)
from llmsys.moe.placement import Placement, Topology, load_placement, placement_from_assignment
from llmsys.moe.solvers import Contiguous, EPLBGreedy, RoundRobin, balanced_packing, replicate
from llmsys.moe.trace import (
    SHAPES,
    RoutingRecorder,
    RoutingTrace,
    load_trace,
    synthetic_shape_trace,
    synthetic_trace,
)

#: solver name (CLI `--solver`, benchmark) -> class
SOLVERS = {
    "contiguous": Contiguous,
    "round_robin": RoundRobin,
    "eplb": EPLBGreedy,
    "moetuner": MoETuner,
}

__all__ = [
    "FORMATS",
    "SHAPES",
    "SOLVERS",
    "CommStats",
    "Contiguous",
    "EPCase",
    "EPCheck",
    "EPLBGreedy",
    "ExpertParallel",
    "Hardware",
    "InfeasiblePlacementError",
    "MoETuner",
    "exact_placement",
    "Placement",
    "PlacementConstraintError",
    "PlacementError",
    "PlacementReport",
    "RoundRobin",
    "RoutingRecorder",
    "RoutingTrace",
    "StepEstimate",
    "Topology",
    "TraceError",
    "balanced_packing",
    "check_deployable",
    "check_expert_parallel",
    "default_homes",
    "ep_dispatch_tokens",
    "evaluate",
    "export",
    "launch",
    "load_expert_parallel",
    "load_placement",
    "load_trace",
    "pad_with_replicas",
    "placement_from_assignment",
    "plot_reports",
    "predict_ep_bytes",
    "rank_experts",
    "replicate",
    "synthetic_shape_trace",
    "synthetic_trace",
    "to_sglang",
    "to_vllm",
    "to_vllm_ascend",
    "vllm_eplb_state",
]
