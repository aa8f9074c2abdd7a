"""Reading a MoE model from a local safetensors checkpoint with only some experts per MoE layer.

`empty_model(path)` builds the *ForCausalLM from the checkpoint's config with its parameters on the
meta device (no weights materialised; buffers such as RoPE frequencies are computed as usual).
`load_held_experts(model, path, keeps)` then fills it from the checkpoint's safetensors files: every
non-expert tensor whole, and for MoE layer i only the rows of the logical experts `keeps[i]` (in that
order), so that the model ends up as `from_pretrained` followed by `shard_experts(experts, keeps[i])`
would leave it — without ever holding the other experts.

What transformers 5.x writes and reads (checked against 5.24): in memory every supported MoE family
fuses its routed experts into `experts.gate_up_proj [E, 2I, H]` (gate rows, then up rows) and
`experts.down_proj [E, H, I]`. `save_pretrained` reverts that fusion, so the checkpoints the library's
families write (and the published ones) hold one tensor per expert and projection:

- Mixtral: `model.layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight` (gate, up, down; the block is
  `mlp` in memory);
- Qwen2-MoE, Qwen3-MoE, OLMoE: `model.layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`.

`from_pretrained` fuses them at load through its weight-conversion table. It also loads a checkpoint
that already stores the fused parameters under their in-memory names (`...experts.gate_up_proj`,
`...experts.down_proj`, `[E, ...]`); both layouts are read here, row by row with `get_slice` /
`get_tensor`, so only the held experts' bytes leave the files. Anything else under an experts module
(biases, quantisation scales, unknown projection names, expert ids beyond E) raises
`UnsupportedCheckpointError` naming the keys and the fix instead of loading wrong weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmsys.models.experts import _per_expert_parameters, set_held_experts
from llmsys.models.families import MOE_FAMILIES, UnsupportedModelError
from llmsys.models.layers import moe_blocks

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# checkpoint key fragment -> in-memory fragment (the renames transformers applies at load)
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".block_sparse_moe.", ".mlp."),)}
# per-expert projection names on disk: (gate, up, down)
_PROJECTIONS: dict[str, tuple[str, str, str]] = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
}
_PER_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DTYPE_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8})
_FIX = (
    "load the model whole with from_pretrained and let llmsys.moe.ExpertParallel (or "
    "llmsys.models.shard_experts) shard it"
)


class UnsupportedCheckpointError(UnsupportedModelError):
    """The checkpoint is not one this loader can read rows from (format or experts layout)."""


@dataclass
class CheckpointRead:
    """What `load_held_experts` read: files, layout, and bytes taken from disk (checkpoint dtype)."""

    path: str
    files: list[str]
    layout: str  # "per-expert" (what save_pretrained writes) or "fused" ([E, ...] tensors on disk)
    held: list[tuple[int, ...]]  # per MoE layer: the logical experts read, in row order
    expert_bytes_read: int = 0  # routed-expert tensor bytes read (held rows only)
    expert_bytes_total: int = 0  # routed-expert tensor bytes in the checkpoint (all experts)
    other_bytes_read: int = 0  # every other tensor (read whole)
    tensors_read: int = 0
    ignored_keys: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for


def checkpoint_files(path: str | os.PathLike) -> dict[str, str]:
    """checkpoint key -> safetensors file of a local checkpoint directory (one file, or an index)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a local checkpoint directory: download it first (e.g. "
            "huggingface_hub.snapshot_download) and pass the directory"
        )
    index = os.path.join(path, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({name for name in weight_map.values() if not os.path.isfile(os.path.join(path, name))})
        if missing:
            raise FileNotFoundError(f"{index} names files that are not in {path!r}: {missing}")
        return {key: os.path.join(path, name) for key, name in weight_map.items()}
    single = os.path.join(path, SAFE_WEIGHTS)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    present = sorted(os.listdir(path))
    raise UnsupportedCheckpointError(
        f"{path!r} has no {SAFE_WEIGHTS} or {SAFE_INDEX} (it holds {present}): reading only some experts "
        "needs safetensors. Re-save the checkpoint with save_pretrained (safetensors is the default), "
        f"or {_FIX}"
    )


def _torch_dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return None


def empty_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The *ForCausalLM of a local MoE checkpoint, built from its config with parameters on the meta
    device (buffers are real). dtype None / "auto": the config's dtype, else the checkpoint's first
    floating-point tensor's (as `from_pretrained` does)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    if not os.path.isdir(path):
        checkpoint_files(path)  # raises FileNotFoundError naming the fix
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MOE_FAMILIES:
        raise UnsupportedModelError(
            f"{path!r} is a {config.model_type!r} checkpoint; reading only some experts needs one of the "
            f"supported MoE families: {', '.join(f'{v} ({k})' for k, v in MOE_FAMILIES.items())}"
        )
    if dtype is None or dtype == "auto":
        dtype = _torch_dtype(getattr(config, "dtype", None)) or _torch_dtype(getattr(config, "torch_dtype", None))
        if dtype is None:
            dtype = _first_float_dtype(path) or torch.get_default_dtype()
    elif isinstance(dtype, str):
        resolved = _torch_dtype(dtype)
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model


def _first_float_dtype(path: str) -> torch.dtype | None:
    from safetensors import safe_open

    files = checkpoint_files(path)
    for key, file in files.items():
        with safe_open(file, "pt") as f:
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
        if dtype is not None:
            return dtype
    return None


def _model_key(family: str, key: str) -> str:
    for old, new in _RENAMES.get(family, ()):
        key = key.replace(old, new)
    return key


class _Files:
    """Open safetensors files, one handle per file, plus byte accounting."""

    def __init__(self, where: dict[str, tuple[str, str]]) -> None:
        self.where = where  # model key -> (checkpoint key, file)
        self._handles: dict[str, Any] = {}
        self.tensors = 0

    def _open(self, file: str):
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, "pt").__enter__()
        return handle

    def slice(self, model_key: str):
        key, file = self.where[model_key]
        return self._open(file).get_slice(key)

    def shape(self, model_key: str) -> tuple[int, ...]:
        return tuple(self.slice(model_key).get_shape())

    def nbytes(self, model_key: str) -> int:
        sl = self.slice(model_key)
        n = _DTYPE_BYTES.get(sl.get_dtype())
        if n is None:
            raise UnsupportedCheckpointError(f"{model_key}: unknown safetensors dtype {sl.get_dtype()!r}: {_FIX}")
        for d in sl.get_shape():
            n *= d
        return n

    def tensor(self, model_key: str) -> torch.Tensor:
        key, file = self.where[model_key]
        self.tensors += 1
        return self._open(file).get_tensor(key)

    def rows(self, model_key: str, index: int) -> torch.Tensor:
        self.tensors += 1
        return self.slice(model_key)[index : index + 1][0]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def load_held_experts(
    model: nn.Module,
    path: str | os.PathLike,
    keeps: Sequence[Sequence[int]],
    *,
    device: torch.device | str = "cpu",
) -> CheckpointRead:
    """Fill `model` (from `empty_model(path)`) from the checkpoint at `path`, IN PLACE: every non-expert
    tensor whole, and for MoE layer i (`moe_blocks` order) only the rows of experts `keeps[i]`, in that
    order; tensors are cast to the model's parameter dtypes and put on `device`. Afterwards each
    experts module is as `shard_experts(experts, keeps[i])` leaves it (`held_experts` == keeps[i]).

    Raises UnsupportedCheckpointError (naming the keys and the fix) for a layout it cannot read and
    for missing tensors; nothing is guessed or left uninitialised.
    """
    path = os.fspath(path)
    family = model.config.model_type
    if family not in _PROJECTIONS:
        raise UnsupportedModelError(f"no checkpoint layout known for model_type {family!r}")
    files = checkpoint_files(path)
    where = {_model_key(family, key): (key, file) for key, file in files.items()}
    blocks = moe_blocks(model)
    if len(keeps) != len(blocks):
        raise ValueError(f"keeps has {len(keeps)} entries but the model has {len(blocks)} MoE layers")
    module_names = {id(module): name for name, module in model.named_modules()}
    device = torch.device(device)
    source = _Files(where)
    read = CheckpointRead(path=path, files=sorted(set(files.values())), layout="", held=[])
    layouts = set()
    expert_keys: set[str] = set()
    expert_params: set[str] = set()
    try:
        # 1. the routed experts, held rows only
        for i, (block, keep) in enumerate(zip(blocks, keeps)):
            experts = block.experts
            prefix = module_names[id(experts)]
            names = _per_expert_parameters(experts)
            E = experts.num_experts
            keep = [int(e) for e in keep]
            params = {n: getattr(experts, n) for n in names}
            expert_params.update(f"{prefix}.{n}" for n in names)
            under = sorted(k for k in where if k.startswith(prefix + "."))
            expert_keys.update(under)
            if all(f"{prefix}.{n}" in where for n in names):
                layout, rows = "fused", _read_fused(source, prefix, params, keep, read, path)
                extra = [k for k in under if k not in {f"{prefix}.{n}" for n in names}]
            else:
                layout = "per-expert"
                rows, extra = _read_per_expert(source, family, prefix, params, E, keep, read, path)
            if extra:
                raise UnsupportedCheckpointError(
                    f"{path!r}: MoE layer {i} ({prefix}) has checkpoint tensors this loader does not know how "
                    f"to place: {extra[:6]}{' ...' if len(extra) > 6 else ''} (expected the {layout} layout "
                    f"of {MOE_FAMILIES[family]}). Refusing to load possibly wrong weights: {_FIX}"
                )
            layouts.add(layout)
            rows = {n: t.to(device) for n, t in rows.items()}
            set_held_experts(experts, keep, rows)
            read.held.append(tuple(keep))
            source.close()  # unmap the files: the pages read for this layer stop counting as resident
        read.layout = "+".join(sorted(layouts))

        # 2. everything else, whole; tied parameters (one object under several names) read once
        groups: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, tensor in model.named_parameters(remove_duplicate=False):
            if name not in expert_params:
                groups.setdefault(id(tensor), []).append(name)
                tensors[id(tensor)] = tensor
        state_keys = set(model.state_dict(keep_vars=True))
        for name, buf in model.named_buffers(remove_duplicate=False):
            if name in state_keys:  # persistent buffers only
                groups.setdefault(id(buf), []).append(name)
                tensors[id(buf)] = buf
        missing = []
        for ident, aliases in groups.items():
            target = tensors[ident]
            found = next((a for a in aliases if a in where), None)
            if found is None:
                missing.extend(aliases)
                continue
            shape = source.shape(found)
            if shape != tuple(target.shape):
                raise UnsupportedCheckpointError(
                    f"{path!r}: {found} is {list(shape)} in the checkpoint but {list(target.shape)} in the model "
                    f"built from its config: {_FIX}"
                )
            read.other_bytes_read += source.nbytes(found)
            value = source.tensor(found)
            dtype = target.dtype if value.is_floating_point() and target.is_floating_point() else value.dtype
            # an owned copy: safetensors may hand out views of its file mapping, which would keep the
            # whole file mapped (and every page read from it resident) as long as the model lives
            value = value.to(device=device, dtype=dtype, copy=True)
            if isinstance(target, nn.Parameter):
                value = nn.Parameter(value, requires_grad=target.requires_grad)
            for alias in aliases:  # tied names keep sharing one tensor
                _set_tensor(model, alias, value)
        if hasattr(model, "tie_weights"):
            # tie what the config ties (e.g. lm_head <- embed_tokens with tie_word_embeddings; save_pretrained
            # leaves the tied copy out), as from_pretrained does; then see what is still unread
            model.tie_weights()
            missing = [n for n in missing if _get_tensor(model, n).device.type == "meta"]
        if missing:
            raise UnsupportedCheckpointError(
                f"{path!r} lacks tensors the model needs: {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                f"(from_pretrained would initialise them randomly; this loader does not): {_FIX}"
            )
        used = expert_keys | {a for aliases in groups.values() for a in aliases}
        read.ignored_keys = sorted(k for k in where if k not in used)
        if read.ignored_keys:  # from_pretrained ignores them too (with a warning)
            log.warning("%s: checkpoint tensors not used by the model: %s", path, read.ignored_keys[:10])
        read.tensors_read = source.tensors
    finally:
        source.close()
    for module in model.modules():  # buffers computed at construction (RoPE frequencies) follow the weights
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise UnsupportedCheckpointError(f"{path!r}: parameters left unread: {still_meta[:6]}: {_FIX}")
    model.eval()
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation) and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return read


