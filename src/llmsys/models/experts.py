"""Keeping only some experts of a MoE experts module in memory (expert-parallel sharding).

transformers 5.x stores the routed experts of every supported MoE family (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE) as ONE module whose parameters are fused along the expert dimension
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, plus `*_bias [E, ...]` where a family has
biases), with `num_experts = E` and a forward `(hidden [N, H], top_k_index [N, k], top_k_weights
[N, k])` that only touches the rows of the experts it is given (eager loop, batched_mm or grouped_mm,
all chosen by `config._experts_implementation`).

`shard_experts(experts, keep)` rewrites such a module IN PLACE so that it holds only the rows of the
logical experts `keep`: every per-expert parameter is replaced by a fresh tensor of those rows (the
full tensors are released as soon as nothing else references them), `num_experts` becomes
`len(keep)`, and an instance-level forward maps the GLOBAL expert ids the router produces to local
rows before calling the module's own forward. A token routed to an expert that is not held raises a
`NotHeldExpertError` naming the held experts: a sharded module never silently computes with missing
weights. Sharding cannot be undone (the released rows are gone): reload the model to get them back.
A module whose layout is not the fused one raises `UnsupportedModelError` naming its class and family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from llmsys.models.families import MOE_FAMILIES, UnsupportedModelError

_HELD = "_llmsys_held_experts"  # instance attribute: the logical ids of the rows kept, in row order
_GLOBAL = "_llmsys_num_global_experts"
_WRAPPER = "_llmsys_global_id_forward"


class NotHeldExpertError(RuntimeError):
    """A sharded experts module was asked to run an expert whose weights it does not hold."""


def _describe(experts: nn.Module) -> str:
    model_type = getattr(getattr(experts, "config", None), "model_type", None)
    family = MOE_FAMILIES.get(model_type, model_type)
    return f"{type(experts).__name__} (family {family!r})"


def _per_expert_parameters(experts: nn.Module) -> list[str]:
    """Names of the fused per-expert parameters; UnsupportedModelError for any other layout."""
    count = getattr(experts, "num_experts", None)
    names = [name for name, _ in experts.named_parameters(recurse=False)]
    problem = None
    if isinstance(experts, nn.ModuleList) or not isinstance(count, int):
        problem = "it has no integer `num_experts` (per-expert submodules are not supported)"
    elif not names:
        problem = "it holds no parameters of its own"
    elif any(p.ndim == 0 or p.shape[0] != count for p in experts.parameters(recurse=False)):
        problem = f"not every parameter has {count} (= num_experts) rows along dim 0"
    elif any(True for child in experts.children() for _ in (*child.parameters(), *child.buffers())):
        problem = "a submodule holds parameters or buffers (their expert dimension is unknown)"
    elif any(True for _ in experts.buffers(recurse=False)):
        problem = "it holds buffers (their expert dimension is unknown)"
    if problem:
        raise UnsupportedModelError(
            f"llmsys.models.shard_experts cannot shard {_describe(experts)}: {problem}. It expects the "
            "transformers 5.x fused experts layout (every parameter [num_experts, ...], e.g. gate_up_proj "
            f"and down_proj) of the supported MoE families: {', '.join(MOE_FAMILIES.values())}"
        )
    return names


def held_experts(experts: nn.Module) -> tuple[int, ...]:
    """The logical expert ids whose weights `experts` holds, in row order (all of them if unsharded).

    Raises UnsupportedModelError if the module does not have the fused layout `shard_experts` needs.
    """
    _per_expert_parameters(experts)
    held = experts.__dict__.get(_HELD)
    return tuple(held) if held is not None else tuple(range(experts.num_experts))


def num_global_experts(experts: nn.Module) -> int:
    """The model's number of logical experts (`num_experts` before any sharding)."""
    return int(experts.__dict__.get(_GLOBAL, experts.num_experts))


