"""llmsys: six LLM-systems papers as composable plug-ins for Hugging Face transformers models.

Shared layers: `llmsys.models` (the only code that knows transformers internals), `llmsys.cache`
(a paged transformers Cache), `llmsys.kernels` (Triton kernels with PyTorch references) and
`llmsys.testing` (tiny models, a local tokenizer). Plug-ins live in their own subpackages.
"""

__version__ = "0.1.0"
