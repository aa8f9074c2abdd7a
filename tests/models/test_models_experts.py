"""llmsys.models.shard_experts: an experts module that keeps only some experts' weights.

Runs on transformers 5.17 (.venv-min) and 5.24: the fused experts layout is read generically.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from llmsys import models
from llmsys.testing import every_moe_family, tiny_model


def _route_to(experts_ids, n, k, seed=0):
    """top_k_index [n, k] drawn from `experts_ids` (distinct per row) and top_k_weights [n, k]."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts_ids)
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(n)])
    return idx, torch.rand(n, k, generator=g)


def _bytes_per_expert(experts):
    return sum(p.numel() * p.element_size() for p in experts.parameters()) // experts.num_experts


@every_moe_family
def test_shard_keeps_exact_rows_and_releases_the_rest(family):
    model = tiny_model(family)
    block = models.moe_blocks(model)[0]
    experts, E = block.experts, block.num_experts
    per_expert = _bytes_per_expert(experts)
    full_bytes = models.expert_parameter_bytes(experts)
    assert full_bytes == E * per_expert
    before = {name: p.detach().clone() for name, p in experts.named_parameters()}
    old = [weakref.ref(p) for p in experts.parameters()]
    hidden = torch.randn(9, model.config.hidden_size)
    keep = [3, 1]
    idx, w = _route_to(keep, 9, block.top_k)
    with torch.no_grad():
        expected = experts(hidden, idx, w)

        models.shard_experts(experts, keep)
        gc.collect()
        assert all(r() is None for r in old)  # the full tensors are really gone
        assert models.held_experts(experts) == (3, 1) and models.num_global_experts(experts) == E
        assert models.expert_parameter_bytes(experts) == len(keep) * per_expert < full_bytes
        for name, p in experts.named_parameters():
            torch.testing.assert_close(p, before[name][keep], atol=0, rtol=0)
        # global ids in, same result as the full module
        torch.testing.assert_close(experts(hidden, idx, w), expected, atol=1e-6, rtol=0)
        bad_idx = idx.clone()
        bad_idx[4, 0] = 2
        with pytest.raises(models.NotHeldExpertError, match=r"holds only experts \[3, 1\].*routed to experts \[2\]"):
            experts(hidden, bad_idx, w)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_whole_model_with_permuted_rows_is_unchanged(implementation):
    # every expert kept but in another row order: only correct if each call maps global ids to rows
    model = tiny_model("qwen2_moe", experts_implementation=implementation)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = models.forward(model, ids).logits
        for block in models.moe_blocks(model):
            models.shard_experts(block.experts, list(reversed(range(block.num_experts))))
        out = models.forward(model, ids).logits
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_reshard_narrows_noop_and_refuses_released_experts():
    experts = models.moe_blocks(tiny_model("olmoe", num_experts=6))[0].experts
    models.shard_experts(experts, [5, 0, 2])
    params = list(experts.parameters())
    models.shard_experts(experts, [5, 0, 2])  # exactly what it holds: nothing copied
    assert [p is q for p, q in zip(params, experts.parameters())] == [True] * len(params)
    down_row_2 = experts.down_proj[2].clone()
    models.shard_experts(experts, [2])
    assert models.held_experts(experts) == (2,) and experts.num_experts == 1
    torch.testing.assert_close(experts.down_proj[0], down_row_2, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"does not hold experts \[0\].*reload"):
        models.shard_experts(experts, [0, 2])
    with pytest.raises(ValueError, match="twice"):
        models.shard_experts(experts, [2, 2])
    models.shard_experts(experts, [])  # a rank may hold no expert of a layer
    assert models.expert_parameter_bytes(experts) == 0 and models.held_experts(experts) == ()


def test_unsupported_layouts_name_the_class_and_family():
    experts = models.moe_blocks(tiny_model("mixtral"))[0].experts
    experts.scale = nn.Parameter(torch.ones(3))  # not one row per expert
    rows = rf"{experts.num_experts} \(= num_experts\)"
    with pytest.raises(models.UnsupportedModelError, match=rf"MixtralExperts \(family 'Mixtral'\).*{rows}"):
        models.shard_experts(experts, [0])

    class PerExpertModules(nn.Module):  # the pre-5.x layout: one submodule per expert
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    with pytest.raises(models.UnsupportedModelError, match="PerExpertModules.*fused experts layout"):
        models.held_experts(PerExpertModules())
