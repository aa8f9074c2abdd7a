"""Working memory on the paged cache: truncation, holes, compaction, row removal keep the invariants."""

from __future__ import annotations

import torch

from llmsys.models import forward
from llmsys.testing import local_tokenizer, tiny_model
from llmsys.threads import BatchKV
from llmsys.threads.grammar import _fallback_token_bytes, token_bytes


def check(kv: BatchKV) -> None:
    kv.cache.check()
    for layer in kv.cache.layers:
        assert layer.seen == layer.length == kv.stored  # transformers' positions rule stays trivial
        assert torch.equal(layer.token_index[0], torch.arange(kv.stored))
    if kv.batch > 1:
        assert kv.valid.shape == (kv.batch, kv.stored)
        assert int((~kv.valid).sum()) == kv.holes
        for row, slots in enumerate(kv.slots):
            assert slots == sorted(slots) and bool(kv.valid[row, slots].all())


def fresh(model, ids):
    with torch.no_grad():
        return forward(model, torch.tensor([ids]), position_ids=torch.arange(len(ids))[None]).logits[0, -1]


def test_single_row_truncates_and_reuses_pages():
    model = tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    ids = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    kv = BatchKV(model, 1, page_size=8)
    wm = ids[:70]
    kv.forward([wm], [0])
    reserved = kv.reserved_bytes()
    for step in range(5):  # prune a span, re-feed the tail plus a new token, again and again
        keep = 20 + step
        tail = wm[keep + 10 :]
        kv.drop(0, keep)
        check(kv)
        assert kv.stored == keep and kv.holes == 0
        wm = wm[:keep] + tail + [ids[100 + step]]
        logits = kv.forward([tail + [ids[100 + step]]], [keep])[0]
        check(kv)
        assert (logits - fresh(model, wm)).abs().max() <= 1e-12
    assert kv.reserved_bytes() == reserved  # the freed pages were reused, none allocated
    kv.close()


def test_rows_with_holes_compact_and_leave():
    model = tiny_model("qwen3", dtype=torch.float64, attn_implementation="sdpa")
    ids = torch.randint(3, 512, (2, 120), generator=torch.Generator().manual_seed(1)).tolist()
    kv = BatchKV(model, 2, page_size=4)
    wm = [ids[0][:30], ids[1][:12]]  # ragged prompts: row 1 is left-padded with masked slots
    kv.forward([wm[0], wm[1]], [0, 0])
    check(kv)
    assert kv.holes == 18
    for step in range(6):
        kv.drop(1, 5)  # row 1 prunes everything after its 5th token, re-feeds a 6-token tail
        tail = ids[1][40 + 6 * step : 46 + 6 * step]
        wm[1] = wm[1][:5] + tail
        wm[0] = wm[0] + [ids[0][60 + step]]
        logits = kv.forward([[wm[0][-1]], tail], [len(wm[0]) - 1, 5])
        for row in (0, 1):
            assert (logits[row] - fresh(model, wm[row])).abs().max() <= 1e-12
        kv.compact()
        check(kv)
    kv.compact(force=True)
    check(kv)
    assert kv.stored == max(len(w) for w in wm)  # only the longer row's working memory is stored
    kv.remove_rows([0])
    check(kv)
    assert kv.batch == 1 and kv.holes == 0 and kv.stored == len(wm[1]) and kv.slots == [list(range(len(wm[1])))]
    logits = kv.forward([[ids[1][119]]], [len(wm[1])])
    assert (logits[0] - fresh(model, wm[1] + [ids[1][119]])).abs().max() <= 1e-12
    kv.close()


def test_token_bytes_without_xgrammar_match_xgrammar():
    tok = local_tokenizer()
    assert _fallback_token_bytes(tok) == token_bytes(tok, len(tok))
    assert token_bytes(tok, 600)[-1] == b""  # ids past the tokenizer write nothing
