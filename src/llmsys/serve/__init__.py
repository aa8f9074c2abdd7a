"""Nexus: a serving engine with intra-GPU prefill/decode disaggregation, its baselines, cost model and simulator.

    from llmsys.serve import Engine, AsyncEngine, SamplingParams, simulate, synthetic_workload

    engine = Engine(model, scheduler="nexus")                  # continuous batching on paged KV
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=64))

    result = simulate("nexus", synthetic_workload("sharegpt", rate=20, num_requests=500))
    print(result.metrics.ttft.p99, result.metrics.tbt.p99)     # default profile: 8B-shaped model on an H100

Schedulers (one interface, shared by the engine and the simulator): `FCFSPrefillFirst` (vLLM v0),
`ChunkedPrefill` (Sarathi-Serve / vLLM v1), `StaticSplit`, `Nexus`. See docs/serve.md.
"""

from llmsys.serve.aio import AsyncEngine
from llmsys.serve.core import Completion, ServingCore, run_serial_round
from llmsys.serve.costmodel import BatchWork, CostModel, ModelShape, Profile, default_profile
from llmsys.serve.engine import Engine, RequestOutput, TokenEvent
from llmsys.serve.errors import (
    EngineClosedError,
    GPUUnavailableError,
    ProfileError,
    PromptTooLongError,
    RequestNotFoundError,
    SchedulerConfigError,
    ServeError,
    SimulationError,
    WorkloadError,
)
from llmsys.serve.metrics import LatencyStats, RequestRecord, ServingMetrics, relative_error, summarize
from llmsys.serve.partition import ExecutionInfo, green_context_support
from llmsys.serve.profile import fit_cpu_profile, fit_gpu_profile, profile_cpu, profile_gpu
from llmsys.serve.request import Batch, RequestState, SamplingParams
from llmsys.serve.schedulers import (
    SCHEDULERS,
    ChunkedPrefill,
    FCFSPrefillFirst,
    Nexus,
    Scheduler,
    SchedulerState,
    StaticSplit,
    make_scheduler,
)
from llmsys.serve.simulator import SimulationResult, max_rate_under_slo, rate_sweep, simulate
from llmsys.serve.workload import (
    DATASETS,
    WorkloadRequest,
    burst_workload,
    load_csv_workload,
    poisson_arrivals,
    synthetic_workload,
)

__all__ = [
    "DATASETS",
    "SCHEDULERS",
    "AsyncEngine",
    "Batch",
    "BatchWork",
    "ChunkedPrefill",
    "Completion",
    "CostModel",
    "Engine",
    "EngineClosedError",
    "ExecutionInfo",
    "FCFSPrefillFirst",
    "GPUUnavailableError",
    "LatencyStats",
    "ModelShape",
    "Nexus",
    "Profile",
    "ProfileError",
    "PromptTooLongError",
    "RequestNotFoundError",
    "RequestOutput",
    "RequestRecord",
    "RequestState",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfigError",
    "SchedulerState",
    "ServeError",
    "ServingCore",
    "ServingMetrics",
    "SimulationError",
    "SimulationResult",
    "StaticSplit",
    "TokenEvent",
    "WorkloadError",
    "WorkloadRequest",
    "burst_workload",
    "default_profile",
    "fit_cpu_profile",
    "fit_gpu_profile",
    "green_context_support",
    "load_csv_workload",
    "make_scheduler",
    "max_rate_under_slo",
    "poisson_arrivals",
    "profile_cpu",
    "profile_gpu",
    "rate_sweep",
    "relative_error",
    "run_serial_round",
    "simulate",
    "summarize",
    "synthetic_workload",
]
