"""GemFilter: early-layer attention selects the input tokens (Shi et al., 2024, "Discovering the Gems
in Early Layers").

    from llmsys.filter import GemFilter

    with GemFilter(layer=13, topk=1024)(model) as gem:
        out = model.generate(input_ids, max_new_tokens=64)       # any cache: cache=PagedCache(...)
    gem.selection.indices                                          # the kept prompt positions

- `GemFilter` - the method (a dataclass: layer, topk, pool_kernel, keep_first, keep_last, positions);
- `select_tokens` / `GemFilter.select` - the first pass only (which tokens are kept);
- `selected_text` / `GemFilter.selected_text` - the kept tokens as text, for inspection;
- `calibrate_layer` / ``layer="auto"`` - choose the filter layer on synthetic needle prompts;
- `filter_scores` / `layer_scores` - the per-token scores themselves.

See docs/filter.md.
"""

from llmsys.filter.calibrate import Calibration, calibrate_layer, choose_layer, needle_prompts
from llmsys.filter.gemfilter import GemFilter, GemFilterContext, select_tokens
from llmsys.filter.selection import Selection, filter_scores, layer_scores, select_from_scores, selected_text

__all__ = [
    "Calibration",
    "GemFilter",
    "GemFilterContext",
    "Selection",
    "calibrate_layer",
    "choose_layer",
    "filter_scores",
    "layer_scores",
    "needle_prompts",
    "select_from_scores",
    "select_tokens",
    "selected_text",
]
