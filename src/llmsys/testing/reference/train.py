"""Training the reference model: the recipe, the loop, checkpoints and the final needle table.

The recipe (`Recipe`, JSON-able, hashed) is a 2-layer Llama trained on the synthetic documents of
`llmsys.testing.reference.data` with three losses:

1. the answer tokens of questions (multi-query associative recall, needles, alias chains);
2. *previous-token read-out*: on "skip" documents (random tokens where some repeat the token two
   back), the residual stream after layer `skip_layer` is read out through the final norm and the
   LM head and must predict the token two back, i.e. layer `skip_layer` must contain an attention
   head that copies the previous token - the first half of an induction circuit;
3. *key-matching attention*: on every question, head `attn_head` of layer `attn_layer` is trained
   (cross-entropy over positions) to attend to the position(s) right after the matching key - the
   second half of the circuit.

Without (2) and (3) the model sits for thousands of steps on the plateau "emit some value present in
the context" (see docs/reference-model.md); with them the circuit forms within a few hundred steps
and the answer loss does the rest. Lengths follow a curriculum (`lengths`): a longer stage starts
when the running answer accuracy passes `stage_accuracy`, or at the latest at its deadline.

Deterministic for a seed: the initial weights and every batch (rows drawn from
``np.random.default_rng([seed, step])``) depend on the seed and the step only. A run limited by
`steps` is reproducible; a run limited by `minutes` records how many steps it ran (rerun with
``--steps`` that many to reproduce it). GPU kernels may differ in the last bits between runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmsys.eval.tasks import SyntheticVocab
from llmsys.testing.reference.data import IGNORE, Mixture, make_batch

log = logging.getLogger(__name__)

FILES = ("config.json", "model.safetensors", "recipe.json", "eval.json")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights (and nothing that does not)."""

    seed: int = 0
    # model (LlamaForCausalLM)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 1e5
    initializer_range: float = 0.02
    # data
    n_keys: int = 64
    n_values: int = 64
    n_filler: int = 64
    mixture: Mixture = field(default_factory=Mixture)
    lengths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    stage_accuracy: float = 0.85  # running answer accuracy that opens the next length stage
    stage_min_steps: int = 50
    stage_deadline: float = 0.5  # the last stage opens by this fraction of the run at the latest ...
    stage_deadline_min_steps: int = 150  # ... but a stage lasts this many steps before a deadline ends it
    newest_share: float = 0.5  # share of steps at the newest length; the rest: older lengths
    tokens_per_step: int = 4096
    max_rows: int = 512  # rows per step at most (short lengths)
    # auxiliary circuit losses
    skip_layer: int = 0
    skip_weight: float = 1.0
    attn_layer: int = 1
    attn_head: int = 0
    attn_weight: float = 1.0
    attn_queries_per_row: int = 32
    # optimiser (AdamW, warmup - constant - decay)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0

    @property
    def vocab(self) -> SyntheticVocab:
        return SyntheticVocab(n_keys=self.n_keys, n_values=self.n_values, n_filler=self.n_filler)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}")
        if "mixture" in data and isinstance(data["mixture"], dict):
            mix = {k: tuple(v) if isinstance(v, list) else v for k, v in data["mixture"].items()}
            data["mixture"] = Mixture(**mix)
        for key in ("lengths", "betas"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    def hash(self) -> str:
        """A short hash of the recipe: the cache key of trained weights."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def model_config(self):
        from transformers import LlamaConfig

        v = self.vocab
        config = LlamaConfig(
            vocab_size=v.size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=16384,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            initializer_range=self.initializer_range,
            tie_word_embeddings=False,
            bos_token_id=v.BOS,
            eos_token_id=v.EOS,
            pad_token_id=v.PAD,
        )
        return config


#: the recipe the committed weights were trained with (GPU: `gpu_recipe()`)
DEFAULT_RECIPE = Recipe()


def gpu_recipe(seed: int = 0) -> Recipe:
    """The same recipe with large steps, for a CUDA device (bf16 autocast)."""
    return dataclasses.replace(DEFAULT_RECIPE, seed=seed, tokens_per_step=131072, max_rows=256)


# --------------------------------------------------------------------------------------------------
# model


def build_model(recipe: Recipe, attn_implementation: str = "sdpa"):
    from transformers import LlamaForCausalLM

    config = recipe.model_config()
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
    return model


def save_model(model, out_dir: Path, recipe: Recipe, extra: dict | None = None) -> None:
    """config.json + model.safetensors (fp32) + recipe.json, written atomically into out_dir."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out_dir / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "recipe_hash": recipe.hash()})
    os.replace(tmp, out_dir / "model.safetensors")
    os.chmod(out_dir / "model.safetensors", 0o644)
    config = model.config.to_dict()
    config.pop("_attn_implementation_autoset", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "recipe.json", {"recipe": recipe.to_dict(), "hash": recipe.hash(), **(extra or {})})


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# --------------------------------------------------------------------------------------------------
# data stream


def batch_for_step(recipe: Recipe, step: int, stage: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(length, ids, labels, early_labels) of one step: a function of (recipe, step, stage) only."""
    rng = np.random.default_rng([recipe.seed, step])
    lengths = recipe.lengths[: stage + 1]
    if stage == 0 or rng.uniform() < recipe.newest_share:
        length = lengths[-1]
    else:
        length = lengths[int(rng.integers(0, stage))]
    rows = max(1, min(recipe.max_rows, recipe.tokens_per_step // length))
    ids, labels, early = make_batch(rng, length, rows, recipe.mixture, recipe.vocab)
    return length, ids.int(), labels.int(), early.int()  # int32: half the bytes between processes


class _Prefetcher:
    """Batches made ahead by worker processes (spawned: safe after CUDA is initialised).

    A batch made ahead for a length stage that has changed by the time it is needed is made again,
    so the batches - and the run - do not depend on the number of workers.
    """

    def __init__(self, recipe: Recipe, workers: int, ahead: int):
        self.recipe, self.ahead = recipe, ahead
        self.pool = ProcessPoolExecutor(workers, mp_context=_spawn()) if workers > 0 else None
        self.jobs: dict[int, tuple[int, Future]] = {}

    def get(self, step: int, stage: int):
        if self.pool is None:
            return batch_for_step(self.recipe, step, stage)
        for s in range(step, step + self.ahead):
            if s not in self.jobs or self.jobs[s][0] != stage:
                self.jobs[s] = (stage, self.pool.submit(batch_for_step, self.recipe, s, stage))
        _, job = self.jobs.pop(step)
        try:
            return job.result()
        except Exception as exc:  # a broken worker pool: carry on in this process (same batches)
            log.warning("data workers failed (%r); generating batches in the main process", exc)
            self.close()
            self.pool, self.jobs = None, {}
            return batch_for_step(self.recipe, step, stage)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------------------------------
# losses


class _Taps:
    """Forward hooks that keep a layer's output and an attention module's inputs for the aux losses."""

    def __init__(self, model, skip_layer: int, attn_layer: int):
        from llmsys.models import decoder_layers, read_attention_call

        self.layer_out: torch.Tensor | None = None
        self.attn_call = None
        layers = decoder_layers(model)

        def keep_output(module, args, output):
            self.layer_out = output[0] if isinstance(output, tuple) else output

        def keep_call(module, args, kwargs):
            self.attn_call = read_attention_call(args, kwargs)

        self.handles = [
            layers[skip_layer].register_forward_hook(keep_output),
            layers[attn_layer].self_attn.register_forward_pre_hook(keep_call, with_kwargs=True),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_match_loss(
    model, call, ids: torch.Tensor, labels: torch.Tensor, layer: int, head: int, per_row: int, generator
) -> torch.Tensor:
    """Cross-entropy of head `head`'s attention at each question onto the positions that hold the answer.

    For an answer token at position p (predicted at p-1, where the current token is the key or the
    previous hop), the targets are the earlier positions s whose previous token equals token p-1 and
    whose token equals the answer: the value right after the matching fact's key.
    """
    from llmsys.models import attention_modules, kv_heads, query_key_states

    attn = attention_modules(model)[layer]
    B, T = ids.shape
    dev = ids.device
    mask = labels[:, 1:] != IGNORE  # answer at p+1, asked at p
    if not bool(mask.any()):
        return ids.new_zeros((), dtype=torch.float32)
    prio = torch.rand(mask.shape, generator=generator).to(dev)
    prio = prio.masked_fill(~mask, -1.0)
    n = min(per_row, T - 1)
    top, qpos = prio.topk(n, dim=1)  # [B, n]: question positions (p)
    valid = top >= 0
    answer = labels.gather(1, qpos + 1)
    current = ids.gather(1, qpos)
    q, k = query_key_states(attn, call.hidden_states, call.position_embeddings)
    heads, kvh, head_dim = kv_heads(model)
    qh = q[:, head].float()  # [B, T, D]
    kh = k[:, head // (heads // kvh)].float()
    qsel = qh.gather(1, qpos[..., None].expand(-1, -1, head_dim))  # [B, n, D]
    scores = torch.bmm(qsel, kh.transpose(1, 2)) * head_dim**-0.5  # [B, n, T]
    pos = torch.arange(T, device=dev)
    prev = torch.cat([ids.new_full((B, 1), -1), ids[:, :-1]], dim=1)
    target = (prev[:, None, :] == current[..., None]) & (ids[:, None, :] == answer[..., None])
    target &= pos[None, None, :] < qpos[..., None]
    scores = scores.masked_fill(pos[None, None, :] > qpos[..., None], float("-inf"))
    ok = valid & target.any(-1)
    if not bool(ok.any()):
        return scores.new_zeros(())
    scores, target = scores[ok], target[ok]  # questions with at least one target position
    lse_all = torch.logsumexp(scores, -1)
    lse_tgt = torch.logsumexp(scores.masked_fill(~target, float("-inf")), -1)
    return (lse_all - lse_tgt).mean()


def _lr_at(recipe: Recipe, step: int, progress: float) -> float:
    warm = min(1.0, step / max(1, recipe.warmup_steps))
    start = 1.0 - recipe.decay_fraction
    if progress <= start:
        return recipe.lr * warm
    frac = min(1.0, (progress - start) / max(1e-9, recipe.decay_fraction))
    cosine = 0.5 * (1 + math.cos(math.pi * frac))
    return recipe.lr * warm * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------------------------------
# the loop


def train_reference(
    out_dir: str | os.PathLike,
    device: str = "cpu",
    minutes: float | None = 30.0,
    steps: int | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    checkpoint_minutes: float = 1.0,
    eval_lengths: tuple[int, ...] = (1024, 2048, 4096),
    eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    eval_samples: int = 20,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    amp: bool | None = None,
) -> dict:
    """Train the reference model into `out_dir` (config.json, model.safetensors, recipe.json, eval.json).

    Stops at `steps` or after `minutes` of training, whichever comes first (at least one must be
    given); saves every `checkpoint_minutes`; at the end evaluates needle accuracy over
    `eval_lengths` x `eval_depths` (`eval_samples` each) and writes eval.json. On "cuda" it trains
    under bf16 autocast (`amp`, default: on CUDA only). `recipe` defaults to `DEFAULT_RECIPE` on CPU
    and `gpu_recipe()` on CUDA, with `seed` applied. Returns the summary written to recipe.json (plus the eval table).
    """
    if minutes is None and steps is None:
        raise ValueError("give minutes, steps or both")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    amp = cuda if amp is None else amp
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but torch.cuda.is_available() is False; use device='cpu'")
    if recipe is None:
        recipe = gpu_recipe(seed) if cuda else dataclasses.replace(DEFAULT_RECIPE, seed=seed)
    if threads is not None:
        torch.set_num_threads(threads)
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 2)) if cuda else 0
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = build_model(recipe).to(dev)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=recipe.betas,
        fused=cuda,
    )
    taps = _Taps(model, recipe.skip_layer, recipe.attn_layer)
    gen = torch.Generator().manual_seed(recipe.seed)
    prefetch = _Prefetcher(recipe, workers, ahead=max(4, 2 * workers))
    log_path = out / "train_log.jsonl"
    log_file = log_path.open("w")
    budget_s = None if minutes is None else 60.0 * minutes
    max_steps = steps if steps is not None else 10**9
    bar = _progress_bar(progress, steps, budget_s)

    stage, stage_start, acc_ema, loss_ema = 0, 0, 0.0, None
    stage_log: list[dict] = []
    start = last_ckpt = time.perf_counter()
    tokens = 0
    step = 0
    summary: dict[str, Any] = {}
    try:
        while step < max_steps:
            elapsed = time.perf_counter() - start
            if budget_s is not None and elapsed >= budget_s:
                break
            progress_frac = max(step / max_steps if steps else 0.0, elapsed / budget_s if budget_s else 0.0)
            lr = _lr_at(recipe, step, progress_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            length, ids, labels, early = prefetch.get(step, stage)
            ids, labels, early = (t.to(dev, non_blocking=True).long() for t in (ids, labels, early))
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                mask = labels[:, 1:] != IGNORE
                logits = model.lm_head(hidden[:, :-1][mask]).float()
                target = labels[:, 1:][mask]
                answer_loss = F.cross_entropy(logits, target) if target.numel() else logits.sum() * 0
                loss = answer_loss
                skip_loss = torch.zeros((), device=dev)
                emask = early[:, 1:] != IGNORE
                if recipe.skip_weight > 0 and bool(emask.any()):
                    h = taps.layer_out[:, :-1][emask]
                    elogits = model.lm_head(model.model.norm(h)).float()
                    skip_loss = F.cross_entropy(elogits, early[:, 1:][emask])
                    loss = loss + recipe.skip_weight * skip_loss
                attn_loss = torch.zeros((), device=dev)
                if recipe.attn_weight > 0:
                    attn_loss = attention_match_loss(
                        model, taps.attn_call, ids, labels, recipe.attn_layer, recipe.attn_head,
                        recipe.attn_queries_per_row, gen,
                    )
                    loss = loss + recipe.attn_weight * attn_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            step += 1
            tokens += ids.numel()

            if step % 10 == 0 or step == 1:  # .item() syncs: not every step on a GPU
                acc = (logits.argmax(-1) == target).float().mean().item() if target.numel() else 0.0
                newest = length == recipe.lengths[stage]
                if newest:
                    acc_ema = acc if step - stage_start <= 10 else 0.8 * acc_ema + 0.2 * acc
                lval = answer_loss.item()
                loss_ema = lval if loss_ema is None else 0.9 * loss_ema + 0.1 * lval
                record = {
                    "step": step, "seconds": round(time.perf_counter() - start, 1), "stage": stage,
                    "length": length, "lr": lr, "loss": round(lval, 4), "acc": round(acc, 4),
                    "acc_ema": round(acc_ema, 4), "skip_loss": round(skip_loss.item(), 4),
                    "attn_loss": round(attn_loss.item(), 4), "tokens": tokens,
                }
                log_file.write(json.dumps(record) + "\n")
                if step % 100 == 0:
                    log_file.flush()
                    log.info("step %d stage %d len %d loss %.3f acc %.3f", step, stage, length, lval, acc_ema)
                if callback is not None:
                    callback(record)
                bar.set_postfix(stage=stage, len=recipe.lengths[stage], loss=f"{loss_ema:.3f}", acc=f"{acc_ema:.2f}")
                # curriculum: open the next length when the newest one is learnt (or at the deadline)
                if stage + 1 < len(recipe.lengths):
                    last = len(recipe.lengths) - 1
                    deadline = recipe.stage_deadline * (stage + 1) / last
                    in_stage = step - stage_start
                    learnt = acc_ema >= recipe.stage_accuracy and in_stage >= recipe.stage_min_steps
                    late = progress_frac >= deadline and in_stage >= recipe.stage_deadline_min_steps
                    if learnt or late:
                        stage_log.append({"stage": stage + 1, "length": recipe.lengths[stage + 1], "step": step,
                                          "reason": "accuracy" if learnt else "deadline"})
                        stage, stage_start = stage + 1, step
                        log.info("step %d: length stage %d (%d tokens)", step, stage, recipe.lengths[stage])
            _advance(bar, steps, step, time.perf_counter() - start)
            if time.perf_counter() - last_ckpt >= 60.0 * checkpoint_minutes:
                summary = _summary(recipe, step, tokens, start, stage, stage_log, device, loss_ema, acc_ema)
                save_model(model, out, recipe, summary)
                last_ckpt = time.perf_counter()
    finally:
        bar.close()
        log_file.close()
        prefetch.close()
        taps.remove()

    summary = _summary(recipe, step, tokens, start, stage, stage_log, device, loss_ema, acc_ema)
    model.eval()
    save_model(model, out, recipe, summary)
    log.info("trained %d steps in %.0f s; evaluating", step, summary["train_seconds"])
    if cuda:  # evaluate as users run it: fp32, no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    table = needle_table(
        model, eval_lengths, eval_depths, eval_samples, device=dev, seed=10_000 + recipe.seed, progress=progress,
        vocab=recipe.vocab,
    )
    table["extra"] = extra_tables(model, eval_lengths, max(1, eval_samples // 2), dev, recipe)
    _write_json(out / "eval.json", table)
    summary["eval"] = table
    return summary


def extra_tables(model, lengths, samples: int, device, recipe: Recipe) -> dict:
    """Accuracy per length of the other tasks (MQAR, 2-hop variable tracking), depths 0 / 0.5 / 1."""
    from llmsys.eval.runner import evaluate
    from llmsys.eval.tasks import MQARTask, VariableTrackingTask

    model.eval()
    dev = torch.device(device)
    out = {}
    for task in (MQARTask(vocab=recipe.vocab), VariableTrackingTask(hops=2, vocab=recipe.vocab)):
        try:
            with torch.no_grad():
                res = evaluate(model, task, lengths=lengths, depths=(0.0, 0.5, 1.0), samples=samples,
                               seed=20_000 + recipe.seed, batch_size=samples if dev.type == "cuda" else 4,
                               progress=False)
        except ValueError as exc:  # e.g. a length too short for the task
            out[task.name] = {"error": str(exc)}
            continue
        out[task.name] = {L: v["accuracy"] for L, v in res["by_length"].items()}
    return out


def _summary(recipe, step, tokens, start, stage, stage_log, device, loss_ema, acc_ema) -> dict:
    import transformers

    return {
        "steps": step,
        "tokens": tokens,
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_stage": stage,
        "final_length": recipe.lengths[stage],
        "stages": stage_log,
        "loss_ema": loss_ema,
        "acc_ema": acc_ema,
        "device": _device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reproduce": f"python -m llmsys.testing.reference train --device {torch.device(device).type} "
        f"--steps {step} --seed {recipe.seed}",
    }


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


class _NoBar:
    def set_postfix(self, **kw): ...
    def update(self, n): ...
    def close(self): ...


def _progress_bar(enabled: bool, steps: int | None, budget_s: float | None):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    if steps is not None and budget_s is None:
        return tqdm(total=steps, desc="train-reference", unit="step")
    return tqdm(total=int(budget_s), desc="train-reference", unit="s")


def _advance(bar, steps, step, elapsed) -> None:
    if isinstance(bar, _NoBar):
        return
    if bar.total is not None and steps is not None and bar.unit == "step":
        bar.update(1)
    else:
        bar.update(max(0, int(elapsed) - bar.n))


@torch.no_grad()
def needle_table(
    model,
    lengths=(1024, 2048, 4096),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 20,
    device=None,
    seed: int = 0,
    needles: int = 4,
    progress: bool = False,
    vocab: SyntheticVocab | None = None,
) -> dict:
    """Needle accuracy per (length, depth), full attention, batched; the table of eval.json."""
    from llmsys.eval.runner import evaluate
    from llmsys.eval.tasks import NeedleTask

    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    batch = samples if dev.type == "cuda" else max(1, min(samples, 8))
    with torch.no_grad():  # fp32 (the weights' dtype): the precision users load them in
        result = evaluate(
            model, NeedleTask(needles=needles, vocab=vocab or SyntheticVocab()), lengths=lengths, depths=depths,
            samples=samples, seed=seed, batch_size=batch, decode_tokens=1, progress=progress,
        )
    model.train(was_training)
    return result