def _read_fused(source: _Files, prefix: str, params: dict, keep: list[int], read: CheckpointRead, path: str):
    rows = {}
    for name, param in params.items():
        key = f"{prefix}.{name}"
        shape = source.shape(key)
        if shape != tuple(param.shape):
            raise UnsupportedCheckpointError(
                f"{path!r}: {key} is {list(shape)} in the checkpoint but {list(param.shape)} in the model: {_FIX}"
            )
        out = torch.empty((len(keep), *param.shape[1:]), dtype=param.dtype)
        for i, e in enumerate(keep):
            out[i] = source.rows(key, e)
        total = source.nbytes(key)
        read.expert_bytes_total += total
        read.expert_bytes_read += total // shape[0] * len(keep)
        rows[name] = out
    return rows


def _read_per_expert(
    source: _Files, family: str, prefix: str, params: dict, E: int, keep: list[int], read: CheckpointRead, path: str
):
    gate_name, up_name, down_name = _PROJECTIONS[family]
    if set(params) != {"gate_up_proj", "down_proj"}:
        raise UnsupportedCheckpointError(
            f"{path!r}: {prefix} has parameters {sorted(params)} in memory; the per-expert checkpoint layout "
            f"is only understood for gate_up_proj + down_proj: {_FIX}"
        )
    wanted = {(e, p): f"{prefix}.{e}.{p}.weight" for e in range(E) for p in (gate_name, up_name, down_name)}
    absent = [k for k in wanted.values() if k not in source.where]
    if absent:
        raise UnsupportedCheckpointError(
            f"{path!r}: {prefix} is neither stored fused ({prefix}.gate_up_proj / .down_proj) nor per expert "
            f"as {MOE_FAMILIES[family]} writes it (missing e.g. {absent[:3]}): {_FIX}"
        )
    known = set(wanted.values())
    extra = [k for k in source.where if k.startswith(prefix + ".") and k not in known]
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    two_i, hidden = gate_up.shape[1:]
    out_gate_up = torch.empty((len(keep), two_i, hidden), dtype=gate_up.dtype)
    out_down = torch.empty((len(keep), *down.shape[1:]), dtype=down.dtype)
    expect = {gate_name: (two_i // 2, hidden), up_name: (two_i // 2, hidden), down_name: tuple(down.shape[1:])}
    for (_, p), key in wanted.items():
        shape = source.shape(key)
        if shape != expect[p]:
            raise UnsupportedCheckpointError(
                f"{path!r}: {key} is {list(shape)}, expected {list(expect[p])} for the model's "
                f"{prefix} ({list(gate_up.shape)}, {list(down.shape)}): {_FIX}"
            )
        read.expert_bytes_total += source.nbytes(key)
    half = two_i // 2
    for i, e in enumerate(keep):
        for p in (gate_name, up_name, down_name):
            read.expert_bytes_read += source.nbytes(wanted[(e, p)])
        # gate rows first, then up rows: the order transformers' conversion concatenates them in
        out_gate_up[i, :half] = source.tensor(wanted[(e, gate_name)])
        out_gate_up[i, half:] = source.tensor(wanted[(e, up_name)])
        out_down[i] = source.tensor(wanted[(e, down_name)])
    return {"gate_up_proj": out_gate_up, "down_proj": out_down}, extra