def expert_parameter_bytes(experts: nn.Module) -> int:
    """Bytes of memory behind the module's parameters, counting each distinct storage once in full
    (so a parameter that were only a view of a larger tensor would count that whole tensor)."""
    storages: dict[tuple[torch.device, int], int] = {}
    for p in experts.parameters():
        storage = p.untyped_storage()
        storages[(p.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class _GlobalIdForward:
    """Instance-level forward of a sharded experts module: global expert ids -> local rows."""

    def __init__(self, inner, held: Sequence[int], num_global: int, description: str) -> None:
        self.inner = inner  # the module's forward as it was before the first sharding
        self.description = description
        self.set_held(held, num_global)

    def set_held(self, held: Sequence[int], num_global: int) -> None:
        self.held = tuple(held)
        table = torch.full((num_global,), -1, dtype=torch.int64)
        table[list(self.held)] = torch.arange(len(self.held))
        self._tables = {torch.device("cpu"): table}  # per device: one small copy, made once

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        device = top_k_index.device
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._tables[torch.device("cpu")].to(device)
        local = table[top_k_index]
        if (local < 0).any():
            missing = sorted(set(top_k_index[local < 0].tolist()))
            raise NotHeldExpertError(
                f"this {self.description} holds only experts {list(self.held)} (sharded by "
                f"llmsys.models.shard_experts, e.g. under llmsys.moe.ExpertParallel) but was routed to "
                f"experts {missing}: run it inside the ExpertParallel context that sharded it, or reload "
                "the model to run it with all its experts"
            )
        return self.inner(hidden_states, local.to(top_k_index.dtype), top_k_weights)


def shard_experts(experts: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the weights of logical experts `keep` (distinct ids, any order) in `experts`, in place.

    `keep` must be a subset of what the module holds (`held_experts`): sharding an already sharded
    module again narrows it further, and keeping exactly what it holds changes nothing (no copy).
    Afterwards the module still takes global expert ids (see the module docstring).
    """
    names = _per_expert_parameters(experts)
    held = held_experts(experts)
    num_global = num_global_experts(experts)
    keep = [int(e) for e in keep]
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep lists an expert twice: {keep} (one row per logical expert)")
    missing = sorted(set(keep) - set(held))
    if missing:
        raise ValueError(
            f"{_describe(experts)} does not hold experts {missing} (it holds {list(held)}, out of "
            f"{num_global}): released weights cannot come back; reload the model to shard it differently"
        )
    if tuple(keep) == held:
        return
    position = {e: i for i, e in enumerate(held)}
    rows = torch.tensor([position[e] for e in keep], dtype=torch.int64)
    with torch.no_grad():
        for name in names:
            full = getattr(experts, name)
            # index_select copies into a new, exactly-sized tensor: the full one is freed when dropped
            local = full.index_select(0, rows.to(full.device))
            setattr(experts, name, nn.Parameter(local, requires_grad=full.requires_grad))
            del full
    _mark_held(experts, keep, num_global)


def _mark_held(experts: nn.Module, keep: Sequence[int], num_global: int) -> None:
    """Record that `experts`' parameters now hold the rows of `keep` (in that order) out of `num_global`."""
    experts.num_experts = len(keep)
    experts.__dict__[_HELD] = tuple(keep)
    experts.__dict__[_GLOBAL] = num_global
    wrapper = experts.__dict__.get(_WRAPPER)
    if wrapper is not None:
        wrapper.set_held(keep, num_global)
    else:
        wrapper = experts.__dict__[_WRAPPER] = _GlobalIdForward(experts.forward, keep, num_global, _describe(experts))
        experts.forward = wrapper


def set_held_experts(experts: nn.Module, keep: Sequence[int], rows: Mapping[str, torch.Tensor]) -> None:
    """Give an UNSHARDED experts module exactly the rows of logical experts `keep`, read elsewhere.

    The loader's counterpart of `shard_experts`: instead of cutting rows out of full tensors, it takes,
    for every fused per-expert parameter `name`, a tensor `rows[name]` of shape
    `[len(keep), *parameter.shape[1:]]` (row i = expert keep[i]; the parameter may live on the meta
    device) and leaves the module exactly as `shard_experts(experts, keep)` would have left it after
    a full load (same parameters, `num_experts`, global-id forward, `held_experts`). Keeping every
    expert in order leaves the module unsharded, as `shard_experts` does.
    """
    names = _per_expert_parameters(experts)
    if experts.__dict__.get(_HELD) is not None:
        raise ValueError(f"{_describe(experts)} is already sharded: set_held_experts needs an unsharded module")
    num_global = experts.num_experts
    keep = [int(e) for e in keep]
    if len(set(keep)) != len(keep) or any(not 0 <= e < num_global for e in keep):
        raise ValueError(f"keep must list distinct experts in 0..{num_global - 1}, got {keep}")
    if set(rows) != set(names):
        raise ValueError(f"rows must give exactly the parameters {names} of {_describe(experts)}, got {sorted(rows)}")
    for name in names:
        current, local = getattr(experts, name), rows[name]
        want = (len(keep), *current.shape[1:])
        if tuple(local.shape) != want:
            raise ValueError(f"{_describe(experts)}.{name}: rows of shape {tuple(local.shape)}, expected {want}")
        setattr(experts, name, nn.Parameter(local, requires_grad=current.requires_grad))
    if keep != list(range(num_global)):
        _mark_held(experts, keep, num_global)
