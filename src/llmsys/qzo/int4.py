"""llmsys's own group-wise int4 linear layers, whose scales QZO trains, and GPTQ-layout loading.

``Int4Linear`` keeps frozen 4-bit codes and zero-points and a float ``scales`` buffer ``[out, in/G]``;
its forward calls :func:`llmsys.kernels.int4_matmul`, which dequantises with the scales *as they are
at call time*, so QZO can perturb them in place between two forwards.

- :func:`quantize_int4` replaces the ``nn.Linear`` layers of a model by round-to-nearest int4 layers.
- :meth:`Int4Linear.from_gptq` / :func:`load_gptq` read the GPTQ checkpoint layout
  (``qweight [in/8, out]`` int32, ``qzeros [in/G, out/8]`` int32, ``scales [in/G, out]``, ``g_idx``);
  :meth:`Int4Linear.to_gptq` writes it (for tests and export).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from llmsys.kernels import Backend, int4_matmul
from llmsys.kernels.int4_matmul import GROUP_SIZES, int4_dequantize_reference
from llmsys.qzo.errors import QuantizationError

log = logging.getLogger(__name__)

__all__ = ["Int4Linear", "load_gptq", "quantize_int4", "quantizable_linears"]


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K] ints in 0..15 -> [N, K/2] uint8 (even column in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W[n, k] = scales[n, k//G] * (code[n, k] - zeros[n, k//G])``.

    ``codes`` and ``zeros`` are frozen uint8 buffers; ``scales`` is the continuous quantisation scale
    QZO perturbs and updates (a buffer: no gradient is ever needed). ``backend`` picks the kernel
    (``"auto"``: Triton on CUDA / under ``TRITON_INTERPRET=1``, the PyTorch reference otherwise).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        out_features, half = codes.shape
        self.in_features, self.out_features = 2 * half, out_features
        self.group_size = self.in_features // scales.shape[1]
        if self.group_size not in GROUP_SIZES or scales.shape[1] * self.group_size != self.in_features:
            raise QuantizationError(
                f"Int4Linear: group size must be one of {GROUP_SIZES} and divide in_features={self.in_features}, "
                f"got scales {tuple(scales.shape)}"
            )
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("zeros", zeros.to(torch.uint8).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.backend = backend

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, backend: Backend = "auto") -> Int4Linear:
        """Round-to-nearest asymmetric int4 of ``linear.weight``, one (scale, zero) per ``group_size``
        inputs; the grid spans ``[min(w, 0), max(w, 0)]`` as GPTQ's does, so zeros lie in 0..15."""
        if group_size not in GROUP_SIZES:
            raise QuantizationError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % group_size:
            raise QuantizationError(
                f"in_features={k} is not a multiple of group_size={group_size}: choose a group size that "
                f"divides it or skip this layer (skip=...)"
            )
        wg = w.reshape(n, k // group_size, group_size)
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, 15).reshape(n, k)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(_pack_nibbles(q), scale.to(linear.weight.dtype), zero, bias, backend)

    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        zero_offset: int = 1,
        dtype: torch.dtype | None = None,
        backend: Backend = "auto",
    ) -> Int4Linear:
        """A layer from GPTQ tensors: ``qweight [K/8, N]`` int32 (8 codes per word along K, lowest
        nibble first), ``qzeros [K/G, N/8]`` int32 (8 zeros per word along N), ``scales [K/G, N]``.
        ``zero_offset=1`` is the AutoGPTQ/"gptq" checkpoint format (stores ``zero - 1``); use 0 for
        the "gptq_v2" format. Act-order checkpoints (a permuted ``g_idx``) are refused."""
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise QuantizationError(
                f"GPTQ qweight/qzeros must be int32 (4-bit packed), got {qweight.dtype}/{qzeros.dtype}; "
                "only bits=4 checkpoints are supported"
            )
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        groups = scales.shape[0]
        if scales.shape[1] != n or qzeros.shape != (groups, n // 8) or groups == 0 or k % groups:
            raise QuantizationError(
                f"inconsistent GPTQ shapes: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                f"scales {tuple(scales.shape)} (expected qzeros [K/G, N/8] and scales [K/G, N])"
            )
        group = k // groups
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group):
            raise QuantizationError(
                "act-order GPTQ checkpoint (g_idx is not arange(in_features) // group_size): not supported; "
                "re-quantise with desc_act=False, or use a checkpoint without act-order"
            )
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
        q = (qweight[:, None, :] >> shifts[None, :, None]) & 0xF  # [K/8, 8, N]
        q = q.reshape(k, n).T  # [N, K]
        z = ((qzeros[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(groups, n) + zero_offset
        if int(z.max()) > 255:
            raise QuantizationError("GPTQ zero-points out of range after the offset")
        return cls(_pack_nibbles(q), scales.T.to(dtype or scales.dtype), z.T.to(torch.uint8), bias, backend)

    def to_gptq(self, zero_offset: int = 1) -> dict[str, torch.Tensor]:
        """The GPTQ tensors of this layer (``qweight``, ``qzeros``, ``scales`` fp16, ``g_idx``)."""
        if self.out_features % 8:
            raise QuantizationError(
                f"GPTQ packs zeros 8 per word: out_features={self.out_features} is not a multiple of 8"
            )
        z = self.zeros.to(torch.int64) - zero_offset
        if int(z.min()) < 0:
            raise QuantizationError(
                f"a zero-point below zero_offset={zero_offset} cannot be stored (use zero_offset=0)"
            )
        q = torch.stack(((self.codes & 0xF), (self.codes >> 4)), dim=-1).reshape(self.out_features, -1).to(torch.int64)
        shifts = torch.arange(0, 32, 4, dtype=torch.int64)

        def pack(t: torch.Tensor) -> torch.Tensor:  # [..., 8] -> [...] int32, two's complement
            word = (t << shifts).sum(-1)
            return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)

        qweight = pack(q.T.reshape(self.in_features // 8, 8, self.out_features).transpose(1, 2))
        qzeros = pack(z.T.reshape(z.shape[1], self.out_features // 8, 8))
        g_idx = (torch.arange(self.in_features) // self.group_size).to(torch.int32)
        scales = self.scales.T.to(torch.float16).contiguous()
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}

    # -- use -------------------------------------------------------------------------------------

    def dequantize(self) -> torch.Tensor:
        """The current weight ``[out, in]`` (fp32) from the live scales."""
        return int4_dequantize_reference(self.codes, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int4_matmul(x.reshape(-1, self.in_features), self.codes, self.scales, self.zeros, backend=self.backend)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


def _head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head (kept in full precision, as GPTQ and bitsandbytes do)."""
    from llmsys.models import UnsupportedModelError, lm_head

    try:
        head = lm_head(model)
    except (UnsupportedModelError, AttributeError):
        return {"lm_head"} if hasattr(model, "lm_head") else set()
    return {name for name, m in model.named_modules() if m is head}


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of ``model`` except the output head and names containing an entry of ``skip``."""
    skip = tuple(skip)
    heads = _head_names(model)
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name not in heads and not any(s in name for s in skip)
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_int4(
    model: nn.Module, group_size: int = 128, *, skip: Iterable[str] = (), backend: Backend = "auto"
) -> list[str]:
    """Replace the model's linear layers (not the head) by round-to-nearest `Int4Linear` in place.

    Returns the replaced module names. Raises `QuantizationError` when a layer's input size is not a
    multiple of ``group_size`` (pass ``skip=[name]`` or another group size).
    """
    names = []
    for name, linear in quantizable_linears(model, skip):
        try:
            _replace(model, name, Int4Linear.from_linear(linear, group_size, backend))
        except QuantizationError as err:
            raise QuantizationError(f"{name}: {err}") from None
        names.append(name)
    if not names:
        raise QuantizationError("quantize_int4: the model has no nn.Linear layers to quantise (besides the head)")
    return names


def _read_state(source: Mapping[str, torch.Tensor] | str | os.PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    from safetensors.torch import load_file

    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no GPTQ safetensors checkpoint at {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_gptq(
    model: nn.Module,
    source: Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    zero_offset: int = 1,
    backend: Backend = "auto",
) -> list[str]:
    """Load a GPTQ-layout 4-bit checkpoint (a state dict, a ``.safetensors`` file or a folder of them)
    into ``model`` (built from the same config): every ``<name>.qweight`` replaces the linear ``<name>``
    by an `Int4Linear`; the other tensors (norms, embeddings, head) are loaded as they are.
    Returns the replaced module names."""
    state = _read_state(source)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    replaced = []
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" not in state:
            continue
        if not isinstance(module, nn.Linear):
            raise QuantizationError(f"{name}.qweight found but {name} is a {type(module).__name__}, not nn.Linear")
        layer = Int4Linear.from_gptq(
            state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"], state.get(f"{name}.g_idx"),
            state.get(f"{name}.bias"), zero_offset=zero_offset, dtype=dtype, backend=backend,
        )
        if (layer.out_features, layer.in_features) != tuple(module.weight.shape):
            raise QuantizationError(
                f"{name}: GPTQ shape {(layer.out_features, layer.in_features)} != model {tuple(module.weight.shape)}"
            )
        _replace(model, name, layer.to(module.weight.device))
        replaced.append(name)
    if not replaced:
        raise QuantizationError("no `<layer>.qweight` tensors in the checkpoint: is it a GPTQ 4-bit checkpoint?")
    gptq_suffixes = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")
    rest = {k: v for k, v in state.items() if not (k.rsplit(".", 1)[0] in replaced and k.endswith(gptq_suffixes))}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in replaced]
    if missing:
        log.warning("load_gptq: %d model tensors not in the checkpoint (kept): %s", len(missing), missing[:5])
    if unexpected:
        log.warning("load_gptq: ignored %d tensors the model does not have: %s", len(unexpected), unexpected[:5])
    return replaced
