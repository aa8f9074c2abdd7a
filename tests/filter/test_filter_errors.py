"""GemFilter's errors: each bad input raises a specific exception that names the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from llmsys.filter import GemFilter, select_tokens
from llmsys.models import UnsupportedModelError, forward, generate
from llmsys.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(topk=0), "topk must be an int >= 1"),
        (dict(topk=-3), "topk must be an int >= 1"),
        (dict(topk=2.5), "topk must be an int >= 1"),
        (dict(pool_kernel=0), "pool_kernel"),
        (dict(keep_first=-1), "keep_first"),
        (dict(topk=4, keep_first=3, keep_last=2), "exceeds topk"),
        (dict(positions="absolute"), "positions must be"),
        (dict(layer=-1), "layer must be an int >= 0 or 'auto'"),
        (dict(layer="first"), "layer must be an int >= 0 or 'auto'"),
        (dict(layer=True), "layer must be an int >= 0 or 'auto'"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemFilter(**{"layer": 1, "topk": 8, **kwargs})


def test_layer_out_of_range(model):
    with pytest.raises(ValueError, match=r"layer 3 is out of range: this model has 3 decoder layers.*\[0, 2\]"):
        GemFilter(layer=3, topk=8)(model)
    with pytest.raises(ValueError, match="out of range"):
        select_tokens(model, torch.ones(1, 10, dtype=torch.long), layer=7, topk=4)


def test_unsupported_families():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    with pytest.raises(UnsupportedModelError, match="Supported dense families"):
        GemFilter(layer=0, topk=8)(gpt2)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        select_tokens(gpt2, torch.ones(1, 10, dtype=torch.long), layer=0, topk=4)
    moe = tiny_model("mixtral")
    with pytest.raises(UnsupportedModelError, match="dense"):
        GemFilter(layer=0, topk=8)(moe)


def test_right_padding_is_refused(model):
    ids = torch.randint(3, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with pytest.raises(ValueError, match="left-padded.*padding_side = 'left'"):
        select_tokens(model, ids, layer=1, topk=4, attention_mask=mask)
    with GemFilter(layer=1, topk=4)(model), pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        select_tokens(model, torch.ones(10, dtype=torch.long), layer=1, topk=4)
    with pytest.raises(ValueError, match="must match input_ids"):
        select_tokens(model, torch.ones(1, 10, dtype=torch.long), layer=1, topk=4, attention_mask=torch.ones(1, 9))
    with GemFilter(layer=1, topk=4)(model), pytest.raises(ValueError, match="not inputs_embeds"):
        model.generate(inputs_embeds=torch.zeros(1, 5, 64), max_new_tokens=2)


def test_a_cache_that_already_holds_tokens_is_refused(model):
    ids = torch.randint(3, 500, (1, 12))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward(model, ids[:, :5], cache=cache)
    with GemFilter(layer=1, topk=4)(model), pytest.raises(ValueError, match="pass an empty cache"):
        generate(model, ids, cache=cache, max_new_tokens=2)
