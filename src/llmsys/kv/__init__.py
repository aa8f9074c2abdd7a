"""KV-cache policies for `llmsys.cache.PagedCache`.

LeoAM (`llmsys.kv.leoam`, `LeoAMCache` in `llmsys.kv.leoam_cache`; docs/kv-leoam.md) and the
baselines it is compared with (docs/kv.md): Full / StreamingLLM / Quest (`llmsys.kv.baselines`) and
SnapKV / H2O (`llmsys.kv.policies`, whose docstring holds the shared conventions: `BudgetPolicy`,
token fields, ``needs_queries``, registration). `llmsys.kv.protocol.context_then_question` is the
evaluation protocol of benchmarks/kv.py (compress the context, then ask the question).

    from llmsys.cache import PagedCache
    from llmsys.kv import SnapKV, H2O

    with PagedCache.from_model(model, policy=SnapKV(budget=1024, window=32)) as cache:
        llmsys.models.generate(model, ids, cache=cache, max_new_tokens=32)
"""

from llmsys.kv.baselines import Full, Quest, StreamingLLM, quest_page_scores
from llmsys.kv.compress import CompressedDiskStore, dequantize_minmax, minmax_error_bound, quantize_minmax
from llmsys.kv.leoam import LeoAM
from llmsys.kv.leoam_cache import LeoAMCache, TieredLeoAM
from llmsys.kv.offload import WholeKVOffloadCache
from llmsys.kv.policies import H2O, BudgetPolicy, SnapKV, accumulated_attention, snapkv_scores

__all__ = [
    "H2O",
    "BudgetPolicy",
    "CompressedDiskStore",
    "Full",
    "LeoAM",
    "LeoAMCache",
    "Quest",
    "SnapKV",
    "StreamingLLM",
    "TieredLeoAM",
    "WholeKVOffloadCache",
    "accumulated_attention",
    "dequantize_minmax",
    "minmax_error_bound",
    "quantize_minmax",
    "quest_page_scores",
    "snapkv_scores",
]
