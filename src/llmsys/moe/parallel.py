"""Expert-parallel execution of a transformers MoE model, sharded by a `Placement`.

Every rank runs the whole model on its own sequences (data-parallel attention, as in DeepSeek-style
EP serving). On entering the `with` block, each rank shards every MoE layer's experts module to the
experts of its own slots (`llmsys.models.shard_experts`: replicas included, an expert in two slots of
the same rank stored once, empty slots nothing); the weights of all other experts are released.
Inside each MoE block, the experts module's forward is then replaced (for the duration of the `with`
block) by a dispatcher:

1. each routed (token, expert) entry goes to the GPU that serves it (`Placement.dispatch_ranks`: a
   local replica if there is one, else round-robin over the replicas);
2. one all-to-all sends each token once to every rank serving at least one of its experts, with its
   k expert ids and weights (entries served elsewhere are masked);
3. the receiving rank runs the ORIGINAL experts forward (whatever transformers experts
   implementation the model uses) on its local expert rows, for the rows it received, with masked
   entries weighted 0;
4. a second all-to-all returns one weighted partial sum per row, which the home rank adds up.

So outputs equal the single-process model's (up to float summation order), the router and shared
experts are untouched, and every byte sent is counted per destination rank (`CommStats`); the
counts equal `llmsys.moe.evaluate.predict_ep_bytes` for the same routing. Works with gloo on CPU and
NCCL on GPU (tensors stay on the hidden states' device). Inference only.

Sharding is one-way: the released weights cannot come back, so after the `with` block the model
stays sharded. Re-entering with the same placement on the same rank reuses the shards; a placement
that needs an expert this rank released raises `PlacementConstraintError`. Outside the context, a
sharded experts module raises `llmsys.models.NotHeldExpertError` as soon as a token is routed to an
expert it does not hold (it never computes with missing weights): reload the model to run it
single-process. `CommStats` records the expert-parameter bytes the rank held on entry and holds after
sharding. A model loaded whole and sharded on entry peaks at the full model's memory; one loaded with
`llmsys.moe.load_expert_parallel` (only this rank's experts read from the checkpoint) arrives already
sharded, and entering reuses its rows.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llmsys.models import expert_parameter_bytes, held_experts, moe_blocks, shard_experts
from llmsys.moe.errors import PlacementConstraintError
from llmsys.moe.placement import Placement
from llmsys.registry import register_method

log = logging.getLogger(__name__)

CATEGORIES = ("counts", "dispatch", "routing", "combine")
# modules the forkserver imports once for every rank it forks (see `launch`)
_PRELOAD = ("torch", "torch.distributed", "transformers", "llmsys.moe", "llmsys.testing")


@dataclass
class CommStats:
    """Bytes this rank sent to each rank, per category (self-sends excluded: not network traffic)."""

    rank: int
    world_size: int
    sent: dict[str, np.ndarray] = field(default_factory=dict)
    calls: int = 0  # MoE-block calls dispatched
    activation_bytes: int = 0  # element sizes seen (hidden states, routing weights)
    weight_bytes: int = 0
    # memory: expert-parameter bytes of all MoE layers on this rank, on entry and once sharded, and
    # the logical experts each MoE layer holds here
    entry_expert_bytes: int = 0
    held_expert_bytes: int = 0
    held_experts: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in CATEGORIES:
            self.sent.setdefault(key, np.zeros(self.world_size))

    def add(self, key: str, per_rank: np.ndarray) -> None:
        per_rank = np.asarray(per_rank, dtype=float).copy()
        per_rank[self.rank] = 0.0
        self.sent[key] += per_rank

    @property
    def total(self) -> np.ndarray:
        return sum(self.sent.values())

    def matrix(self, group: Any = None) -> dict[str, np.ndarray]:
        """Collective: every rank's row, as [world, world] byte matrices (row = sender) per category."""
        rows: list[Any] = [None] * self.world_size
        dist.all_gather_object(rows, {k: v.tolist() for k, v in self.sent.items()}, group=group)
        out = {k: np.array([r[k] for r in rows]) for k in CATEGORIES}
        out["total"] = sum(out[k] for k in CATEGORIES)
        return out


