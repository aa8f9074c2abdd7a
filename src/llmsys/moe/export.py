"""Deployment formats: what SGLang, vLLM and vLLM-Ascend load as a static expert placement.

- SGLang `--init-expert-location PATH`: a .json or .pt dict with `physical_to_logical_map
  [layers, num_physical]`; rank r owns slots [r * n_local, (r + 1) * n_local), n_local =
  num_physical / ep_size (num_physical = experts + `--ep-num-redundant-experts`).
- vLLM: the EPLB state tensor `physical_to_logical_map [layers, num_physical]` (int64), with
  `logical_to_physical_map` / `logical_replica_count` derivable from it (`vllm_eplb_state`).
- vLLM-Ascend `expert_map_path` JSON: {"moe_layer_count": L, "layer_list": [{"layer_id": l,
  "device_count": G, "device_list": [{"device_id": g, "device_expert": [logical ids]}]}]}.

All three need the same number of experts on every device in every layer and a slot count divisible
by the EP size; `check_deployable` raises `PlacementConstraintError` naming the fix otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmsys.moe.errors import PlacementConstraintError
from llmsys.moe.placement import Placement

FORMATS = ("sglang", "vllm", "vllm-ascend")


def check_deployable(placement: Placement, ep_size: int | None = None, engine: str = "sglang") -> int:
    """Raise PlacementConstraintError unless an engine can load `placement` at `ep_size`; return ep_size."""
    ep = placement.num_gpus if ep_size is None else int(ep_size)
    S = placement.num_slots
    if ep < 1 or S % ep:
        raise PlacementConstraintError(
            f"{engine}: {S} physical slots per layer are not divisible by ep_size={ep}; use an EP size that "
            f"divides {S}, or re-solve with a slot count that is a multiple of {ep} "
            f"(e.g. EPLBGreedy(..., num_slots={(-(-S // ep)) * ep}))"
        )
    if ep != placement.num_gpus:
        raise PlacementConstraintError(
            f"{engine}: the placement was solved for {placement.num_gpus} GPUs but ep_size={ep}: "
            f"slot s runs on rank s // {S // ep} there, which is not the placement's GPU; "
            f"re-solve with topology={ep}"
        )
    if not placement.is_equal_per_gpu():
        per_gpu = placement.experts_per_gpu()
        bad = int(np.flatnonzero((per_gpu != per_gpu[:, :1]).any(axis=1) | (placement.phy2log < 0).any(axis=1))[0])
        raise PlacementConstraintError(
            f"{engine}: unequal experts per GPU (layer {bad}: {per_gpu[bad].tolist()}); engines need "
            "every slot filled with the same number of experts on every GPU. Re-solve with "
            "MoETuner(equal_per_gpu=True), or fill the empty slots with replicas "
            "(llmsys.moe.export.pad_with_replicas)"
        )
    return ep


def pad_with_replicas(placement: Placement, load: np.ndarray) -> Placement:
    """Fill empty (-1) slots with replicas of the experts with the highest load per replica (load [E, L],
    e.g. `trace.load`), making an unequal placement deployable without moving any expert."""
    phy = placement.phy2log.copy()
    for l in range(placement.num_layers):
        count = np.bincount(phy[l][phy[l] >= 0], minlength=placement.num_experts).astype(float)
        for s in np.flatnonzero(phy[l] < 0):
            e = int(np.argmax(load[:, l] / count))
            phy[l, s] = e
            count[e] += 1
    meta = dict(placement.meta, padded_with_replicas=True)
    return Placement(phy, placement.num_experts, placement.topology, meta)


def to_sglang(placement: Placement, path: str | Path | None = None, ep_size: int | None = None) -> dict[str, Any]:
    """The `--init-expert-location` dict; written as .json or .pt (by suffix) when `path` is given."""
    check_deployable(placement, ep_size, "SGLang")
    data: dict[str, Any] = {"physical_to_logical_map": placement.phy2log.tolist()}
    if path is not None:
        path = Path(path)
        if path.suffix == ".pt":
            torch.save({"physical_to_logical_map": torch.from_numpy(placement.phy2log.copy())}, path)
        elif path.suffix == ".json":
            path.write_text(json.dumps(data))
        else:
            raise ValueError(f"SGLang reads .json or .pt files, not {path.suffix!r}: name the file *.json or *.pt")
    return data


def to_vllm(placement: Placement, path: str | Path | None = None, ep_size: int | None = None) -> torch.Tensor:
    """vLLM's `physical_to_logical_map [layers, num_physical]` (int64); torch.save'd when `path` is given."""
    check_deployable(placement, ep_size, "vLLM")
    tensor = torch.from_numpy(placement.phy2log.copy())
    if path is not None:
        torch.save(tensor, Path(path))
    return tensor


def vllm_eplb_state(placement: Placement) -> dict[str, torch.Tensor]:
    """The three tensors of vLLM's EPLB state: physical_to_logical_map, logical_to_physical_map
    [L, E, max_replicas] (-1 padded) and logical_replica_count [L, E]."""
    check_deployable(placement, None, "vLLM")
    return {
        "physical_to_logical_map": torch.from_numpy(placement.phy2log.copy()),
        "logical_to_physical_map": torch.from_numpy(placement.log2phy()),
        "logical_replica_count": torch.from_numpy(placement.replica_counts()),
    }


def to_vllm_ascend(placement: Placement, path: str | Path | None = None, ep_size: int | None = None) -> dict[str, Any]:
    """The vLLM-Ascend `expert_map_path` JSON (`layer_list`); written when `path` is given."""
    ep = check_deployable(placement, ep_size, "vLLM-Ascend")
    n = placement.num_slots // ep
    data = {
        "moe_layer_count": placement.num_layers,
        "layer_list": [
            {
                "layer_id": l,
                "device_count": ep,
                "device_list": [
                    {"device_id": g, "device_expert": placement.phy2log[l, g * n : (g + 1) * n].tolist()}
                    for g in range(ep)
                ],
            }
            for l in range(placement.num_layers)
        ],
    }
    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1))
    return data


def export(placement: Placement, fmt: str, path: str | Path, ep_size: int | None = None) -> Path:
    """Write `placement` in one of FORMATS ("sglang" by suffix .json/.pt, "vllm" .pt, "vllm-ascend" .json)."""
    if fmt == "sglang":
        to_sglang(placement, path, ep_size)
    elif fmt == "vllm":
        to_vllm(placement, path, ep_size)
    elif fmt == "vllm-ascend":
        to_vllm_ascend(placement, path, ep_size)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    return Path(path)
