"""LeoAM on a long prompt: a small device budget, a host tier and a disk tier, through `model.generate`.

    python examples/leoam_long_context.py [--length 8192] [--depth 0.4] [--budget 512] [--disk-dir DIR]

The trained reference model (`llmsys.testing.reference`, committed weights) answers a needle question
over the synthetic vocabulary of `llmsys.eval` ("<s> f3 ... <kv> k5 v9 ... <q> k5" -> "v9"). The
prompt's KV lives in a `LeoAMCache`: `--budget` tokens per layer are attended at each decode step
(chosen by LeoAM's chunk abstracts), the device holds that plus a little slack, the host as much
again, and everything else goes to compressed pages in `--disk-dir`. With a real model and
tokenizer the same lines work.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from llmsys.eval import NeedleTask, synthetic_tokenizer
from llmsys.kv import LeoAMCache
from llmsys.testing import reference_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="where the needle sits (0 = start, 1 = end)")
    parser.add_argument("--budget", type=int, default=512, help="past tokens attended per decode step and layer")
    parser.add_argument("--disk-dir", default=None, help="where the disk tier lives (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = reference_model()  # a 2-layer Llama trained on long-context retrieval (docs/reference-model.md)
    tokenizer = synthetic_tokenizer()
    sample = NeedleTask()(args.length, args.depth, seed=0)
    ids = torch.tensor([sample.prompt])
    print(f"prompt: {args.length} tokens, the asked fact at depth {args.depth}: "
          f"{tokenizer.decode(sample.prompt[-2:])} -> expected {tokenizer.decode(sample.answer)}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        disk_dir = args.disk_dir or tmp
        # device: the attended budget + page slack; host: as much again; the rest of the prompt on disk
        with LeoAMCache.from_model(model, device_budget=args.budget + 128, host_budget=args.budget,
                                   budget=args.budget, disk_dir=disk_dir) as cache:  # fmt: skip
            cache.prefill(model, ids)  # the prompt but its last token, in pieces that fit the device
            cache.mark_decode_start()
            out = model.generate(ids, cache=cache, max_new_tokens=1, do_sample=False)
            report = cache.report()
    answer = out[0, ids.shape[1] :].tolist()
    print(f"answer: {tokenizer.decode(answer)} ({'right' if answer == sample.answer else 'wrong'})")
    mib = {tier: round(n / 2**20, 3) for tier, n in report["bytes_by_tier"].items()}
    print(f"KV per tier (MiB): {mib}; disk files: {report['disk_file_bytes'] / 2**20:.3f} MiB")
    print(f"key abstracts kept on the device to choose pages: {report['abstract_bytes'] / 2**20:.3f} MiB")
    print(f"bytes moved between tiers: {report['bytes_moved']}")


if __name__ == "__main__":
    main()