def _all_to_all(output: torch.Tensor, tensor: torch.Tensor, out_splits, in_splits, group: Any) -> None:
    dist.all_to_all_single(
        output,
        tensor.contiguous(),
        output_split_sizes=list(out_splits),
        input_split_sizes=list(in_splits),
        group=group,
    )


class _Dispatcher:
    """The replacement forward of one experts module (layer `layer` of the placement)."""

    def __init__(self, session: _Session, layer: int, original: Callable) -> None:
        self.session, self.layer, self.original = session, layer, original
        self.tokens_seen = 0  # running token index on this rank: replica choice follows the trace order

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.session
        if torch.is_grad_enabled() and (hidden.requires_grad or top_k_weights.requires_grad):
            raise RuntimeError("ExpertParallel is inference-only: run the model under torch.no_grad()")
        G, r, group, stats = s.world_size, s.rank, s.group, s.stats
        N, H = hidden.shape
        k = top_k_index.shape[1]
        device = hidden.device
        experts = top_k_index.detach().cpu().numpy()
        token_ids = self.tokens_seen + np.arange(N)
        self.tokens_seen += N
        dest = s.placement.dispatch_ranks(self.layer, experts, r, token_ids)  # [N, k]

        # 1. which rows go where: each token once per rank serving any of its experts
        hit = np.zeros((N, G), dtype=bool)
        rows, cols = np.nonzero(dest >= 0)
        hit[rows, dest[rows, cols]] = True
        send_ids = [np.flatnonzero(hit[:, g]) for g in range(G)]
        send_counts = np.array([ids.size for ids in send_ids], dtype=np.int64)
        order = np.concatenate(send_ids) if N else np.zeros(0, dtype=np.int64)
        row_rank = np.repeat(np.arange(G), send_counts)
        mine = torch.from_numpy(dest[order] == row_rank[:, None]).to(device)  # entries served by the row's rank
        order_t = torch.from_numpy(order).to(device)
        send_idx = torch.where(mine, top_k_index[order_t], torch.full_like(top_k_index[order_t], -1))
        send_w = torch.where(mine, top_k_weights[order_t], torch.zeros_like(top_k_weights[order_t]))

        # 2. exchange counts, then rows + routing metadata
        recv_counts_t = torch.empty(G, dtype=torch.int64, device=device)
        _all_to_all(recv_counts_t, torch.from_numpy(send_counts).to(device), [1] * G, [1] * G, group)
        recv_counts = recv_counts_t.cpu().numpy()
        n_recv = int(recv_counts.sum())
        recv_hidden = hidden.new_empty(n_recv, H)
        recv_idx = top_k_index.new_empty(n_recv, k)
        recv_w = top_k_weights.new_empty(n_recv, k)
        _all_to_all(recv_hidden, hidden[order_t], recv_counts, send_counts, group)
        _all_to_all(recv_idx, send_idx, recv_counts, send_counts, group)
        _all_to_all(recv_w, send_w, recv_counts, send_counts, group)

        # 3. local experts: masked entries point at the row's first real expert with weight 0
        if n_recv:
            valid = recv_idx >= 0
            first = recv_idx.gather(1, valid.to(torch.int64).argmax(dim=1, keepdim=True))
            local_out = self.original(
                recv_hidden,
                torch.where(valid, recv_idx, first),
                torch.where(valid, recv_w, torch.zeros_like(recv_w)),
            )
        else:
            local_out = hidden.new_zeros(0, H)

        # 4. partial sums back home
        back = hidden.new_empty(int(send_counts.sum()), H)
        _all_to_all(back, local_out.to(hidden.dtype), send_counts, recv_counts, group)
        out = torch.zeros_like(hidden)
        out.index_add_(0, order_t, back)

        act, wgt, idx = hidden.element_size(), top_k_weights.element_size(), top_k_index.element_size()
        stats.add("counts", np.full(G, recv_counts_t.element_size()))
        stats.add("dispatch", send_counts * H * act)
        stats.add("routing", send_counts * k * (idx + wgt))
        stats.add("combine", recv_counts * H * act)
        stats.calls += 1
        stats.activation_bytes, stats.weight_bytes = act, wgt
        return out


