"""QZO end to end: a 4-bit model -> fine-tune only its quantisation scales -> small checkpoints -> resume.

    python examples/qzo_finetune.py                   # a tiny random Llama, llmsys int4 (seconds, no download)
    python examples/qzo_finetune.py /path/to/model    # a local checkpoint, loaded in NF4 by bitsandbytes

Data: the text file shipped with llmsys.testing, tokenised with the model's tokenizer (or llmsys's
local one). Checkpoints (the scales only) go to ./qzo_out/; running the script again resumes.
"""

import sys
from importlib.resources import files
from pathlib import Path

import torch

from llmsys.qzo import QZO, quantize_int4, train

# 1. a 4-bit model
if len(sys.argv) > 1:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        sys.argv[1], quantization_config=config, device_map="cpu", local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
else:
    from llmsys.testing import local_tokenizer, tiny_model

    model = tiny_model("llama")
    quantize_int4(model, group_size=32)  # llmsys int4: codes + zero-points frozen, scales trainable
    tokenizer = local_tokenizer()

# 2. data: overlapping 24-token windows of a short text, one deterministic batch per step (exact resume)
text = files("llmsys.testing").joinpath("corpus.txt").read_text()
windows = torch.tensor(tokenizer(text)["input_ids"]).unfold(0, 24, 8)
train_ids, eval_ids = windows[:-8], windows[-8:]


def data(step: int) -> dict[str, torch.Tensor]:
    rows = torch.randint(0, len(train_ids), (16,), generator=torch.Generator().manual_seed(step))
    return {"input_ids": train_ids[rows], "labels": train_ids[rows]}


@torch.no_grad()
def eval_loss(m) -> dict[str, float]:
    return {"eval_loss": float(m(input_ids=eval_ids, labels=eval_ids).loss)}


# 3. QZO: two forwards per step, no gradients, no optimizer state beyond the seed
optimizer = QZO(model, lr=1e-3, eps=1e-3, clip=100.0)
n_params = sum(p.numel() for p in model.parameters())
print(f"training {optimizer.num_trained():,} scales of a {n_params:,}-parameter model")
print("before:", eval_loss(model))
result = train(
    model, optimizer, data, steps=200, eval_fn=eval_loss, eval_every=50,
    checkpoint_dir="qzo_out", checkpoint_every=100,
)
print("after:", result.evals[-1], f"(skipped {result.skipped_steps}, clipped {result.clipped_steps} steps)")
for ckpt in sorted(Path("qzo_out").glob("step_*")):
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"{ckpt}: {size / 1024:.0f} kB (scales + seed/step counters)")
