"""KV-cache policies for `llmsys.cache.PagedCache`.

Today: the SnapKV and H2O baselines (`llmsys.kv.policies`), used by the GemFilter benchmark. The
LeoAM issue adds Full / StreamingLLM / Quest / LeoAM next to them, following the conventions in the
`llmsys.kv.policies` docstring (`BudgetPolicy`, token fields, ``needs_queries``, registration).

    from llmsys.cache import PagedCache
    from llmsys.kv import SnapKV, H2O

    with PagedCache.from_model(model, policy=SnapKV(budget=1024, window=32)) as cache:
        llmsys.models.generate(model, ids, cache=cache, max_new_tokens=32)
"""

from llmsys.kv.policies import H2O, BudgetPolicy, SnapKV, accumulated_attention, snapkv_scores

__all__ = ["H2O", "BudgetPolicy", "SnapKV", "accumulated_attention", "snapkv_scores"]
