"""QZO and MeZO: zeroth-order optimizers in the ``torch.optim`` style.

One step with seed ``s`` (``z ~ N(0, I)`` over every trained tensor, regenerated from ``s``, never stored):

    d  = [L(theta + eps z) - L(theta - eps z)] / (2 eps)       two forwards, no backward
    d' = clip(d, -C, C)                                          directional-derivative clipping
    theta <- theta - lr (d' z + wd theta); scales <- max(scales, min_scale)

QZO's theta is the continuous quantisation scales of a 4-bit model (``Int4Linear.scales``,
bitsandbytes ``quant_state.absmax``), optionally plus unquantised parameters; MeZO's theta is every
floating-point parameter of a full-precision model. In data-parallel runs every rank draws the same
``z`` (same seed) and only the scalar ``d`` is all-reduced.

Each tensor's ``z`` has its own seed (a function of the step's seed and the tensor's index), so it can
be drawn alone, in any order. That lets QZO shift a layer's scales only while the layer runs (a
forward pre-hook adds ``eps z``, a forward hook puts back a copy of that layer's scales): ``z`` and the
exact-restore copy then exist for one layer at a time instead of for the whole model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import nn

from llmsys.qzo.bnb import DoubleQuant, bnb_scale_owners, is_bnb_4bit
from llmsys.qzo.errors import CheckpointError, NoTrainableTensorsError
from llmsys.qzo.int4 import Int4Linear

log = logging.getLogger(__name__)

__all__ = ["MeZO", "QZO", "StepInfo", "ZerothOrderOptimizer", "quantized_scales"]

#: select unquantised parameters: True (all floating-point ones), False, or ``f(name, param) -> bool``
ParamFilter = Union[bool, Callable[[str, torch.Tensor], bool]]  # noqa: UP007 - a runtime alias


def quantized_scales(model: nn.Module, double_quant: DoubleQuant = "error") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every continuous quantisation scale the forward reads live."""
    return [(name, t) for name, t, _ in _scale_owners(model, double_quant)]


