"""Expert-parallel execution: 2 and 4 CPU processes (gloo) against the single-process model.

Each rank shards its model to the experts of its slots (the others' weights are released), so outputs
can only match if each expert really runs on the rank the placement names; the expert bytes each rank
holds are compared with the placement x parameter shapes, and bytes sent per rank pair with
`predict_ep_bytes` on the single-process trace.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from llmsys import models
from llmsys.models import forward, moe_blocks
from llmsys.moe import (
    EPCase,
    EPLBGreedy,
    ExpertParallel,
    MoETuner,
    Placement,
    PlacementConstraintError,
    RoutingRecorder,
    Topology,
    check_expert_parallel,
)
from llmsys.moe.parallel import CATEGORIES
from llmsys.testing import MOE_FAMILIES, tiny_model

ATOL = 1e-5


def _ids(batch, seq=12, seed=0):
    return torch.randint(3, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _trace(family, ids, **config):
    model = tiny_model(family, **config)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        forward(model, ids)
    return rec.trace()


def _expected_memory(case):
    """Per rank: the experts of its slots per MoE layer, and their bytes from the parameter shapes."""
    model = tiny_model(case.family, seed=case.seed, **case.config)
    p, n = case.placement, case.placement.slots_per_gpu
    full, held, nbytes = 0, [], []
    row_bytes = []  # per MoE layer: bytes of one expert = all its experts' parameter bytes / E
    for b in moe_blocks(model):
        layer_bytes = sum(t.numel() * t.element_size() for t in b.experts.parameters())
        full += layer_bytes
        row_bytes.append(layer_bytes // b.num_experts)
    for rank in range(p.num_gpus):
        slots = p.phy2log[:, rank * n : (rank + 1) * n].tolist()
        mine = [tuple(sorted(set(row) - {-1})) for row in slots]
        held.append(mine)
        nbytes.append(sum(len(m) * rb for m, rb in zip(mine, row_bytes)))
    return full, held, nbytes


def _assert_ok(check, case):
    assert check.max_abs_diff <= ATOL, f"{check.family}: EP logits differ by {check.max_abs_diff}"
    for key in (*CATEGORIES, "total"):
        np.testing.assert_array_equal(check.measured[key], check.predicted[key], err_msg=f"{check.family} {key}")
    off = ~np.eye(check.world_size, dtype=bool)
    assert (check.measured["dispatch"][off] > 0).any()  # tokens really crossed ranks
    full, held, nbytes = _expected_memory(case)
    assert check.entry_expert_bytes == [full] * check.world_size
    assert [[tuple(h) for h in r] for r in check.held_experts] == held
    assert check.held_expert_bytes == nbytes == check.expected_expert_bytes, check.family
    assert max(nbytes) < full  # every rank released some experts
    assert check.reentry_diff == 0.0
    for rank, error in enumerate(check.outside_errors):  # no rank holds every expert of every layer
        assert error is not None and "holds only experts" in error, (check.family, rank)


def test_two_ranks_every_family():
    cases = []
    for i, family in enumerate(MOE_FAMILIES):
        ids = _ids(4, seed=i)
        trace = _trace(family, ids)
        if family == "qwen3_moe":  # an unequal placement (empty slots) runs too: 3 experts on rank 0, 1 on rank 1
            placement = Placement(np.array([[0, 1, 2, 3, -1, -1]] * trace.num_layers), 4, Topology.make(2))
        else:  # 6 slots for 4 experts: the two hottest are replicated (replica choice is exercised)
            placement = EPLBGreedy(2, num_slots=6)(trace)
        cases.append(EPCase(family, placement, ids))
    for check, case in zip(check_expert_parallel(cases, world_size=2), cases):
        _assert_ok(check, case)


def test_four_ranks_eight_experts():
    ids = _ids(4, seq=10, seed=5)
    mixtral = _trace("mixtral", ids, num_local_experts=8)
    olmoe = _trace("olmoe", ids, num_experts=8)
    cases = [
        EPCase("mixtral", MoETuner(4, time_limit=2)(mixtral), ids, config={"num_local_experts": 8}),
        EPCase("olmoe", EPLBGreedy(4, num_slots=12)(olmoe), ids, config={"num_experts": 8}),
    ]
    for check, case in zip(check_expert_parallel(cases, world_size=4), cases):
        _assert_ok(check, case)


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_is_exact_and_restores_the_model(single_rank_group):
    model = tiny_model("qwen2_moe")
    ids = _ids(2)
    trace = _trace("qwen2_moe", ids)
    with torch.no_grad():
        reference = forward(model, ids).logits
        with ExpertParallel(EPLBGreedy(1)(trace))(model) as stats:
            out = forward(model, ids).logits
        after = forward(model, ids).logits
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    assert stats.calls == len(moe_blocks(model)) and stats.total.sum() == 0  # nothing leaves one rank
    assert stats.held_expert_bytes == stats.entry_expert_bytes > 0  # one rank holds every expert
    assert all("forward" not in b.experts.__dict__ for b in moe_blocks(model))
    torch.testing.assert_close(after, reference, atol=0, rtol=0)


def test_runtime_errors_name_the_fix(single_rank_group):
    model = tiny_model("mixtral")
    trace = _trace("mixtral", _ids(2))
    with pytest.raises(PlacementConstraintError, match="topology=1"):
        with ExpertParallel(EPLBGreedy(2)(trace))(model):
            pass
    wrong_layers = EPLBGreedy(1)(_trace("mixtral", _ids(2), num_hidden_layers=3))
    with pytest.raises(PlacementConstraintError, match="this model's trace"):
        with ExpertParallel(wrong_layers)(model):
            pass
    with pytest.raises(RuntimeError, match="no_grad"):
        with ExpertParallel(EPLBGreedy(1)(trace))(model):
            forward(model, _ids(1))
    assert all("forward" not in b.experts.__dict__ for b in moe_blocks(model))  # restored after errors


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    model = tiny_model("olmoe")
    placement = EPLBGreedy(1)(_trace("olmoe", _ids(1)))
    with pytest.raises(RuntimeError, match="init_process_group"):
        with ExpertParallel(placement)(model):
            pass


def test_sharded_model_refuses_a_placement_needing_released_experts(single_rank_group):
    model = tiny_model("mixtral")
    blocks = moe_blocks(model)
    models.shard_experts(blocks[-1].experts, [0, 1, 2])  # as if sharded by a 2-rank placement before
    placement = EPLBGreedy(1)(_trace("mixtral", _ids(2)))  # needs all 4 experts on rank 0
    with pytest.raises(PlacementConstraintError, match=r"MoE layer 1: .*experts \[3\].*reload the model"):
        with ExpertParallel(placement)(model):
            pass
    # every layer is checked before anything is released
    assert models.held_experts(blocks[0].experts) == (0, 1, 2, 3)
    assert all("forward" not in b.experts.__dict__ for b in blocks[:-1])