def rank_experts(placement: Placement, rank: int) -> list[list[int]]:
    """Per MoE layer: the distinct logical experts of `rank`'s slots, sorted — the rows rank `rank`
    keeps under `ExpertParallel(placement)` (replicas included, a repeat on one rank once, empty
    slots nothing)."""
    if not 0 <= rank < placement.num_gpus:
        raise PlacementConstraintError(f"rank {rank} is outside the placement's {placement.num_gpus} GPUs")
    n = placement.slots_per_gpu
    slots = placement.phy2log[:, rank * n : (rank + 1) * n]
    return [sorted({int(e) for e in row if e >= 0}) for row in slots]


class _Session:
    """What `ExpertParallel(...)(model)` returns: a context manager that patches and restores."""

    def __init__(self, method: ExpertParallel, model: nn.Module) -> None:
        self.placement = method.placement
        self.group = method.group
        self.model = model
        self._saved: list[tuple[nn.Module, Any]] = []

    def __enter__(self) -> CommStats:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
                "on every rank first (gloo on CPU, nccl on GPU), or start the ranks with llmsys.moe.launch"
            )
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        p = self.placement
        if self.world_size != p.num_gpus:
            raise PlacementConstraintError(
                f"the placement is for {p.num_gpus} GPUs but the process group has {self.world_size} ranks: "
                f"solve the placement with topology={self.world_size} (or launch {p.num_gpus} ranks)"
            )
        blocks = moe_blocks(self.model)
        if len(blocks) != p.num_layers or any(b.num_experts != p.num_experts for b in blocks):
            raise PlacementConstraintError(
                f"the placement covers {p.num_layers} MoE layers x {p.num_experts} experts but the model has "
                f"{len(blocks)} x {blocks[0].num_experts if blocks else 0}: solve it from this model's trace"
            )
        # check every layer before releasing anything: a refused placement leaves the model as it was
        keeps = rank_experts(p, self.rank)
        for i, (block, keep) in enumerate(zip(blocks, keeps)):
            held = held_experts(block.experts)  # UnsupportedModelError for a layout it cannot shard
            missing = sorted(set(keep) - set(held))
            if missing:
                raise PlacementConstraintError(
                    f"MoE layer {i}: this model is already sharded (rank {self.rank} holds experts {list(held)}) "
                    f"but the placement puts experts {missing} here too; released weights cannot come back: "
                    "reload the model, or re-enter with the placement it was sharded for"
                )
        self.stats = CommStats(self.rank, self.world_size)
        self.stats.entry_expert_bytes = sum(expert_parameter_bytes(b.experts) for b in blocks)
        for block, keep in zip(blocks, keeps):
            shard_experts(block.experts, keep)
        self.stats.held_expert_bytes = sum(expert_parameter_bytes(b.experts) for b in blocks)
        self.stats.held_experts = [tuple(keep) for keep in keeps]
        for i, block in enumerate(blocks):
            experts = block.experts
            self._saved.append((experts, experts.__dict__.get("forward")))
            experts.forward = _Dispatcher(self, i, experts.forward)
        return self.stats

    def __exit__(self, *exc: Any) -> None:
        # the dispatcher goes; the shards stay (their forward refuses experts they do not hold)
        for module, previous in reversed(self._saved):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._saved = []


@register_method("expert_parallel", plugin="moe")
@dataclass
class ExpertParallel:
    """Run a MoE model's experts sharded over torch.distributed ranks by `placement` (rank r = GPU r).

        with ExpertParallel(placement)(model) as stats:   # on every rank, same number of calls
            out = model(my_input_ids)
        stats.matrix()   # bytes sent per rank pair, per category

    Every rank must make the same number of model calls (each MoE layer is a collective); batches
    may differ in size. `group`: a process group (default: the world).

    Entering shards the model IN PLACE: rank r keeps only the expert weights of its slots
    (`stats.held_expert_bytes`, vs `stats.entry_expert_bytes`) and the model stays sharded after the
    block; outside it, a token routed to a released expert raises `NotHeldExpertError`. Reload the
    model to run it single-process or under a placement that needs other experts on this rank.
    """

    placement: Placement
    group: Any = None

    def __call__(self, model: nn.Module) -> _Session:
        return _Session(self, model)


