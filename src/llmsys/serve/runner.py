"""Runs one batch (prompt chunks + decode rows of requests of any lengths) through a model on pages.

KV lives in one `llmsys.cache.PagePool` per layer, shared by all requests; each request has its own
page list. The pools are driven in lockstep (every allocation and free is applied to every layer),
so a request's page ids and device slots are the same in every layer and one page table serves
them all.

A batch is *packed* into one sequence: decode tokens first, then each prompt chunk, with each
token's own position id. The model's decoder runs unchanged (embeddings, norms, MLPs and rotary
embeddings are per token); only attention is replaced, through transformers' attention interface
(see `llmsys.models.attention`), by `_paged_attention`, which for each layer

1. writes the batch's new keys/values into their pages,
2. runs decode rows through `llmsys.kernels.paged_decode_attention` straight from the pool,
3. runs each prompt chunk against its request's stored keys (causal, offset by what is stored).

The logits of the rows that produce a token (decode rows, last token of a finished prompt) come
from the final hidden states through the LM head only for those rows.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmsys.cache import PagePool
from llmsys.kernels import paged_decode_attention
from llmsys.models import (
    UnsupportedModelError,
    base_model,
    decoder_layers,
    family_of,
    kv_heads,
    lm_head,
    register_attention_function,
    sliding_window_of,
    use_attention,
)
from llmsys.serve.request import Batch

ATTENTION_NAME = "llmsys_serve_paged"


@dataclass
class _Chunk:
    """One prompt chunk inside the packed sequence."""

    start: int  # offset of its first token in the packed sequence
    length: int
    kv_len: int  # keys the chunk attends to once written (stored before + its own)
    slots: torch.Tensor  # device-pool slots of the request's pages, covering kv_len


@dataclass
class _Layout:
    """Everything the attention function needs for one forward (set through a ContextVar)."""

    pools: list[PagePool]
    write_pages: torch.Tensor  # [T] page id of each new token (CPU)
    write_offsets: torch.Tensor  # [T] offset in its page (CPU)
    write_slots: torch.Tensor  # [T] device slot of each new token's page (device)
    write_offsets_dev: torch.Tensor  # [T] (device)
    n_decode: int
    decode_table: torch.Tensor | None  # [n_decode, max_pages] device slots
    decode_lens: torch.Tensor | None  # [n_decode] keys per decode row, its new token included
    chunks: list[_Chunk] = field(default_factory=list)
    backend: str = "reference"
    direct_writes: bool = False


_ACTIVE: contextvars.ContextVar[_Layout | None] = contextvars.ContextVar("llmsys_serve_layout", default=None)


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the paged pool for a packed batch: (output [1, T, Hq, D], None)."""
    layout = _ACTIVE.get()
    if layout is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} only runs inside llmsys.serve's engine; set the model's "
            "attn_implementation back to 'eager' or 'sdpa' to use it elsewhere"
        )
    if kwargs.get("sliding_window") is not None:
        raise UnsupportedModelError("llmsys.serve does not implement sliding-window attention")
    pool = layout.pools[module.layer_idx]
    _, hq, t, d = query.shape
    new_k = key[0].transpose(0, 1)  # [T, Hkv, D]
    new_v = value[0].transpose(0, 1)
    if layout.direct_writes:
        # CUDA: the pool's write() keeps per-page key abstracts (torch.unique, a host sync per call) that
        # the engine never reads; writing the slots directly keeps the two lanes' streams asynchronous.
        pool.device_keys[layout.write_slots, :, layout.write_offsets_dev] = new_k.to(pool.dtype)
        pool.device_values[layout.write_slots, :, layout.write_offsets_dev] = new_v.to(pool.dtype)
    else:
        pool.write(layout.write_pages, layout.write_offsets, new_k, new_v)
    out = query.new_empty(t, hq, d)
    nd = layout.n_decode
    if nd:
        q = query[0, :, :nd].transpose(0, 1).contiguous()  # [nd, Hq, D]
        out[:nd] = paged_decode_attention(
            q,
            pool.device_keys,
            pool.device_values,
            layout.decode_table,
            layout.decode_lens,
            scaling,
            backend=layout.backend,
        )
    hkv = pool.num_heads
    for c in layout.chunks:
        q = query[:, :, c.start : c.start + c.length]  # [1, Hq, n, D]
        k = pool.device_keys[c.slots].transpose(0, 1).reshape(1, hkv, -1, d)[:, :, : c.kv_len]
        v = pool.device_values[c.slots].transpose(0, 1).reshape(1, hkv, -1, d)[:, :, : c.kv_len]
        k, v = k.to(q.dtype), v.to(q.dtype)
        if c.kv_len == c.length:  # a fresh prompt: plain causal attention
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=hq != hkv)
        else:  # a later chunk: query i sits at key position kv_len - length + i
            mask = torch.ones(c.length, c.kv_len, dtype=torch.bool, device=q.device).tril(c.kv_len - c.length)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
        out[c.start : c.start + c.length] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


