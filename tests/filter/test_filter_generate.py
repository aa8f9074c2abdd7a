"""GemFilter under generate: exactness when nothing is dropped, the second pass, caches, positions."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from llmsys.cache import PagedCache
from llmsys.filter import GemFilter
from llmsys.kv import SnapKV
from llmsys.models import forward, generate
from llmsys.testing import every_dense_family, tiny_model

LENGTH = 40
NEW = 6


def _batch(pad: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 500, (2, LENGTH), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def _greedy(model, ids, **kwargs):
    return generate(model, ids, max_new_tokens=NEW, do_sample=False, **kwargs)


@every_dense_family
def test_topk_covering_the_prompt_is_exactly_the_plain_model(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids, mask = _batch()
    plain = _greedy(model, ids, attention_mask=mask)
    plain_scores = generate(
        model,
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    ).scores
    for topk in (LENGTH, 1000):
        with GemFilter(layer=1, topk=topk)(model) as gem:
            out = _greedy(model, ids, attention_mask=mask)
            dict_out = generate(
                model,
                ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        assert torch.equal(out, plain)
        assert torch.equal(dict_out.sequences, plain)
        assert all(torch.equal(a, b) for a, b in zip(dict_out.scores, plain_scores))
        assert gem.selection.kept.tolist() == [LENGTH, LENGTH - 7]


@every_dense_family
def test_second_pass_is_the_plain_model_on_the_kept_ids(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids, mask = _batch()
    with GemFilter(layer=1, topk=16)(model) as gem:
        out = _greedy(model, ids, attention_mask=mask)
        selection = gem.selection
        paged = _greedy(model, ids, attention_mask=mask, cache=PagedCache(model.config, page_size=4))
        dynamic = _greedy(model, ids, attention_mask=mask, cache=DynamicCache(config=model.config))
    assert selection.indices.shape == (2, 16)
    short, short_mask = selection.pack(ids)
    assert torch.equal(short_mask, torch.ones_like(short_mask))  # both rows are longer than topk
    reference = _greedy(model, short, attention_mask=short_mask)
    assert out.shape == (2, LENGTH + NEW)
    assert torch.equal(out[:, :LENGTH], ids)  # the caller's prompt comes back, not the short one
    assert torch.equal(out[:, LENGTH:], reference[:, 16:])
    assert torch.equal(paged, out) and torch.equal(dynamic, out)
    assert "generate" not in model.__dict__  # restored on exit


def test_rows_shorter_than_topk_are_left_padded_in_the_second_pass():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = _batch(pad=30)  # row 1 has 10 real tokens
    with GemFilter(layer=1, topk=16)(model) as gem:
        out = _greedy(model, ids, attention_mask=mask)
    assert gem.selection.kept.tolist() == [16, 10]
    short, short_mask = gem.selection.pack(ids)
    assert short_mask[1].tolist() == [0] * 6 + [1] * 10
    assert torch.equal(short[1, 6:], ids[1, 30:])
    alone = _greedy(model, ids[1:, 30:])
    assert torch.equal(out[1, LENGTH:], alone[0, 10:])


def _manual_decode(model, ids, position_ids, next_position, steps=NEW):
    """Greedy decoding by hand: prompt `ids` at `position_ids`, new tokens at next_position, +1, ..."""
    cache = DynamicCache(config=model.config)
    tokens = []
    with torch.no_grad():
        logits = forward(model, ids, cache=cache, position_ids=position_ids).logits
        for step in range(steps):
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
            position = torch.tensor([[next_position + step]])
            logits = forward(model, token, cache=cache, position_ids=position).logits
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_original_positions(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids, mask = _batch(pad=5)
    method = GemFilter(layer=1, topk=12, positions="original")
    with method(model) as gem:
        out = _greedy(model, ids, attention_mask=mask)
        paged = _greedy(model, ids, attention_mask=mask, cache=PagedCache(model.config, page_size=4))
    assert torch.equal(out, paged)
    for row, pad in ((0, 0), (1, 5)):
        kept = gem.selection.indices[row]
        positions = gem.selection.original_positions()[row]
        assert torch.equal(positions, kept - pad)
        want = _manual_decode(model, ids[row : row + 1, kept], positions[None], LENGTH - pad)
        assert torch.equal(out[row, LENGTH:], want[0]), row
    first_logits = {}
    for positions in ("contiguous", "original"):
        with GemFilter(layer=1, topk=12, positions=positions)(model):
            first_logits[positions] = generate(
                model, ids, attention_mask=mask, max_new_tokens=1, output_scores=True, return_dict_in_generate=True
            ).scores[0]
    # the ablation changes what the model computes
    assert not torch.allclose(first_logits["contiguous"], first_logits["original"], atol=1e-4)


def test_beams_and_returned_sequences():
    model = tiny_model("qwen3", num_hidden_layers=3)
    ids, mask = _batch()
    for positions in ("contiguous", "original"):
        with GemFilter(layer=0, topk=10, positions=positions)(model):
            out = generate(model, ids, attention_mask=mask, max_new_tokens=3, num_beams=2, num_return_sequences=2)
        assert out.shape == (4, LENGTH + 3)
        assert torch.equal(out[:, :LENGTH], ids.repeat_interleave(2, dim=0))


def test_max_length_counts_the_full_prompt():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = _batch()
    with GemFilter(layer=1, topk=10)(model):
        out = generate(model, ids, max_length=LENGTH + 4, do_sample=False)
    assert out.shape == (2, LENGTH + 4)


def test_composes_with_a_kv_policy_cache():
    model = tiny_model("mistral", num_hidden_layers=3)
    ids, mask = _batch(pad=0)
    with GemFilter(layer=1, topk=20)(model), PagedCache.from_model(model, policy=SnapKV(budget=8, window=4)) as cache:
        out = _greedy(model, ids, attention_mask=mask, cache=cache)
        assert cache.stored_length(0) == 8 + NEW - 1  # SnapKV compressed GemFilter's 20 tokens to 8
        assert cache.get_seq_length() == 20 + NEW - 1
    assert out.shape == (2, LENGTH + NEW)


def test_context_restores_generate_and_refuses_nesting():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = _batch()
    outer = GemFilter(layer=0, topk=8)(model)
    with outer:
        with pytest.raises(RuntimeError, match="already applied"):
            GemFilter(layer=1, topk=8)(model).__enter__()
        with pytest.raises(RuntimeError, match="already active"):
            outer.__enter__()
    assert "generate" not in model.__dict__
    with pytest.raises(ZeroDivisionError), GemFilter(layer=0, topk=8)(model):
        raise ZeroDivisionError
    assert "generate" not in model.__dict__
    assert torch.equal(_greedy(model, ids), model.generate(ids, max_new_tokens=NEW, do_sample=False))
