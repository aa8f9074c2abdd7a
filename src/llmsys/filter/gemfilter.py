"""GemFilter ("Discovering the Gems in Early Layers", 2024) as a kvpress-style context manager.

    from llmsys.filter import GemFilter

    with GemFilter(layer=13, topk=1024)(model) as gem:
        out = model.generate(input_ids, max_new_tokens=64)          # both passes, transparently
    print(gem.selection.indices)                                      # what the first pass kept

Inside the ``with`` block `model.generate` (and so `llmsys.models.generate`) is replaced by a
wrapper that runs GemFilter's two passes:

1. first pass (`llmsys.filter.selection`): the model up to the filter layer only, no KV kept; the
   last prompt token's query at that layer scores every token; the top-k (sorted) are kept;
2. second pass: the ORIGINAL `generate` on the kept ids only, with whatever the caller passed -
   a `DynamicCache`, any `llmsys` cache (``cache=PagedCache(...)``), sampling, beams, ...

The returned sequences are the caller's full prompt followed by the generated tokens, so the
usual ``out[:, input_ids.shape[1]:]`` still gives the new tokens. A prompt no longer than `topk`
(every row) skips the first pass and generates exactly as the plain model. A forward pre-hook does
the same for a plain prefill forward (decoding loops, `llmsys.eval.evaluate`), see `GemFilterContext`.

Positions: by default (``positions="contiguous"``, as the paper) the kept tokens get the new
positions 0..k-1. ``positions="original"`` keeps the positions they had in the full prompt and
continues decoding at the full prompt's length, through a pre-hook on the decoder stack that maps
the positions `generate` computes for the short prompt to the original ones.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from llmsys.filter.calibrate import calibrate_layer
from llmsys.filter.selection import (
    Selection,
    check_layer,
    check_prompt,
    filter_scores,
    select_from_scores,
    selected_text,
)
from llmsys.kernels.last_query import Pooling
from llmsys.models import CACHE_KWARG, base_model, cache_kwargs, family_of
from llmsys.registry import register_method

logger = logging.getLogger(__name__)

__all__ = ["GemFilter", "GemFilterContext", "select_tokens"]

Positions = Literal["contiguous", "original"]


@register_method("gemfilter", plugin="filter")
@dataclass
class GemFilter:
    """GemFilter's hyper-parameters; ``GemFilter(...)(model)`` is the context manager that applies it.

    Args:
        layer: 0-based decoder layer whose attention selects the tokens, or ``"auto"`` to calibrate it
            per model on synthetic needle prompts (`llmsys.filter.calibrate_layer`, cached per model).
        topk: prompt tokens kept per row (``min(topk, prompt length)``); the paper's default is 1024.
        pool_kernel: width of the pool that smooths the scores (the paper: 5).
        pooling: ``"avg"`` (the paper) or ``"max"`` (not in the paper: a one-token spike keeps itself
            and its neighbours; see docs/filter.md, "Why GemFilter loses accuracy on the reference model").
        keep_first: always keep the first real tokens of each row (e.g. BOS; part of `topk`).
        keep_last: always keep the last tokens (e.g. the question; part of `topk`). The paper forces
            neither (both 0).
        positions: ``"contiguous"`` (the paper: kept tokens get positions 0..k-1) or ``"original"``
            (an ablation: they keep their positions in the full prompt).
    """

    layer: int | Literal["auto"] = "auto"
    topk: int = 1024
    pool_kernel: int = 5
    pooling: Pooling = "avg"
    keep_first: int = 0
    keep_last: int = 0
    positions: Positions = "contiguous"

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.topk) or self.topk < 1:
            raise ValueError(f"GemFilter: topk must be an int >= 1, got {self.topk!r}")
        if not is_int(self.pool_kernel) or self.pool_kernel < 1:
            raise ValueError(f"GemFilter: pool_kernel must be an int >= 1, got {self.pool_kernel!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"GemFilter: pooling must be 'avg' (the paper) or 'max', got {self.pooling!r}")
        for name in ("keep_first", "keep_last"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"GemFilter: {name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.keep_first + self.keep_last > self.topk:
            raise ValueError(
                f"GemFilter: keep_first + keep_last = {self.keep_first + self.keep_last} exceeds topk = {self.topk}"
            )
        if self.positions not in ("contiguous", "original"):
            raise ValueError(f"GemFilter: positions must be 'contiguous' or 'original', got {self.positions!r}")
        if self.layer != "auto" and (not is_int(self.layer) or self.layer < 0):
            raise ValueError(f"GemFilter: layer must be an int >= 0 or 'auto', got {self.layer!r}")

    def __call__(self, model: nn.Module) -> GemFilterContext:
        """A context manager under which ``model.generate`` (and a long prefill forward) filters the prompt."""
        return GemFilterContext(self, model, self.resolve_layer(model))

    def resolve_layer(self, model: nn.Module) -> int:
        """The filter layer for `model`: checked against its depth, or calibrated for ``"auto"``."""
        family_of(model, moe=False)
        if self.layer == "auto":
            return calibrate_layer(model, pool_kernel=self.pool_kernel).layer
        return check_layer(model, self.layer)

    def select(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Selection:
        """Run the first pass only: which tokens of each row GemFilter keeps (`Selection`)."""
        return self._select(model, self.resolve_layer(model), input_ids, attention_mask)

    def _select(
        self, model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> Selection:
        mask = check_prompt(input_ids, attention_mask)
        scores = filter_scores(
            model, input_ids, layer=layer, attention_mask=attention_mask, pool_kernel=self.pool_kernel,
            pooling=self.pooling,
        )
        return select_from_scores(scores, mask, self.topk, self.keep_first, self.keep_last)

    def selected_text(
        self,
        model: nn.Module,
        tokenizer: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        gap: str = " [...] ",
    ) -> list[str]:
        """The text GemFilter keeps of each row (dropped stretches shown as `gap`)."""
        selection = self.select(model, input_ids, attention_mask)
        return selected_text(tokenizer, input_ids, selection.indices, gap=gap)


def select_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    layer: int | Literal["auto"],
    topk: int,
    attention_mask: torch.Tensor | None = None,
    pool_kernel: int = 5,
    keep_first: int = 0,
    keep_last: int = 0,
) -> torch.Tensor:
    """GemFilter's selection: ``[B, K]`` sorted prompt positions kept per row (-1 left-fills short rows)."""
    method = GemFilter(layer=layer, topk=topk, pool_kernel=pool_kernel, keep_first=keep_first, keep_last=keep_last)
    return method.select(model, input_ids, attention_mask).indices


