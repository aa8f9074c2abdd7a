"""The GemFilter row of `llmsys demo`: a tiny Llama, a 256-token prompt, both passes (< 2 s on a CPU)."""

from __future__ import annotations


def demo_row() -> dict:
    """Filter a 2-row (one left-padded) 256-token prompt to 32 tokens at layer 1 of a 4-layer tiny Llama.

    `ok` checks what must hold on any weights: the first pass ran no layer after the filter layer,
    each row kept min(topk, its length) tokens, the caller's prompt comes back at the head of the
    output, and with topk >= the prompt length the output equals the plain model's, token for token.
    """
    import torch

    from llmsys.filter import GemFilter
    from llmsys.models import decoder_layers, generate
    from llmsys.testing import tiny_model

    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, model.config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    ran: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with GemFilter(layer=1, topk=32)(model) as gem:
            out = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    first_pass = ran[: ran.index(1) + 1] if 1 in ran else ran
    kept = gem.selection.kept.tolist()
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with GemFilter(layer=1, topk=256)(model):
        lossless = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    exact = bool(torch.equal(lossless, plain))
    ok = first_pass == [0, 1] and kept == [32, 32] and bool(torch.equal(out[:, :256], ids)) and exact
    result = (
        f"tiny Llama, 256-token prompts (2 rows, 1 left-padded): first pass ran layers {first_pass} of 4, "
        f"kept {kept} tokens; topk>=length identical to plain: {exact}"
    )
    return {"plugin": "filter", "method": "GemFilter", "result": result, "ok": ok}
