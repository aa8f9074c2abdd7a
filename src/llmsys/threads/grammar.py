"""Grammar-constrained decoding with xgrammar, and the byte string of every token.

The grammar is compiled once per runner from `response_schema(tools)` with compact separators
(``,`` and ``:``, no whitespace: a model that may emit whitespace anywhere - a random one for sure -
never closes the JSON). Each thread has its own matcher, fed with the FULL emitted text: every
sampled token, and the ``,"tool_result":...`` text the runtime writes (``accept_string``), pruned
or not - pruning changes the KV cache, never the text.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import torch

from llmsys.threads.errors import GrammarUnavailableError

logger = logging.getLogger(__name__)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # a dependency of llmsys, but be clear if it is missing
        raise GrammarUnavailableError(
            f"grammar-constrained decoding needs xgrammar ({exc}); `pip install 'xgrammar>=0.2.8'`, "
            "or pass grammar=False to decode without the schema constraint"
        ) from None
    return xgrammar


class ResponseGrammar:
    """The compiled Response grammar for one tokenizer and tool set; `matcher()` per thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, schema: dict[str, Any]):
        xgr = _xgrammar()
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        compiler = xgr.GrammarCompiler(self.info)
        self.compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )

    def matcher(self) -> Any:
        # rollback (of a token that ran past a tool call) is always available in xgrammar >= 0.2
        return self.xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True)

    def bitmask(self, batch: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(batch, self.vocab_size)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits of the tokens the grammar forbids to -inf, in place (``[B, V]``, any float dtype)."""
        logits.masked_fill_(~allowed_tokens(bitmask, logits.shape[-1]).to(logits.device), float("-inf"))


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask ``[B, ceil(V/32)]`` as a bool ``[B, V]`` (bit j of word w = token 32w+j)."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes each token id writes (ids past the tokenizer's vocabulary write nothing)."""
    try:
        xgr = _xgrammar()
        table = list(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).decoded_vocab)
    except GrammarUnavailableError:
        table = _fallback_token_bytes(tokenizer)
    table = [bytes(t) for t in table[:vocab_size]]
    return table + [b""] * (vocab_size - len(table))


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level BPE: bytes are written as printable unicode characters (the inverse map)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _fallback_token_bytes(tokenizer: Any) -> list[bytes]:
    decoder = _byte_decoder()
    out = []
    for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        tok = tok or ""
        if all(ch in decoder for ch in tok):
            out.append(bytes(decoder[ch] for ch in tok))
        else:
            out.append(tok.replace("\u2581", " ").encode("utf-8"))
    return out


__all__ = ["ResponseGrammar", "allowed_tokens", "token_bytes"]