# ---------------------------------------------------------------------------------------------
# running several ranks on one machine
# ---------------------------------------------------------------------------------------------


def _launch_worker(rank: int, world_size: int, backend: str, tmp: str, fn: Callable, args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)  # the ranks share this machine's cores
    dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(tmp, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads_per_rank: int = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined by torch.distributed
    (file:// rendezvous in a temporary directory: no port to pick); returns each rank's result.

    `fn` must be importable by name (a module-level function). Call from under
    `if __name__ == "__main__":` in scripts. start_method: "forkserver" where available (default: a
    clean server process imports torch/transformers/llmsys once and forks the ranks from it, so
    ranks start in a fraction of a second instead of re-importing everything), else "spawn".
    """
    if start_method is None:
        start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(_PRELOAD))
    with tempfile.TemporaryDirectory(prefix="llmsys-ep-") as tmp:
        torch.multiprocessing.start_processes(
            _launch_worker,
            args=(world_size, backend, tmp, fn, args, threads_per_rank),
            nprocs=world_size,
            join=True,
            start_method=start_method,
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"result{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))  # written by our own workers just above
        return results


# ---------------------------------------------------------------------------------------------
# the end-to-end check: EP output == single-process output, measured bytes == predicted bytes,
# each rank holds exactly its slots' experts
# ---------------------------------------------------------------------------------------------


@dataclass
class EPCase:
    """One tiny-model check: `family` (llmsys.testing.tiny_model), a placement, and the full batch
    `input_ids [B, T]` (B divisible by the world size; rank r gets sequences r*B/G .. (r+1)*B/G).
    With `checkpoint`, the model is read from that directory instead (eager attention)."""

    family: str
    placement: Placement
    input_ids: torch.Tensor
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    # a local safetensors checkpoint (e.g. the tiny model's save_pretrained): each rank then loads only
    # its experts with `load_expert_parallel`, and the reference is `from_pretrained` of the same path
    checkpoint: str | None = None


@dataclass
class EPCheck:
    family: str
    world_size: int
    max_abs_diff: float  # EP logits vs single-process logits, max over ranks
    measured: dict[str, np.ndarray]  # [G, G] bytes per category, row = sender
    predicted: dict[str, np.ndarray]
    # per rank: expert-parameter bytes held on entry (the full model), after sharding, and expected
    # after sharding (each held expert's share of its layer's full bytes)
    entry_expert_bytes: list[int] = field(default_factory=list)
    held_expert_bytes: list[int] = field(default_factory=list)
    expected_expert_bytes: list[int] = field(default_factory=list)
    held_experts: list[list[tuple[int, ...]]] = field(default_factory=list)  # [rank][moe layer]
    reentry_diff: float = 0.0  # a second `with` on the sharded model vs the first: reuses the shards
    # per rank: the error raised when the sharded model runs outside the context (None: it ran)
    outside_errors: list[str | None] = field(default_factory=list)
    # per rank, for a case with a checkpoint: routed-expert bytes `load_expert_parallel` read from disk
    expert_bytes_read: list[int] = field(default_factory=list)

    @property
    def bytes_match(self) -> bool:
        return all(np.array_equal(self.measured[k], self.predicted[k]) for k in (*CATEGORIES, "total"))

    @property
    def memory_match(self) -> bool:
        return self.held_expert_bytes == self.expected_expert_bytes

    def ok(self, atol: float = 1e-4) -> bool:
        return self.bytes_match and self.memory_match and self.max_abs_diff <= atol and self.reentry_diff <= atol


def _check_worker(rank: int, world_size: int, cases: list[EPCase], device_type: str) -> list[dict[str, Any]]:
    from llmsys.models import NotHeldExpertError, forward
    from llmsys.moe.evaluate import default_homes, predict_ep_bytes
    from llmsys.moe.trace import RoutingRecorder
    from llmsys.testing import tiny_model

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank, as NCCL requires
    out = []
    for case in cases:
        read = None
        if case.checkpoint is None:
            model = tiny_model(case.family, seed=case.seed, **case.config).to(device)
            reference_model = model
        else:  # the single-process reference loads whole; the EP model only this rank's experts
            from transformers import AutoModelForCausalLM

            from llmsys.moe.load import load_expert_parallel

            reference_model = AutoModelForCausalLM.from_pretrained(case.checkpoint, attn_implementation="eager")
            reference_model.to(device)
            model, read = load_expert_parallel(
                case.checkpoint,
                case.placement,
                rank,
                device=device,
                attn_implementation="eager",
                output_loading_info=True,
            )
        ids = case.input_ids.to(device)
        B = ids.shape[0]
        if B % world_size:
            raise ValueError(f"batch of {B} sequences cannot be split over {world_size} ranks")
        lo, hi = rank * B // world_size, (rank + 1) * B // world_size
        n = case.placement.slots_per_gpu
        expected = 0
        for layer, block in enumerate(moe_blocks(reference_model)):
            mine = {int(e) for e in case.placement.phy2log[layer, rank * n : (rank + 1) * n] if e >= 0}
            expected += len(mine) * expert_parameter_bytes(block.experts) // block.num_experts
        with torch.no_grad():
            with RoutingRecorder(reference_model) as rec:
                reference = forward(reference_model, ids).logits  # the single-process model on the full batch
            trace = rec.trace()
            if reference_model is not model:
                del reference_model
            with ExpertParallel(case.placement)(model) as stats:
                logits = forward(model, ids[lo:hi]).logits
            with ExpertParallel(case.placement)(model):  # the same placement again: shards reused
                again = forward(model, ids[lo:hi]).logits
            try:  # outside the context the released experts are missing, never silently skipped
                forward(model, ids)
                outside = None
            except NotHeldExpertError as err:
                outside = str(err)
        predicted = predict_ep_bytes(
            trace,
            case.placement,
            model.config.hidden_size,
            homes=default_homes(trace.num_tokens, world_size),
            activation_bytes=stats.activation_bytes,
            weight_bytes=stats.weight_bytes,
        )
        out.append(
            {
                "diff": float((logits - reference[lo:hi]).abs().max()),
                "measured": stats.matrix(),
                "predicted": predicted,
                "entry_bytes": stats.entry_expert_bytes,
                "held_bytes": stats.held_expert_bytes,
                "expected_bytes": expected,
                "held": stats.held_experts,
                "reentry_diff": float((again - logits).abs().max()),
                "outside": outside,
                "expert_bytes_read": None if read is None else read.expert_bytes_read,
            }
        )
    return out


def check_expert_parallel(
    cases: list[EPCase], world_size: int, backend: str = "gloo", device: str = "cpu"
) -> list[EPCheck]:
    """Run every case on `world_size` processes and compare with the single-process model (logits,
    bytes sent, expert bytes held per rank). Default: CPU processes joined by gloo; `backend="nccl",
    device="cuda"` puts rank r on GPU r (needs `world_size` GPUs)."""
    if device == "cuda" and world_size > torch.cuda.device_count():
        raise RuntimeError(
            f"{world_size} ranks need {world_size} GPUs (one per rank), this machine has "
            f"{torch.cuda.device_count()}: use fewer ranks, or device='cpu' with backend='gloo'"
        )
    results = launch(_check_worker, world_size, cases, device, backend=backend)
    checks = []
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        checks.append(
            EPCheck(
                family=case.family,
                world_size=world_size,
                max_abs_diff=max(r["diff"] for r in per_rank),
                measured=per_rank[0]["measured"],
                predicted=per_rank[0]["predicted"],
                entry_expert_bytes=[r["entry_bytes"] for r in per_rank],
                held_expert_bytes=[r["held_bytes"] for r in per_rank],
                expected_expert_bytes=[r["expected_bytes"] for r in per_rank],
                held_experts=[r["held"] for r in per_rank],
                reentry_diff=max(r["reentry_diff"] for r in per_rank),
                outside_errors=[r["outside"] for r in per_rank],
                expert_bytes_read=[r["expert_bytes_read"] for r in per_rank if r["expert_bytes_read"] is not None],
            )
        )
    return checks
