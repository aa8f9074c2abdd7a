"""Kernels shared by the llmsys plug-ins.

Every op has a readable PyTorch reference (``<op>_reference``, the spec), a Triton kernel, and a public
function that dispatches between them (``backend="auto" | "triton" | "reference"``). See
docs/kernels.md for the ops table and the dispatch rule. Importing this package works without triton.
"""

from llmsys.kernels._dispatch import (
    Backend,
    KernelUnavailableError,
    interpreter_enabled,
    triton_available,
    use_triton,
)
from llmsys.kernels.abstracts import (
    abstract_scores,
    abstract_scores_reference,
    chunk_minmax,
    chunk_minmax_reference,
    fixed_chunk_bounds,
)
from llmsys.kernels.decode_attention import (
    gathered_decode_attention,
    gathered_decode_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from llmsys.kernels.int4_matmul import int4_dequantize_reference, int4_matmul, int4_matmul_reference
from llmsys.kernels.last_query import last_query_scores, last_query_scores_reference
from llmsys.kernels.rope import rerotate_keys, rerotate_keys_reference

OPS = (
    "paged_decode_attention",
    "gathered_decode_attention",
    "chunk_minmax",
    "abstract_scores",
    "last_query_scores",
    "rerotate_keys",
    "int4_matmul",
)


def available_ops() -> dict[str, str]:
    """Each public op and the backend `backend="auto"` picks here (for `llmsys info`)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "triton" if use_triton(device) else "reference (PyTorch)"
    if not triton_available():
        backend += "; triton not installed"
    return {op: f"{backend} on {device.type}" for op in OPS}

__all__ = [
    "OPS",
    "Backend",
    "available_ops",
    "KernelUnavailableError",
    "abstract_scores",
    "abstract_scores_reference",
    "chunk_minmax",
    "chunk_minmax_reference",
    "fixed_chunk_bounds",
    "gathered_decode_attention",
    "gathered_decode_attention_reference",
    "int4_dequantize_reference",
    "int4_matmul",
    "int4_matmul_reference",
    "interpreter_enabled",
    "last_query_scores",
    "last_query_scores_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "rerotate_keys",
    "rerotate_keys_reference",
    "triton_available",
    "use_triton",
]
