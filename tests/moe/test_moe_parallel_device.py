"""Expert parallelism on the accelerator: NCCL with the model on CUDA (one rank per GPU).

The lent GPU machines have one GPU, so the NCCL run there has one rank: it exercises the dispatcher's
CUDA path (counts, rows and partial sums exchanged by NCCL all-to-alls on device tensors) and the
byte accounting; more ranks run where there are more GPUs. The same check on one CPU rank with gloo
runs everywhere, so the test itself is exercised without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from llmsys.models import forward
from llmsys.moe import EPCase, EPLBGreedy, RoutingRecorder, check_expert_parallel
from llmsys.testing import tiny_model

_NCCL = pytest.mark.skipif(
    not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()),
    reason="needs a CUDA device and NCCL",
)


def _case(family: str, ranks: int) -> EPCase:
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    config = {key: 8}
    ids = torch.randint(3, 500, (2 * ranks, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model(family, **config)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        forward(model, ids)
    placement = EPLBGreedy(ranks, num_slots=8 + ranks)(rec.trace())  # one replica per rank
    return EPCase(family, placement, ids, config=config)


@pytest.mark.parametrize(
    "backend, device",
    [("gloo", "cpu"), pytest.param("nccl", "cuda", marks=[pytest.mark.gpu, _NCCL])],
)
def test_expert_parallel_on_every_gpu_of_the_machine(backend, device):
    ranks = max(1, min(torch.cuda.device_count(), 4)) if device == "cuda" else 1
    cases = [_case(family, ranks) for family in ("mixtral", "qwen2_moe")]
    for check in check_expert_parallel(cases, ranks, backend=backend, device=device):
        assert check.max_abs_diff <= 1e-4, (check.family, check.max_abs_diff)
        assert check.bytes_match, (check.family, check.measured, check.predicted)
        assert check.memory_match and check.reentry_diff <= 1e-4


def test_more_ranks_than_gpus_is_refused():
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(RuntimeError, match="one per rank"):
        check_expert_parallel([], too_many, backend="nccl", device="cuda")
