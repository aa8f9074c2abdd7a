"""QZO and MeZO: zeroth-order optimizers in the ``torch.optim`` style.

One step with seed ``s`` (``z ~ N(0, I)`` over every trained tensor, regenerated from ``s``, never stored):

    d  = [L(theta + eps z) - L(theta - eps z)] / (2 eps)       two forwards, no backward
    d' = clip(d, -C, C)                                          directional-derivative clipping
    theta <- theta - lr (d' z + wd theta); scales <- max(scales, min_scale)

QZO's theta is the continuous quantisation scales of a 4-bit model (``Int4Linear.scales``,
bitsandbytes ``quant_state.absmax``), optionally plus unquantised parameters; MeZO's theta is every
floating-point parameter of a full-precision model. In data-parallel runs every rank draws the same
``z`` (same seed) and only the scalar ``d`` is all-reduced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from llmsys.qzo.bnb import DoubleQuant, bnb_scales, is_bnb_4bit
from llmsys.qzo.errors import CheckpointError, NoTrainableTensorsError
from llmsys.qzo.int4 import Int4Linear

log = logging.getLogger(__name__)

__all__ = ["MeZO", "QZO", "StepInfo", "ZerothOrderOptimizer", "quantized_scales"]

#: select unquantised parameters: True (all floating-point ones), False, or ``f(name, param) -> bool``
ParamFilter = Union[bool, Callable[[str, torch.Tensor], bool]]  # noqa: UP007 - a runtime alias


def quantized_scales(model: nn.Module, double_quant: DoubleQuant = "error") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every continuous quantisation scale the forward reads live."""
    found = [(f"{n}.scales", m.scales) for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    if any(is_bnb_4bit(m) for m in model.modules()):
        found += bnb_scales(model, double_quant)
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

    def _noise(self, seed: int):
        """Yield (group, tensor, z) in a fixed order; z regenerated from ``seed`` with a dedicated
        generator per device (the global RNG is never touched)."""
        gens: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.device not in gens:
                    gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                yield group, p, torch.randn(p.shape, generator=gens[p.device], device=p.device, dtype=p.dtype)

    def _perturb(self, seed: int, scale: float, backup: list[torch.Tensor] | None) -> None:
        for i, (_, p, z) in enumerate(self._noise(seed)):
            if backup is not None:
                p.copy_(backup[i]).add_(z, alpha=scale)  # theta0 + scale z: exact, no drift
            else:
                p.add_(z, alpha=scale)  # MeZO's in-place walk (+eps, -2eps, +eps): no copy

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
        backup = [p.detach().clone() for g in self.param_groups for p in g["params"]] if self.exact_restore else None
        self._perturb(seed, eps, backup)
        plus = self._losses(closure)
        self._perturb(seed, -2 * eps if backup is None else -eps, backup)
        minus = self._losses(closure)
        if backup is not None:
            for p, b in zip((p for g in self.param_groups for p in g["params"]), backup):
                p.copy_(b)
            del backup
        else:
            self._perturb(seed, eps, None)

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
    Scales are clamped at ``min_scale`` after each update. ``exact_restore`` keeps a copy of the
    trained tensors during the two forwards (cheap for scales) so they come back bit-exact.
    ``distributed=None`` all-reduces when ``torch.distributed`` is initialised with > 1 rank.
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
        exact_restore: bool = True,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        scales = quantized_scales(model, double_quant)
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
        )


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

