"""Shared fixtures for tests, benchmarks and users: tiny models, a local tokenizer, test batteries."""

from llmsys.testing.analytic import analytic_retrieval_model
from llmsys.testing.battery import every_dense_family, every_family, every_moe_family
from llmsys.testing.decode import greedy_logits
from llmsys.testing.models import DENSE_FAMILIES, MOE_FAMILIES, TINY_VOCAB, tiny_config, tiny_model
from llmsys.testing.reference import (
    ReferenceWeightsMissing,
    reference_info,
    reference_model,
    reference_tokenizer,
    reference_vocab,
)
from llmsys.testing.tokenizer import local_tokenizer

__all__ = [
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "TINY_VOCAB",
    "every_dense_family",
    "every_family",
    "every_moe_family",
    "greedy_logits",
    "local_tokenizer",
    "tiny_config",
    "tiny_model",
    "analytic_retrieval_model",
    "ReferenceWeightsMissing",
    "reference_info",
    "reference_model",
    "reference_tokenizer",
    "reference_vocab",
]