register_attention_function(ATTENTION_NAME, _paged_attention)


@dataclass
class StepOutput:
    """The result of one forward: per request that produced a token, its logits row index."""

    rows: dict[str, int]  # request id -> row of `logits` / `greedy`
    logits: torch.Tensor | None  # [rows, vocab] (device)
    greedy: torch.Tensor | None  # [rows] argmax (device)
    event: object | None = None  # a CUDA event recorded after the forward (None on CPU)

    def done(self) -> bool:
        return self.event is None or self.event.query()


class ModelRunner:
    """The model, its per-layer page pools and each request's pages."""

    def __init__(
        self,
        model: nn.Module,
        *,
        page_size: int,
        num_pages: int,
        kernel_backend: str | None = None,
        direct_writes: bool | None = None,
    ):
        family_of(model, moe=False)
        window = sliding_window_of(model)
        if window is not None:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses sliding-window attention (window {window}); llmsys.serve attends to "
                "the whole context. Serve it with contexts <= the window after setting config.sliding_window=None."
            )
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        _, hkv, head_dim = kv_heads(model)
        self.page_size = page_size
        self.num_pages = num_pages
        self.backend = kernel_backend or ("auto" if self.device.type == "cuda" else "reference")
        # CUDA writes K/V straight into the pool's slots (no host sync, see _paged_attention)
        self.direct_writes = self.device.type == "cuda" if direct_writes is None else direct_writes
        self.pools: list[PagePool] = []
        for i, _ in enumerate(decoder_layers(model)):
            pool = PagePool(hkv, head_dim, page_size, self.dtype, self.device, layer_idx=i, max_device_pages=num_pages)
            pool.reserve(num_pages)  # never regrow: a regrowth reallocates the pool under running streams
            # The pool's storage is torch.empty: the unwritten tail of a request's last page may hold NaN
            # bit patterns, and the reference decode attention multiplies masked values by a zero
            # probability (0 * NaN = NaN). Zeroed once here, pages only ever hold finite K/V after.
            pool.device_keys.zero_()
            pool.device_values.zero_()
            self.pools.append(pool)
        self.pages: dict[str, list[int]] = {}
        self._base = base_model(model)
        self._head = lm_head(model)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------------
    # pages
    def _allocate(self, n: int) -> list[int]:
        ids = self.pools[0].allocate(n)
        slots = self.pools[0].slots[ids]
        for pool in self.pools[1:]:
            other = pool.allocate(n)
            if other != ids or not torch.equal(pool.slots[other], slots):  # pools must stay in lockstep
                raise RuntimeError("llmsys.serve: per-layer page pools went out of lockstep (a bug)")
        return ids

    def ensure_pages(self, request_id: str, tokens: int) -> list[int]:
        """Grow a request's page list to hold `tokens` tokens."""
        pages = self.pages.setdefault(request_id, [])
        need = math.ceil(tokens / self.page_size) - len(pages)
        if need > 0:
            pages.extend(self._allocate(need))
        return pages

    def free(self, request_id: str) -> None:
        """Return a request's pages to every layer's pool."""
        pages = self.pages.pop(request_id, None)
        if pages:
            for pool in self.pools:
                pool.free(pages)

    def pages_in_use(self) -> int:
        return len(self.pools[0].owned())

    def check(self) -> None:
        """Pool invariants, lockstep, and that every owned page belongs to exactly one request."""
        owned = sorted(p for pages in self.pages.values() for p in pages)
        for pool in self.pools:
            pool.check()
            if sorted(pool.owned()) != owned:
                raise AssertionError(f"layer {pool.layer_idx}: owned pages differ from the requests' pages")

    # ------------------------------------------------------------------------------------------
    # one forward
    @torch.no_grad()  # not inference_mode: the pools' bookkeeping tensors are updated outside it too
    def run(self, batch: Batch, inputs: dict[str, list[int]], stream=None) -> StepOutput:
        """Forward `batch`; `inputs[request_id]` are the token ids to feed (a chunk, or one token).

        On CUDA with `stream`, everything is enqueued on that stream and a recorded event says when
        it is done; nothing here waits for the device.
        """
        if stream is not None:
            with torch.cuda.stream(stream):
                out = self._run(batch, inputs)
                out.event = torch.cuda.Event()
                out.event.record(stream)
            return out
        return self._run(batch, inputs)

    def _run(self, batch: Batch, inputs: dict[str, list[int]]) -> StepOutput:
        ids: list[int] = []
        positions: list[int] = []
        page_of: list[int] = []
        offsets: list[int] = []
        logit_rows: dict[str, int] = {}
        ps = self.page_size
        # decode rows first: their queries are one contiguous block for the paged kernel
        decode_pages, decode_lens = [], []
        for req in batch.decode:
            pos = req.kv_len
            pages = self.ensure_pages(req.request_id, pos + 1)
            logit_rows[req.request_id] = len(ids)
            ids.extend(inputs[req.request_id])
            positions.append(pos)
            page_of.append(pages[pos // ps])
            offsets.append(pos % ps)
            decode_pages.append(pages)
            decode_lens.append(pos + 1)
        chunk_specs = []
        for req, n in batch.prefill:
            start = req.prefilled
            pages = self.ensure_pages(req.request_id, start + n)
            offset = len(ids)
            ids.extend(inputs[req.request_id])
            for pos in range(start, start + n):
                positions.append(pos)
                page_of.append(pages[pos // ps])
                offsets.append(pos % ps)
            chunk_specs.append((offset, n, start + n, pages[: math.ceil((start + n) / ps)]))
            if start + n == req.prompt_len:
                logit_rows[req.request_id] = offset + n - 1
        if len(ids) != batch.num_tokens:
            raise RuntimeError("llmsys.serve: inputs do not match the batch's token counts")

        dev = self.device
        pool0 = self.pools[0]
        write_pages = torch.tensor(page_of, dtype=torch.long)
        write_offsets = torch.tensor(offsets, dtype=torch.long)
        decode_table = decode_lens_t = None
        if decode_pages:
            width = max(len(p) for p in decode_pages)
            table = torch.tensor([p + [p[0]] * (width - len(p)) for p in decode_pages], dtype=torch.long)
            decode_table = pool0.device_slots(table)
            decode_lens_t = torch.tensor(decode_lens, dtype=torch.long, device=dev)
        chunks = [
            _Chunk(start, n, kv, pool0.device_slots(torch.tensor(pages, dtype=torch.long)))
            for start, n, kv, pages in chunk_specs
        ]
        layout = _Layout(
            pools=self.pools,
            write_pages=write_pages,
            write_offsets=write_offsets,
            write_slots=pool0.device_slots(write_pages),
            write_offsets_dev=write_offsets.to(dev),
            n_decode=len(batch.decode),
            decode_table=decode_table,
            decode_lens=decode_lens_t,
            chunks=chunks,
            backend=self.backend,
            direct_writes=self.direct_writes,
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.tensor([positions], dtype=torch.long, device=dev)
        token = _ACTIVE.set(layout)
        try:
            with use_attention(self.model, ATTENTION_NAME):
                hidden = self._base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        finally:
            _ACTIVE.reset(token)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        if not logit_rows:
            return StepOutput({}, None, None)
        order = list(logit_rows)
        rows = torch.tensor([logit_rows[r] for r in order], dtype=torch.long, device=dev)
        logits = self._head(hidden[0, rows]).float()
        return StepOutput({r: i for i, r in enumerate(order)}, logits, logits.argmax(-1))


__all__ = ["ATTENTION_NAME", "ModelRunner", "StepOutput"]
