"""A real `tokenizers` BPE tokenizer trained on text shipped with llmsys: no download."""

from __future__ import annotations

import functools
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmsys.testing.models import TINY_VOCAB

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching the tiny configs


def local_corpus() -> str:
    return resources.files("llmsys.testing").joinpath("corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(local_corpus().splitlines(), trainer=trainer)
    return tok.to_str()  # cache the serialised form; each caller gets its own object


def local_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab_size <= the tiny models' vocab), deterministic, in ~0.1 s."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
