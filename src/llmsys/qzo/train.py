"""`train`: one loop for QZO, MeZO and the first-order baselines (SGD, AdamW, LoRA).

- data is a function ``step -> batch`` (a dict of tensors with the batch on dim 0), so a resumed run
  sees exactly the batches it would have seen;
- zeroth-order optimizers get a closure returning one loss per micro-batch; first-order ones get
  ``backward()`` per micro-batch (losses averaged);
- data parallel: with ``torch.distributed`` initialised, rank r keeps its slice of every global
  batch and the optimizer all-reduces one scalar per step (QZO/MeZO), so N processes compute what
  one process computes with ``micro_batches=N`` over the same global batch, bit for bit;
- checkpoints (zeroth-order optimizers) hold only the trained tensors (the scales, plus unquantised
  parameters when trained) and the seed/step counters: a few kB to MB; ``resume=True`` continues
  from the newest one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from llmsys.models import uses_standard_causal_lm_loss
from llmsys.qzo.errors import CheckpointError
from llmsys.qzo.optimizer import ZerothOrderOptimizer

log = logging.getLogger(__name__)

__all__ = [
    "TrainResult", "causal_lm_loss", "chunked_causal_lm_loss", "load_checkpoint", "save_checkpoint", "train",
]

Batch = Mapping[str, torch.Tensor]


#: float32 bytes of logits upcast at a time by the no-grad loss (8 rows at a 32k vocab; the chunk and its
#: log_softmax are the loss's only temporaries besides the model's logits)
LOSS_CHUNK_BYTES = 2**20
_LEAN_KEYS = {"input_ids", "attention_mask", "position_ids", "labels", "use_cache"}


def chunked_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (float32 mean next-token cross-entropy, ``labels`` shifted by
    padding with ``ignore_index``), bit for bit, without its two float32 copies of all the logits:
    ``log_softmax`` of a row depends on that row only, so rows go through it a chunk at a time and only
    each row's log-probability of its target is kept; ``nll_loss`` then reduces those numbers in the
    same order (the same summation) as it reduces the full ``[tokens, vocab]`` tensor. No autograd."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    target = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(flat.device)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target)).unsqueeze(1)
    picked = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=flat.device)
    rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    for start in range(0, flat.shape[0], rows):
        chunk = torch.log_softmax(flat[start : start + rows].float(), dim=-1)
        picked[start : start + rows] = chunk.gather(1, safe[start : start + rows])
        del chunk
    column = torch.where(keep, torch.zeros_like(target), torch.full_like(target, ignore_index))
    return nn.functional.nll_loss(picked, column, ignore_index=ignore_index, reduction="mean")


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (``labels`` in the batch): mean next-token cross-entropy.

    Never builds a KV cache (``use_cache=False``: a training forward reads none, and the cache would
    hold a copy of every layer's keys and values). Without autograd (the zeroth-order closures) and for
    a transformers model with the standard causal-LM loss, the loss is computed from the logits by
    `chunked_causal_lm_loss`: the same number, bit for bit, without two float32 copies of the logits
    (2 x 4 bytes x tokens x vocab: 62 MB for 256 tokens at a 32k vocab).
    """
    kwargs = dict(batch)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    labels = kwargs.get("labels")
    lean = labels is not None and not torch.is_grad_enabled() and set(kwargs) <= _LEAN_KEYS
    if not (lean and uses_standard_causal_lm_loss(model)):
        return model(**kwargs).loss
    del kwargs["labels"]
    logits = model(**kwargs).logits
    return chunked_causal_lm_loss(logits, labels)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"[, eval metrics]}
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    clipped_steps: int = 0
    resumed_from: int | None = None

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def _shard(batch: Batch, index: int, parts: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in batch.items():
        if t.shape[0] % parts:
            raise ValueError(
                f"batch[{key!r}] has {t.shape[0]} rows, not divisible into {parts} equal shards "
                "(world size x micro_batches): use a global batch size that is a multiple of it"
            )
        size = t.shape[0] // parts
        out[key] = t[index * size : (index + 1) * size]
    return out


# -- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, optimizer: ZerothOrderOptimizer, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained tensors (safetensors) and the optimizer's seed/counters (JSON) into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in optimizer.named_tensors().items()}
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"optimizer": optimizer.state_dict(), **(extra or {})}, default=float))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-write never leaves a half checkpoint under the final name
    return path


