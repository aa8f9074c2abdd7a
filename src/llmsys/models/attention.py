"""Custom attention functions: registering one with transformers and running a model through it.

Used by llmsys.serve (paged attention straight from the page pool):

* `register_attention_function(name, fn)`: add `fn` to transformers' `AttentionInterface`
  (`ALL_ATTENTION_FUNCTIONS`). The attention modules of every supported family look their
  attention function up by `config._attn_implementation` at call time; a name the mask interface
  does not know makes transformers build no attention mask at all (the function masks itself).
* `use_attention(model, name)`: a context manager that sets the model's `_attn_implementation`
  to `name` for the duration of a forward and restores it afterwards.
* `sliding_window_of(model)`: the active sliding window of a config (None when there is none).

The function receives `(module, query [B,Hq,T,D], key [B,Hkv,T,D], value, attention_mask, *,
scaling, dropout, **kwargs)` with post-RoPE queries and keys (and Qwen3's q/k norm applied) and
returns `(output [B,T,Hq,D], weights or None)`, in transformers 5.17 through 5.x alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmsys.models.families import family_of


def register_attention_function(name: str, fn: Callable) -> None:
    """Register `fn` under `name` in transformers' attention interface (idempotent)."""
    ALL_ATTENTION_FUNCTIONS.register(name, fn)


@contextlib.contextmanager
def use_attention(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model's attention modules through the attention function registered as `name`."""
    family_of(model)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def sliding_window_of(model: nn.Module) -> int | None:
    """The sliding window the model's attention applies, or None (Qwen2/Qwen3 gate it by a flag)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
