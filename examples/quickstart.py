"""The README's notebook example: generate through the llmsys paged cache.

    python examples/quickstart.py            # a tiny random model, no download
    python examples/quickstart.py PATH       # a local checkpoint of a supported family
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from llmsys.cache import PagedCache
from llmsys.models import generate
from llmsys.testing import local_tokenizer, tiny_model

if len(sys.argv) > 1:
    model, tok = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
else:
    model, tok = tiny_model("llama"), local_tokenizer()

ids = tok("The value of the key is", return_tensors="pt").input_ids
with PagedCache(model.config, page_size=16) as cache:  # pages, page tables, tiers, policies
    out = generate(model, ids, cache=cache, max_new_tokens=20, do_sample=False)
    print(tok.decode(out[0]))
    print("bytes by tier:", cache.bytes_by_tier())

    # pages can leave the device and come back; reads wait for the prefetch
    cache.move("disk")
    print("after moving to disk:", cache.bytes_by_tier())
    cache.prefetch_pages().wait()
    print("after prefetch:", cache.bytes_by_tier())
