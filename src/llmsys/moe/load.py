"""Loading one expert-parallel rank's share of a MoE checkpoint (never the whole model).

    model = load_expert_parallel("/ckpt/Mixtral", placement, rank)   # before or after init_process_group
    with torch.no_grad(), ExpertParallel(placement)(model) as stats: # reuses the loaded shards, no copy
        logits = forward(model, my_input_ids).logits

The model is built from the checkpoint's config on the meta device; then every non-expert tensor is
read whole and, in each MoE layer, only the rows of the experts of this rank's slots (what
`ExpertParallel` would keep after loading the whole model: replicas included, an expert in two slots
of this rank once, empty slots nothing). The result equals `from_pretrained` + `ExpertParallel`'s
sharding bit for bit, but the rank's peak memory is its share, not the full model. The checkpoint
reading (key names, fused vs per-expert layouts) lives in `llmsys.models.checkpoint`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from llmsys.models import CheckpointRead, empty_model, load_held_experts, moe_blocks
from llmsys.moe.errors import PlacementConstraintError
from llmsys.moe.parallel import rank_experts
from llmsys.moe.placement import Placement


def load_expert_parallel(
    path: str | os.PathLike,
    placement: Placement,
    rank: int,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
    output_loading_info: bool = False,
) -> nn.Module | tuple[nn.Module, CheckpointRead]:
    """Rank `rank`'s model of the local safetensors checkpoint `path` under `placement`, reading only
    the experts this rank holds.

    dtype: None / "auto" = the checkpoint's (as `from_pretrained`); device: where the tensors go;
    attn_implementation: as for `from_pretrained` (default: transformers' choice). With
    `output_loading_info=True` returns `(model, CheckpointRead)` (files, layout, bytes read: experts
    held vs all experts in the checkpoint). The placement is checked against the model's config
    (MoE layers x experts) before any tensor is read. Errors: `PlacementConstraintError` (placement
    of another model, rank out of range), `llmsys.models.UnsupportedCheckpointError` (no safetensors,
    an experts layout it cannot read, missing tensors: the message names the fix), FileNotFoundError.
    """
    model = empty_model(path, dtype=dtype, attn_implementation=attn_implementation)
    blocks = moe_blocks(model)
    if len(blocks) != placement.num_layers or any(b.num_experts != placement.num_experts for b in blocks):
        raise PlacementConstraintError(
            f"the placement covers {placement.num_layers} MoE layers x {placement.num_experts} experts but the "
            f"checkpoint {os.fspath(path)!r} has {len(blocks)} x {blocks[0].num_experts if blocks else 0}: solve "
            "it from this model's trace"
        )
    info = load_held_experts(model, path, rank_experts(placement, rank), device=device)
    return (model, info) if output_loading_info else model
