"""GemFilter's first pass: run the model up to the filter layer and choose the prompt tokens to keep.

The pass runs the model on the whole prompt (no cache: no KV is kept) and, in a forward pre-hook on
the filter layer's attention module, recomputes the post-RoPE queries and keys of that layer
(`llmsys.models.query_key_states`), scores every token with the last query (raw ``q·k`` summed over
heads, average-pooled: `llmsys.kernels.last_query_scores`) and raises a private exception, so no
later layer - and not even the filter layer's attention output - is computed.

Left padding: the model runs with the padding mask and the positions `generate` would use
(``attention_mask.cumsum(-1) - 1``), the keys of padding tokens are zeroed before scoring, so a
padding token scores exactly 0, like the zero padding of the pooling in an unpadded row: every row's
scores equal those of the same prompt alone. Padding is then never selected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmsys.kernels import last_query_scores
from llmsys.kernels.last_query import Pooling
from llmsys.models import attention_modules, family_of, forward, query_key_states, read_attention_call

logger = logging.getLogger(__name__)

__all__ = [
    "Selection",
    "check_layer",
    "check_prompt",
    "filter_scores",
    "layer_scores",
    "select_from_scores",
    "selected_text",
]


class _StopFirstPass(Exception):
    """Raised by the filter layer's hook once the scores exist: the rest of the forward never runs."""


def check_layer(model: nn.Module, layer: int) -> int:
    """`layer` as a valid 0-based decoder-layer index of `model` (a supported dense model), else raise."""
    family_of(model, moe=False)
    count = len(attention_modules(model))
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"GemFilter: layer must be an int in [0, {count - 1}] or 'auto', got {layer!r}")
    if not 0 <= layer < count:
        raise ValueError(
            f"GemFilter: layer {layer} is out of range: this model has {count} decoder layers, "
            f"so the filter layer must be in [0, {count - 1}] (or 'auto' to calibrate it)"
        )
    return layer


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The 0/1 long padding mask ``[B, n]`` of a prompt; raise unless every row is left-padded or unpadded."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"GemFilter: input_ids must be a [batch, length] tensor with length >= 1, got {shape}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"GemFilter: attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if not bool((mask[:, -1] == 1).all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "GemFilter: every row must be left-padded (0s then 1s, last token real): the last token's query "
            "selects the tokens. With a tokenizer, set tokenizer.padding_side = 'left'."
        )
    return mask


def layer_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Sequence[int],
    *,
    attention_mask: torch.Tensor | None = None,
    pool_kernel: int = 5,
    stop: bool = True,
    pooling: Pooling = "avg",
) -> dict[int, torch.Tensor]:
    """GemFilter's token scores ``[B, n]`` (float32) at each of `layers`, from one forward.

    With `stop` the forward ends at the last of `layers` (before its attention output is computed);
    nothing is cached either way. Padding tokens score -inf.
    """
    mask = check_prompt(input_ids, attention_mask)
    padded = not bool(mask.all())
    modules = attention_modules(model)
    wanted = sorted(set(layers))
    last = wanted[-1]
    scores: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            call = read_attention_call(args, kwargs)
            queries, keys = query_key_states(module, call.hidden_states, call.position_embeddings)
            if padded:  # zero keys score 0, exactly what the pooling pads an unpadded row with
                keys = keys * mask[:, None, :, None].to(keys.dtype)
            scores[index] = last_query_scores(
                queries[:, :, -1:], keys, softmax=False, pool_kernel=pool_kernel, reduce_heads="sum", pool=pooling
            )
            if stop and index == last:
                raise _StopFirstPass

        return hook

    handles = [modules[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in wanted]
    kwargs: dict[str, Any] = {"use_cache": False}
    if padded:  # the positions generate() gives left-padded rows: each row scores as if alone
        kwargs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    try:
        with torch.no_grad():
            forward(model, input_ids, **kwargs)
    except _StopFirstPass:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if i not in scores]
    if missing:
        raise RuntimeError(f"GemFilter: the attention modules of layers {missing} were not called")
    return {i: s.masked_fill(mask == 0, float("-inf")) for i, s in scores.items()}


