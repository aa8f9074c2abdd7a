"""Requests as the schedulers see them: the same objects in the real engine and in the simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmsys.serve.errors import SchedulerConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request.

    `temperature == 0` is greedy decoding (the default, and what `model.generate(do_sample=False)`
    does). `stop_token_ids=None` stops at the model's EOS token(s); `ignore_eos=True` always
    generates `max_new_tokens` (how serving benchmarks fix output lengths).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pages_for(tokens: int, page_size: int) -> int:
    return max(1, math.ceil(tokens / page_size))


@dataclass(eq=False)
class RequestState:
    """One request's progress: what every scheduler reads, and what the engine and simulator update.

    KV accounting: after its prompt is prefilled a request holds `prompt_len` tokens of KV and has
    produced its first token; each decode step stores the KV of the previous token and produces the
    next, so `kv_len = prefilled + max(generated - 1, 0)`. The last token is never stored, hence the
    lifetime need of `prompt_len + max_new_tokens - 1` tokens.
    """

    request_id: str
    prompt_len: int
    max_new_tokens: int
    arrival: float
    prefilled: int = 0
    generated: int = 0
    reserved_pages: int = 0  # > 0 once admitted: the pages set aside for the request's whole life
    busy: bool = False  # part of a batch that is running now
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    cancel_requested: bool = False
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.prompt_len

    @property
    def remaining_prefill(self) -> int:
        return self.prompt_len - self.prefilled

    @property
    def kv_len(self) -> int:
        return self.prefilled + max(self.generated - 1, 0)

    @property
    def lifetime_tokens(self) -> int:
        """KV tokens the request stores when it has generated `max_new_tokens`."""
        return self.prompt_len + self.max_new_tokens - 1

    def pages_needed(self, page_size: int) -> int:
        return pages_for(self.lifetime_tokens, page_size)


@dataclass
class Batch:
    """One forward pass of one lane: prompt chunks to prefill and requests to decode one token each.

    `lane` is "mixed" (one forward over the whole device: FCFS, chunked prefill), or "prefill" /
    "decode" (a disaggregated scheduler's two concurrent lanes, each on `sm_share` of the SMs).
    """

    lane: str
    prefill: list[tuple[RequestState, int]] = field(default_factory=list)
    decode: list[RequestState] = field(default_factory=list)
    sm_share: float = 1.0

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.prefill)

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + len(self.decode)

    @property
    def num_seqs(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def requests(self) -> list[RequestState]:
        return [r for r, _ in self.prefill] + list(self.decode)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


LANES = ("mixed", "prefill", "decode")


def check_lane(lane: str) -> str:
    if lane not in LANES:
        raise SchedulerConfigError(f"unknown lane {lane!r}; one of {LANES}")
    return lane


__all__ = ["LANES", "Batch", "RequestState", "SamplingParams", "pages_for"]