class GemFilterContext:
    """What ``GemFilter(...)(model)`` returns: inside ``with``, the model filters long prompts.

    Two entry points are covered:

    - ``model.generate`` (and `llmsys.models.generate`): both passes, see the module docstring;
    - a plain prefill forward (``model(input_ids, ...)`` with no cache or an empty one and a prompt
      longer than `topk`, as in a hand-written decoding loop or `llmsys.eval.evaluate`): a forward
      pre-hook runs the first pass and swaps in the kept ids, so the forward returns the logits of
      the kept tokens only and its cache holds them; later forwards with that cache continue from it
      (with ``positions="original"`` their positions are moved to the full prompt's).

    Attributes:
        method: the `GemFilter` hyper-parameters.
        layer: the resolved filter layer.
        selection: the `Selection` of the last filtered prompt (None before the first one).
    """

    def __init__(self, method: GemFilter, model: nn.Module, layer: int):
        self.method = method
        self.model = model
        self.layer = layer
        self.selection: Selection | None = None
        self._saved: tuple[bool, Any] | None = None
        self._hook: Any = None
        self._busy = False  # inside our own generate / first pass: the forward hook stands aside
        self._remaps: weakref.WeakKeyDictionary[Any, _OriginalPositions] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"GemFilterContext({self.method!r}, layer={self.layer}, model={type(self.model).__name__})"

    def __enter__(self) -> GemFilterContext:
        model = self.model
        if self._saved is not None:
            raise RuntimeError("this GemFilter context is already active")
        if getattr(model.generate, "_llmsys_gemfilter", False):
            raise RuntimeError("a GemFilter is already applied to this model: leave its `with` block first")
        inner = model.generate  # bound method (or whatever wrapper the caller installed before us)
        self._saved = ("generate" in model.__dict__, model.__dict__.get("generate"))

        @functools.wraps(inner)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self.generate(inner, *args, **kwargs)

        generate._llmsys_gemfilter = True  # type: ignore[attr-defined]
        model.generate = generate
        self._hook = model.register_forward_pre_hook(self._filter_forward, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved is None:
            return
        had, previous = self._saved
        if had:
            self.model.generate = previous
        else:
            self.model.__dict__.pop("generate", None)
        self._hook.remove()
        self._saved, self._hook = None, None
        self._remaps = weakref.WeakKeyDictionary()

    def _first_pass(self, input_ids: torch.Tensor, mask: torch.Tensor) -> Selection:
        busy, self._busy = self._busy, True  # the first pass's own forward must not be filtered
        try:
            selection = self.method._select(self.model, self.layer, input_ids, mask)
        finally:
            self._busy = busy
        self.selection = selection
        logger.debug("GemFilter: layer %d kept %s of %s tokens", self.layer, selection.kept.tolist(),
                     selection.lengths.tolist())  # fmt: skip
        return selection

    # ------------------------------------------------------------------------------------------
    # generate

    def generate(self, inner: Callable[..., Any], inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """Both passes around `inner` (the model's own generate); see the module docstring."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("GemFilter selects input tokens: call generate with input_ids, not inputs_embeds")
        attention_mask = kwargs.pop("attention_mask", None)
        mask = check_prompt(input_ids, attention_mask)
        _check_empty(_cache_of(kwargs))
        if kwargs.get("max_length") is not None and kwargs.get("max_new_tokens") is None:
            # max_length counts the prompt, and the prompt the model sees gets shorter
            kwargs["max_new_tokens"] = kwargs.pop("max_length") - input_ids.shape[1]
        lengths = mask.sum(dim=-1)
        self._busy = True
        try:
            if self.method.topk >= int(lengths.max()):
                # nothing to drop: the plain model, bit for bit (and no first pass to pay for)
                indices = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
                self.selection = Selection(indices.masked_fill(mask == 0, -1), lengths, input_ids.shape[1])
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask
                return inner(input_ids, *args, **kwargs)
            selection = self._first_pass(input_ids, mask)
            ids, kwargs["attention_mask"] = selection.pack(input_ids)
            handle = None
            if self.method.positions == "original":
                remap = _OriginalPositions(selection)
                handle = base_model(self.model).register_forward_pre_hook(remap, with_kwargs=True)
            try:
                out = inner(ids, *args, **kwargs)
            finally:
                if handle is not None:
                    handle.remove()
        finally:
            self._busy = False
        return _with_full_prompt(out, input_ids, ids.shape[1])

    # ------------------------------------------------------------------------------------------
    # plain forwards

    def _filter_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        """Forward pre-hook on the model: filter a long prefill, move positions of its continuations."""
        if self._busy or kwargs.get("labels") is not None:
            return None
        if args:  # input_ids may come positionally; anything after it must be a keyword
            if len(args) > 1:
                raise ValueError("under GemFilter, call the model with keyword arguments after input_ids")
            kwargs = {**kwargs, "input_ids": args[0]}
            args = ()
        input_ids = kwargs.get("input_ids")
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:  # a continuation
            remap = self._remaps.get(cache)
            if remap is None:
                return None
            kwargs["position_ids"] = remap.positions(kwargs.get("position_ids"), cache, _tokens(kwargs).shape[1])
            return args, kwargs
        if input_ids is None:
            return None  # embeddings only: nothing GemFilter can select from
        mask = check_prompt(input_ids, kwargs.get("attention_mask"))
        if self.method.topk >= int(mask.sum(dim=-1).max()):
            return None
        selection = self._first_pass(input_ids, mask)
        ids, short_mask = selection.pack(input_ids)
        kwargs["input_ids"] = ids
        padded = not bool(short_mask.all())
        kwargs["attention_mask"] = short_mask if padded or kwargs.get("attention_mask") is not None else None
        if self.method.positions == "original":
            remap = _OriginalPositions(selection)
            kwargs["position_ids"] = remap.table_positions()
            if cache is None and kwargs.get("use_cache", True) is not False:
                cache = DynamicCache(config=self.model.config)  # ours, so its continuations can be found
                kwargs.update(cache_kwargs(cache))
            if cache is not None:
                self._remaps[cache] = remap
        elif kwargs.get("position_ids") is not None or padded:
            kwargs["position_ids"] = (short_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
        return args, kwargs


def _cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get(CACHE_KWARG, kwargs.get("past_key_values", kwargs.get("cache")))


def _tokens(kwargs: dict[str, Any]) -> torch.Tensor:
    tokens = kwargs.get("input_ids")
    return kwargs["inputs_embeds"] if tokens is None else tokens


def _check_empty(cache: Any) -> None:
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            f"GemFilter filters a whole prompt: pass an empty cache (this one already holds {cache.get_seq_length()} "
            "tokens)"
        )


def _with_full_prompt(out: Any, input_ids: torch.Tensor, short_length: int) -> Any:
    """Replace the short prompt at the head of generate's sequences by the caller's full prompt."""

    def swap(seq: torch.Tensor) -> torch.Tensor:
        repeats = seq.shape[0] // input_ids.shape[0]  # num_return_sequences / beams expand the rows
        prompt = input_ids.repeat_interleave(repeats, dim=0) if repeats > 1 else input_ids
        return torch.cat([prompt.to(seq.device), seq[:, short_length:]], dim=1)

    if isinstance(out, torch.Tensor):
        return swap(out)
    if getattr(out, "sequences", None) is not None:  # return_dict_in_generate=True
        out.sequences = swap(out.sequences)
    return out


class _OriginalPositions:
    """Decoder-stack pre-hook: positions of the short prompt -> positions in the full prompt.

    `generate` numbers the kept tokens of row b 0..k_b-1 and the new tokens k_b, k_b+1, ...; they
    become the kept tokens' original positions and n_b, n_b+1, ... (n_b = the row's prompt length).
    """

    def __init__(self, selection: Selection):
        original = selection.original_positions()  # [B, K], -1 on the left padding slots
        self.original = original
        width = original.shape[1]
        kept = selection.kept
        # row b's kept tokens are its last k_b slots: move them to the front, indexed by short position
        shift = (torch.arange(width, device=original.device)[None, :] + (width - kept)[:, None]).clamp(max=width - 1)
        self.table = original.gather(1, shift)
        self.kept = kept
        self.lengths = selection.lengths

    def map(self, pos: torch.Tensor) -> torch.Tensor:
        table, kept, lengths = self.table.to(pos.device), self.kept.to(pos.device), self.lengths.to(pos.device)
        if pos.shape[0] != table.shape[0]:
            if pos.shape[0] == 1:
                pos = pos.expand(table.shape[0], -1)
            else:  # beams / num_return_sequences: rows were repeated
                repeats = pos.shape[0] // table.shape[0]
                table, kept, lengths = (t.repeat_interleave(repeats, dim=0) for t in (table, kept, lengths))
        inside = (pos >= 0) & (pos < kept[:, None])
        from_table = table.gather(1, pos.clamp(0, table.shape[1] - 1))
        return torch.where(inside, from_table, lengths[:, None] + pos - kept[:, None])

    def table_positions(self) -> torch.Tensor:
        """Positions of the packed short prompt ``[B, K]`` (its left padding at 0)."""
        return self.original.clamp(min=0)

    def positions(self, pos: torch.Tensor | None, cache: Any, new_tokens: int) -> torch.Tensor:
        """Full-prompt positions for `pos` (short-prompt positions; None: what generate would number)."""
        if pos is None:  # row b's short prompt holds k_b real tokens after its left padding
            past = cache.get_seq_length() if cache is not None else 0
            width = self.table.shape[1]
            pos = past + torch.arange(new_tokens, device=self.table.device)[None] - (width - self.kept)[:, None]
        return self.map(pos)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs["position_ids"] = self.positions(kwargs.get("position_ids"), _cache_of(kwargs), _tokens(kwargs).shape[1])
        return args, kwargs
