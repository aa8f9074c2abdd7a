"""GemFilter on a needle-in-a-haystack prompt: what an early layer keeps, and the answer it leads to.

    python examples/gemfilter_needle.py [--length 4096] [--depth 0.4] [--topk 32] [--layer auto]

Runs on the trained reference model when its weights are installed (`llmsys.testing.reference`),
else on the hand-written retrieval model (`llmsys.testing.analytic`), both over the synthetic
vocabulary of `llmsys.eval` ("<s> f3 ... <kv> k5 v9 ... <q> k5" -> "v9"). With a real model and
tokenizer the same lines work: `GemFilter(layer=13, topk=1024)(model)`, `model.generate(...)`.
"""

from __future__ import annotations

import argparse

import torch

from llmsys.eval import NeedleTask, synthetic_tokenizer
from llmsys.filter import GemFilter, calibrate_layer, selected_text


def load_model():
    try:
        from llmsys.testing.reference import reference_model

        return reference_model(), "the trained reference model"
    except Exception as exc:  # no weights installed: the hand-written model retrieves exactly
        from llmsys.testing.analytic import analytic_retrieval_model

        return analytic_retrieval_model(max_length=16384), f"the hand-written retrieval model ({type(exc).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="where the needle sits (0 = start, 1 = end)")
    parser.add_argument("--topk", type=int, default=32, help="tokens GemFilter keeps")
    parser.add_argument("--layer", default="auto", help="filter layer, or 'auto' to calibrate on needle prompts")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, name = load_model()
    tokenizer = synthetic_tokenizer()
    task = NeedleTask()
    if args.layer == "auto":  # calibrate on the task's own prompts (the model speaks its vocabulary only)
        calibration = calibrate_layer(model, task=task, lengths=(1024,))
        layer = calibration.layer
        print(f"model: {name}; calibration: {calibration.summary()}")
    else:
        layer = int(args.layer)
        print(f"model: {name}; filter layer {layer}")

    sample = task(args.length, args.depth, seed=0)
    ids = sample.prompt_tensor()
    with GemFilter(layer=layer, topk=args.topk)(model) as gem:
        out = model.generate(ids, max_new_tokens=len(sample.answer), do_sample=False)
    kept = gem.selection.indices[0]
    start = sample.positions[0]
    print(
        f"\nprompt: {args.length} tokens; the asked fact '{tokenizer.decode(ids[0, start : start + 3].tolist())}' "
        f"sits at token {start}; the question is '{tokenizer.decode(ids[0, -2:].tolist())}'"
    )
    print(f"GemFilter kept {len(kept)} tokens ({args.length / len(kept):.0f}x fewer):\n")
    print("  " + selected_text(tokenizer, ids, kept)[0])
    around = kept[(kept >= start - 8) & (kept < start + 11)].tolist()
    print(f"\nkept tokens around the needle (positions {start - 8}..{start + 10}): {around}")
    answer = tokenizer.decode(out[0, ids.shape[1] :].tolist())
    print(f"answer: {answer!r} (expected {tokenizer.decode(sample.answer)!r})")


if __name__ == "__main__":
    main()