def filter_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layer: int,
    attention_mask: torch.Tensor | None = None,
    pool_kernel: int = 5,
    pooling: Pooling = "avg",
) -> torch.Tensor:
    """The first pass: scores ``[B, n]`` of every prompt token at the filter `layer` (padding: -inf)."""
    layer = check_layer(model, layer)
    return layer_scores(
        model, input_ids, [layer], attention_mask=attention_mask, pool_kernel=pool_kernel, pooling=pooling
    )[layer]


@dataclass
class Selection:
    """The tokens GemFilter keeps, per row.

    Attributes:
        indices: ``[B, K]`` sorted positions in the prompt (columns of `input_ids`), K = the most any
            row keeps; a row that keeps fewer (a left-padded row shorter than topk) is left-filled with
            -1, so the packed prompt is again left-padded.
        lengths: ``[B]`` real (non-padding) tokens per row.
        prompt_length: n, the width of the prompt (padding included).
        scores: ``[B, n]`` float32 first-pass scores (-inf on padding; forced tokens not marked), or
            None when no first pass ran (the prompt was not longer than topk).
    """

    indices: torch.Tensor
    lengths: torch.Tensor
    prompt_length: int
    scores: torch.Tensor | None = None

    @property
    def kept(self) -> torch.Tensor:
        """``[B]`` tokens kept per row."""
        return (self.indices >= 0).sum(dim=-1)

    def pack(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)`` ``[B, K]`` of the kept tokens, left-padded with the rows' own padding."""
        # a short row's -1 slots read column 0, which is one of its padding tokens
        ids = input_ids.gather(1, self.indices.clamp(min=0))
        return ids, (self.indices >= 0).long()

    def original_positions(self) -> torch.Tensor:
        """``[B, K]`` rotary positions the kept tokens had in the full prompt (-1 on padding slots)."""
        first_real = self.prompt_length - self.lengths  # left padding: the first real column of each row
        pos = self.indices - first_real[:, None]
        return pos.masked_fill(self.indices < 0, -1)


def select_from_scores(
    scores: torch.Tensor,
    mask: torch.Tensor,
    topk: int,
    keep_first: int = 0,
    keep_last: int = 0,
) -> Selection:
    """Top-`topk` tokens per row (sorted), forcing the first `keep_first` and last `keep_last` real ones."""
    n = scores.shape[1]
    lengths = mask.sum(dim=-1)
    ranked = scores.float().clone()
    if keep_first or keep_last:
        column = torch.arange(n, device=scores.device)
        offset = column[None, :] - (n - lengths)[:, None]  # index among the row's real tokens
        forced = ((offset >= 0) & (offset < keep_first)) | (column[None, :] >= n - keep_last)
        ranked = ranked.masked_fill(forced & (mask == 1), float("inf"))
    ranked = ranked.masked_fill(mask == 0, float("-inf"))  # padding last, whatever happened above
    k = min(topk, int(lengths.max()))
    # A row with fewer than k real tokens takes all of them plus -inf padding columns, which sort first.
    indices = ranked.topk(k, dim=-1).indices.sort(dim=-1).values
    indices = indices.masked_fill(mask.gather(1, indices) == 0, -1)
    return Selection(indices=indices, lengths=lengths, prompt_length=n, scores=scores)


def selected_text(
    tokenizer: Any,
    input_ids: torch.Tensor,
    indices: torch.Tensor,
    *,
    gap: str = " [...] ",
) -> list[str]:
    """The kept tokens of each row as text: contiguous runs decoded, joined by `gap` where tokens were dropped.

    `indices` is ``[B, K]`` or ``[K]`` (as `select_tokens` returns; -1 entries are ignored).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if indices.dim() == 1:
        indices = indices[None].expand(input_ids.shape[0], -1)
    texts = []
    for row_ids, row_idx in zip(input_ids.tolist(), indices.tolist()):
        kept = [i for i in row_idx if i >= 0]
        runs: list[list[int]] = []
        for i in kept:
            if runs and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        texts.append(gap.join(tokenizer.decode([row_ids[i] for i in run]) for run in runs))
    return texts