def load_checkpoint(path: str | Path, optimizer: ZerothOrderOptimizer) -> dict[str, Any]:
    """Copy a checkpoint's tensors into the optimizer's tensors (in place) and restore its counters;
    returns the checkpoint's JSON state."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / "tensors.safetensors"))
    mine = optimizer.named_tensors()
    if set(saved) != set(mine):
        diff = sorted(set(saved) ^ set(mine))[:5]
        raise CheckpointError(f"checkpoint {path} holds other tensors than the optimizer trains (e.g. {diff})")
    optimizer.load_state_dict(state["optimizer"])
    with torch.no_grad():
        for name, t in mine.items():
            if saved[name].shape != t.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(saved[name].shape)} != {tuple(t.shape)}")
            t.copy_(saved[name])
    return state


def _latest(directory: Path) -> Path | None:
    steps = sorted(directory.glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


# -- the loop ------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Callable[[int], Batch],
    steps: int,
    *,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = causal_lm_loss,
    eval_fn: Callable[[nn.Module], float | Mapping[str, float]] | None = None,
    eval_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = True,
    micro_batches: int = 1,
    progress: bool = True,
) -> TrainResult:
    """Run ``steps`` optimizer steps (counting from 0, or from a resumed checkpoint) on ``data(step)``.

    ``eval_fn(model)`` runs every ``eval_every`` steps and at the end (a number, or a dict of them).
    Checkpoints (zeroth-order optimizers only) go to ``checkpoint_dir/step_<n>`` every
    ``checkpoint_every`` steps and at the end; the newest ``keep_checkpoints`` are kept.
    """
    if steps < 0 or micro_batches < 1:
        raise ValueError(f"steps must be >= 0 and micro_batches >= 1, got {steps} and {micro_batches}")
    zeroth = isinstance(optimizer, ZerothOrderOptimizer)
    if checkpoint_dir is not None and not zeroth:
        raise ValueError(
            "train(checkpoint_dir=...) saves only the trained scales, which needs a zeroth-order optimizer "
            "(QZO/MeZO); for first-order baselines save the model with model.save_pretrained"
        )
    dist = torch.distributed
    distributed = zeroth and optimizer.is_distributed()
    if not zeroth and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("first-order baselines in train() run in one process; wrap them in DDP yourself")
    rank = dist.get_rank(optimizer.process_group) if distributed else 0
    world = optimizer.world_size() if zeroth else 1

    result = TrainResult(steps=0, seconds=0.0)
    start_step = 0
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None and resume and (latest := _latest(ckpt_dir)) is not None:
        state = load_checkpoint(latest, optimizer)  # type: ignore[arg-type]
        start_step = int(state["step"])
        result.history, result.evals = state.get("history", []), state.get("evals", [])
        result.resumed_from = start_step
        log.info("resumed from %s (step %d)", latest, start_step)

    def run_eval(step: int) -> None:
        value = eval_fn(model)  # type: ignore[misc]
        metrics = dict(value) if isinstance(value, Mapping) else {"eval": float(value)}
        result.evals.append({"step": step, **metrics})

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        save_checkpoint(
            ckpt_dir / f"step_{step:07d}", optimizer,  # type: ignore[operator, arg-type]
            {"step": step, "history": result.history, "evals": result.evals},
        )
        for old in sorted(ckpt_dir.glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))[:-keep_checkpoints]:  # type: ignore[union-attr]
            shutil.rmtree(old)

    began = time.perf_counter()
    bar = tqdm(range(start_step, steps), disable=not progress or rank != 0, desc=type(optimizer).__name__)
    for step in bar:
        local = _shard(data(step), rank, world) if world > 1 else dict(data(step))
        micro = [_shard(local, i, micro_batches) for i in range(micro_batches)] if micro_batches > 1 else [local]
        if zeroth:
            loss_t = optimizer.step(lambda micro=micro: torch.stack([loss_fn(model, mb).float() for mb in micro]))
            loss = float(loss_t)
        else:
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for mb in micro:
                part = loss_fn(model, mb) / len(micro)
                part.backward()
                total += float(part.detach())
            loss = total
            if math.isfinite(loss):
                optimizer.step()
            else:  # the same rule as the zeroth-order path: a non-finite loss is never applied
                result.skipped_steps += 1
        result.history.append({"step": step + 1, "loss": loss})
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            run_eval(step + 1)
        if ckpt_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(step + 1)
    bar.close()
    if eval_fn is not None:
        run_eval(steps)
    if ckpt_dir is not None and (not checkpoint_every or steps % checkpoint_every):
        checkpoint(steps)
    result.steps = steps
    result.seconds = time.perf_counter() - began
    if zeroth:
        result.skipped_steps, result.clipped_steps = optimizer.skipped_steps, optimizer.clipped_steps
    return result