def _scale_owners(model: nn.Module, double_quant: DoubleQuant) -> list[tuple[str, torch.Tensor, nn.Module]]:
    """`quantized_scales` with the layer whose forward reads each scale."""
    found = [(f"{n}.scales", m.scales, m) for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    if any(is_bnb_4bit(m) for m in model.modules()):
        found += bnb_scale_owners(model, double_quant)
    return found


def _unquantized_params(model: nn.Module, select: ParamFilter) -> list[tuple[str, torch.Tensor]]:
    if select is False:
        return []
    quantized = [n for n, m in model.named_modules() if isinstance(m, Int4Linear) or is_bnb_4bit(m)]
    chosen = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or any(name.startswith(q + ".") for q in quantized):
            continue  # codes are not floats; a quantised layer's bias stays with the layer
        if select is True or select(name, p):
            chosen.append((name, p))
    return chosen


@dataclass
class StepInfo:
    """What the last `step` saw: losses at +eps / -eps (means over micro-batches), the projected
    gradient after the all-reduce, and whether the step was applied / clipped."""

    loss_plus: float
    loss_minus: float
    projected_grad: float
    applied: bool
    clipped: bool


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """The shared SPSA step of QZO and MeZO (see the module docstring).

    ``closure()`` is called twice per step under ``torch.no_grad()`` and returns the loss: a scalar,
    or a 1-D tensor of per-micro-batch losses (each contributes its own difference quotient; in
    data-parallel runs each rank's sum is all-reduced and divided by the total count).
    The only state is the base seed and the step counter (``state_dict()``).

    ``in_forward`` maps a tensor's index (in parameter-group order) to the module whose forward reads
    it: such tensors are shifted only while that module runs (always restored exactly, from a copy of
    that module's tensors). The others are shifted in place for the whole closure.
    """

    zeroth_order = True

    def __init__(
        self,
        named_groups: list[tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]],
        *,
        lr: float,
        eps: float,
        clip: float | None,
        seed: int,
        exact_restore: bool,
        distributed: bool | None,
        process_group: Any = None,
        in_forward: dict[int, nn.Module] | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (the perturbation size, e.g. 1e-3), got {eps}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None (no clipping), got {clip}")
        named_groups = [(named, opts) for named, opts in named_groups if named]
        self.names = [[n for n, _ in named] for named, _ in named_groups]
        groups = [{"params": [t for _, t in named], **opts} for named, opts in named_groups]
        super().__init__(groups, dict(lr=lr, weight_decay=0.0, clamp_min=None))
        self.eps, self.clip, self.seed, self.exact_restore = eps, clip, int(seed), exact_restore
        self.process_group = process_group
        self._distributed = distributed
        self.steps = self.skipped_steps = self.clipped_steps = 0
        self.last: StepInfo | None = None
        self._in_forward = dict(in_forward or {})
        self._layers: dict[nn.Module, list[int]] = {}  # module -> indices of the tensors its forward reads
        for index, module in self._in_forward.items():
            self._layers.setdefault(module, []).append(index)
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- bookkeeping -----------------------------------------------------------------------------

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by name (what a checkpoint holds)."""
        return {n: p for names, g in zip(self.names, self.param_groups) for n, p in zip(names, g["params"])}

    def num_trained(self) -> int:
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def step_seed(self, step: int) -> int:
        """The seed of step ``step``: a function of (base seed, step) only, so resuming is exact."""
        return (self.seed * 1_000_003 + step * 7919 + 1) % (2**63 - 1)

    def is_distributed(self) -> bool:
        if self._distributed is not None:
            return self._distributed
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def world_size(self) -> int:
        return torch.distributed.get_world_size(self.process_group) if self.is_distributed() else 1

    def state_dict(self) -> dict[str, Any]:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "seed": self.seed, "steps": self.steps, "skipped_steps": self.skipped_steps,
            "clipped_steps": self.clipped_steps, "eps": self.eps, "clip": self.clip,
            "param_groups": hyper, "sizes": [[p.numel() for p in g["params"]] for g in self.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = [[p.numel() for p in g["params"]] for g in self.param_groups]
        if state.get("sizes") != sizes:
            raise CheckpointError(
                "optimizer state does not match this optimizer's tensors (different model, quantisation or "
                "train_unquantized setting)"
            )
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.skipped_steps, self.clipped_steps = int(state["skipped_steps"]), int(state["clipped_steps"])
        self.eps, self.clip = float(state["eps"]), state["clip"]
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update(saved)

    # -- the algorithm ---------------------------------------------------------------------------

    @staticmethod
    def tensor_seed(seed: int, index: int) -> int:
        """The seed of tensor ``index``'s ``z`` in the step with seed ``seed``."""
        return (seed * 6_364_136_223_846_793_005 + (index + 1) * 1_442_695_040_888_963_407) % (2**63 - 1)

    def _z(self, p: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """``z`` of one tensor, from a dedicated generator per device (the global RNG is never touched)."""
        gen = self._generators.get(p.device)
        if gen is None:
            gen = self._generators[p.device] = torch.Generator(device=p.device)
        gen.manual_seed(self.tensor_seed(seed, index))
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)

    def _noise(self, seed: int) -> Iterator[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        """Yield (group, tensor, z) for every trained tensor."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p, self._z(p, seed, index)
                index += 1

    @contextmanager
    def _shifted_in_forward(self, flat: list[torch.Tensor], seed: int, scale: float) -> Iterator[None]:
        """While open, each `in_forward` module's tensors are ``theta0 + scale z`` during its forward only."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # a stack: (tensor, its value before the shift)

        def hooks(indices: list[int]):
            def shift(module: nn.Module, args: Any) -> None:
                for i in indices:
                    saved.append((flat[i], flat[i].detach().clone()))
                    flat[i].add_(self._z(flat[i], seed, i), alpha=scale)

            def restore(module: nn.Module, args: Any, output: Any) -> None:
                for _ in indices:
                    p, value = saved.pop()
                    p.copy_(value)

            return shift, restore

        handles = []
        try:
            for module, indices in self._layers.items():
                shift, restore = hooks(indices)
                handles += [module.register_forward_pre_hook(shift), module.register_forward_hook(restore)]
            yield
        finally:
            for handle in handles:
                handle.remove()
            while saved:  # a forward that raised half-way: put back what it had shifted
                p, value = saved.pop()
                p.copy_(value)

    @staticmethod
    def _losses(closure: Callable[[], Any]) -> torch.Tensor:
        loss = closure()
        loss = loss if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        return loss.detach().reshape(-1).to(device="cpu", dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step; returns the mean of the +eps and -eps losses (local, float64)."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure returning the loss (two forwards per step)")
        seed, eps = self.step_seed(self.steps), self.eps
        flat = [p for g in self.param_groups for p in g["params"]]
        in_place = [i for i in range(len(flat)) if i not in self._in_forward]
        # exact_restore: theta0 + scale z from a copy (no drift); else MeZO's walk +eps, -2eps, +eps (no copy)
        backup = {i: flat[i].detach().clone() for i in in_place} if self.exact_restore else None
        at = 0.0  # where the in-place tensors are, in units of z

        def loss_at(scale: float) -> torch.Tensor:
            nonlocal at
            for i in in_place:
                z = self._z(flat[i], seed, i)
                if backup is not None:
                    flat[i].copy_(backup[i]).add_(z, alpha=scale)
                else:
                    flat[i].add_(z, alpha=scale - at)
            at = scale
            with self._shifted_in_forward(flat, seed, scale):
                return self._losses(closure)

        try:
            plus = loss_at(eps)
            minus = loss_at(-eps)
        finally:  # also when the closure raised: the tensors never stay perturbed
            for i in in_place:
                if backup is not None:
                    flat[i].copy_(backup[i])
                elif at:
                    flat[i].add_(self._z(flat[i], seed, i), alpha=-at)
            backup = None  # free the copy before the update

        # ONE scalar per step crosses ranks: the sum of this rank's difference quotients.
        quotient = ((plus - minus) / (2 * eps)).sum().reshape(1)
        count = plus.numel()
        if self.is_distributed():
            if torch.distributed.get_backend(self.process_group) == "nccl":  # NCCL reduces CUDA tensors only
                quotient = quotient.to(f"cuda:{torch.cuda.current_device()}")
            torch.distributed.all_reduce(quotient, group=self.process_group)
            count *= self.world_size()
        d = float(quotient.item()) / count
        self.steps += 1
        clipped = self.clip is not None and abs(d) > self.clip
        info = StepInfo(float(plus.mean()), float(minus.mean()), d, applied=math.isfinite(d), clipped=clipped)
        self.last = info
        if not info.applied:  # non-finite loss somewhere: parameters are already restored, skip
            self.skipped_steps += 1
            # warn once, then count quietly: a diverged run would otherwise print one line per step
            (log.warning if self.skipped_steps == 1 else log.debug)(
                "step %d skipped: non-finite loss (+eps %s, -eps %s); later skips are only counted (skipped_steps)",
                self.steps, info.loss_plus, info.loss_minus,
            )
            return (plus.mean() + minus.mean()) / 2
        if clipped:
            self.clipped_steps += 1
            d = max(-self.clip, min(self.clip, d))  # type: ignore[type-var]
        for group, p, z in self._noise(seed):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(z, alpha=-group["lr"] * d)
            if group["clamp_min"] is not None:
                p.clamp_(min=group["clamp_min"])
        return (plus.mean() + minus.mean()) / 2


class QZO(ZerothOrderOptimizer):
    """Quantised zeroth-order fine-tuning: perturb and update only the continuous quantisation scales.

    ``model`` holds `Int4Linear` layers (`quantize_int4`, `load_gptq`) and/or bitsandbytes
    ``Linear4bit``. ``train_unquantized`` also trains unquantised parameters MeZO-style (True: all
    floating-point ones, e.g. norms, embeddings and head; or a ``f(name, param) -> bool``), with
    ``unquantized_lr`` (default ``lr``) and ``weight_decay``. ``clip=None`` disables clipping.
    Scales are clamped at ``min_scale`` after each update. ``perturb="forward"`` (default) shifts each
    layer's scales only while that layer's forward runs and puts them back from a copy of that layer's
    scales alone; ``perturb="in_place"`` shifts every scale for the whole closure (for closures that read
    scales outside the layers' forward, e.g. ``layer.dequantize()``). ``exact_restore`` keeps a copy of
    the tensors shifted in place during the two forwards so they come back bit-exact. Both give the
    same steps. ``distributed=None`` all-reduces when ``torch.distributed`` is initialised with > 1 rank.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        eps: float = 1e-3,
        clip: float | None = 100.0,
        *,
        min_scale: float = 1e-7,
        train_unquantized: ParamFilter = False,
        unquantized_lr: float | None = None,
        weight_decay: float = 0.0,
        double_quant: DoubleQuant = "error",
        seed: int = 0,
        perturb: Literal["forward", "in_place"] = "forward",
        exact_restore: bool = True,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        if perturb not in ("forward", "in_place"):
            raise ValueError(f"perturb must be 'forward' or 'in_place', got {perturb!r}")
        owned = _scale_owners(model, double_quant)
        scales = [(name, t) for name, t, _ in owned]
        extra = _unquantized_params(model, train_unquantized)
        if not scales and not extra:
            kinds = {type(m).__name__ for m in model.modules()}
            other = sorted(k for k in kinds if "4bit" in k or "8bit" in k)
            raise NoTrainableTensorsError(
                "QZO found no quantised layers it can train (llmsys Int4Linear or bitsandbytes Linear4bit)"
                + (f"; unsupported quantised layers present: {other}" if other else "")
                + ". Fix: quantise the model with llmsys.qzo.quantize_int4 / quantize_bnb, load a GPTQ checkpoint "
                "with llmsys.qzo.load_gptq, load with BitsAndBytesConfig(load_in_4bit=True), or pass "
                "train_unquantized=True to train the full-precision parameters (MeZO)"
            )
        if unquantized_lr is not None and not unquantized_lr > 0:
            raise ValueError(f"unquantized_lr must be > 0, got {unquantized_lr}")
        groups = [
            (scales, dict(lr=lr, weight_decay=0.0, clamp_min=min_scale)),
            (extra, dict(lr=unquantized_lr or lr, weight_decay=weight_decay, clamp_min=None)),
        ]
        super().__init__(
            groups, lr=lr, eps=eps, clip=clip, seed=seed, exact_restore=exact_restore,
            distributed=distributed, process_group=process_group,
            in_forward={i: layer for i, (_, _, layer) in enumerate(owned)} if perturb == "forward" else None,
        )
        self.perturb = perturb


class MeZO(ZerothOrderOptimizer):
    """MeZO (Malladi et al., 2023), the full-precision baseline: every selected floating-point
    parameter is perturbed and updated. By default no clipping and MeZO's in-place +eps/-2eps/+eps
    walk (``exact_restore=False``: no copy of the weights, so memory stays at inference level)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-6,
        eps: float = 1e-3,
        clip: float | None = None,
        *,
        params: ParamFilter = True,
        weight_decay: float = 0.0,
        seed: int = 0,
        exact_restore: bool = False,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        named = _unquantized_params(model, params)
        if not named:
            raise NoTrainableTensorsError("MeZO found no floating-point parameters to train (check `params=`)")
        super().__init__(
            [(named, dict(lr=lr, weight_decay=weight_decay, clamp_min=None))], lr=lr, eps=eps, clip=clip,
            seed=seed, exact_restore=exact_restore, distributed=distributed, process_group=process_group,
        )

