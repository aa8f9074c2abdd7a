"""The thin compatibility layer over transformers internals.

Everything that knows how a transformers model is put together lives here: where the decoder layers
and attention modules are, how post-RoPE queries and keys are computed for each family, what the
attention modules receive as keyword arguments, where MoE routers and experts live (and how to keep
only some experts in memory, or read only some from a checkpoint), and which name the cache argument
has in the installed transformers version. Plug-ins go through these helpers, so a rename in
transformers changes this package only.
"""

from llmsys.models.attention import register_attention_function, sliding_window_of, use_attention
from llmsys.models.checkpoint import (
    CheckpointRead,
    UnsupportedCheckpointError,
    checkpoint_files,
    empty_model,
    load_held_experts,
)
from llmsys.models.compat import (
    CACHE_KWARG,
    TRANSFORMERS_VERSION,
    cache_kwargs,
    forward,
    generate,
    output_cache,
    uses_standard_causal_lm_loss,
)
from llmsys.models.experts import (
    NotHeldExpertError,
    expert_parameter_bytes,
    held_experts,
    num_global_experts,
    set_held_experts,
    shard_experts,
)
from llmsys.models.families import (
    DENSE_FAMILIES,
    MOE_FAMILIES,
    SUPPORTED_FAMILIES,
    UnsupportedModelError,
    family_of,
    is_moe,
)
from llmsys.models.layers import (
    AttentionCall,
    MoEBlock,
    apply_rope,
    attention_modules,
    base_model,
    decoder_layers,
    embed_tokens,
    final_norm,
    kv_heads,
    lm_head,
    moe_blocks,
    position_embeddings,
    query_key_states,
    query_key_value_states,
    read_attention_call,
    rope_inv_freq,
    rotary_embedding,
)

__all__ = [
    "CACHE_KWARG",
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "SUPPORTED_FAMILIES",
    "TRANSFORMERS_VERSION",
    "AttentionCall",
    "CheckpointRead",
    "MoEBlock",
    "NotHeldExpertError",
    "UnsupportedCheckpointError",
    "UnsupportedModelError",
    "apply_rope",
    "attention_modules",
    "base_model",
    "cache_kwargs",
    "checkpoint_files",
    "decoder_layers",
    "embed_tokens",
    "empty_model",
    "expert_parameter_bytes",
    "family_of",
    "final_norm",
    "forward",
    "generate",
    "held_experts",
    "is_moe",
    "kv_heads",
    "lm_head",
    "load_held_experts",
    "moe_blocks",
    "num_global_experts",
    "output_cache",
    "position_embeddings",
    "query_key_states",
    "query_key_value_states",
    "read_attention_call",
    "register_attention_function",
    "rope_inv_freq",
    "rotary_embedding",
    "set_held_experts",
    "shard_experts",
    "sliding_window_of",
    "use_attention",
    "uses_standard_causal_lm_loss",
]
