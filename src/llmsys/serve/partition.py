"""Where each lane's forward runs: SM partitions (CUDA green contexts), plain streams, or a CPU.

* CUDA with `torch.cuda.green_contexts` (torch >= 2.10) and `GreenContext.Stream()`: one green
  context per SM count the split can take (multiples of the device's partition granularity: 8 SMs
  on Hopper and later, 4 before), created once up front (a context's SM set is fixed) and picked per
  batch. A lane on the whole device uses a plain stream.
* CUDA without them: prefill and decode still run concurrently on two plain streams, but their
  kernels share every SM (stream priorities isolate nothing); `ExecutionInfo.mode == "streams"`
  and the engine logs the reason.
* CPU: lanes run one after another; the split is logical (correctness only).

Caveat, stated because it cannot be checked without a GPU here: torch's `GreenContext.create(num_sms)`
splits the whole device's SM resource afresh for each context, so a prefill context of k SMs and a
decode context of N - k SMs are not guaranteed to be disjoint (the driver picks the SMs). The GPU
profile (`llmsys serve profile`) measures the concurrent slowdown it actually gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from llmsys.serve.errors import GPUUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExecutionInfo:
    """How the engine executes a split (reported by `Engine.execution`)."""

    mode: str  # "green-contexts" | "streams" | "serial-cpu" | "serial"
    device: str
    num_sms: int = 0
    granularity: int = 0
    partitions: tuple[int, ...] = ()  # SM counts with a pre-created green context
    reason: str = ""

    def describe(self) -> str:
        if self.mode == "green-contexts":
            return (
                f"{self.device}: prefill and decode on SM partitions (green contexts of {list(self.partitions)} "
                f"SMs out of {self.num_sms})"
            )
        if self.mode == "streams":
            return f"{self.device}: prefill and decode on two plain CUDA streams sharing all SMs ({self.reason})"
        return f"{self.device}: lanes run one after another, the split is logical ({self.reason})"


def sm_granularity(device: torch.device | int | None = None) -> int:
    """SMs per green-context partition step: 8 on compute capability >= 9 (Hopper), else 4."""
    if not torch.cuda.is_available():
        raise GPUUnavailableError("sm_granularity needs a CUDA device")
    major, _ = torch.cuda.get_device_capability(device)
    return 8 if major >= 9 else 4


def green_context_support() -> tuple[bool, str]:
    """Whether this torch can bind streams to SM partitions, and why not if it cannot."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    module = getattr(torch.cuda, "green_contexts", None)
    if module is None:
        return False, f"torch {torch.__version__} has no torch.cuda.green_contexts (needs >= 2.10)"
    if not getattr(module, "SUPPORTED", True):
        return False, "this torch build has no green-context support (torch.cuda.green_contexts.SUPPORTED is False)"
    if not hasattr(module.GreenContext, "Stream"):
        return False, f"torch {torch.__version__}'s GreenContext has no Stream() (needs >= 2.11)"
    return True, ""


def _create_green_context(num_sms: int, device_index: int):
    gc = torch.cuda.green_contexts.GreenContext
    try:
        return gc.create(num_sms=num_sms, device_id=device_index)
    except TypeError:  # torch 2.10/2.11 took them positionally
        return gc.create(num_sms, device_index)


@dataclass
class LaneStreams:
    """The stream of each SM share a lane can be given, on one CUDA device."""

    device: torch.device
    info: ExecutionInfo
    _full: dict[str, torch.cuda.Stream] = field(default_factory=dict)
    _contexts: dict[tuple[str, int], object] = field(default_factory=dict)  # (lane, SMs) -> context, kept alive
    _streams: dict[tuple[str, int], torch.cuda.Stream] = field(default_factory=dict)  # (lane, SMs) -> its stream

    @classmethod
    def create(cls, device: torch.device, use_green_contexts: bool = True) -> LaneStreams:
        if device.type != "cuda":
            raise GPUUnavailableError(f"LaneStreams needs a CUDA device, got {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        num_sms = props.multi_processor_count
        name = props.name
        ok, reason = green_context_support() if use_green_contexts else (False, "green contexts disabled")
        contexts: dict[tuple[str, int], object] = {}
        streams: dict[tuple[str, int], torch.cuda.Stream] = {}
        granularity = sm_granularity(index)
        if ok:
            try:  # one context per lane and SM count: two lanes must never share a stream
                for lane in ("prefill", "decode"):
                    for sms in range(granularity, num_sms, granularity):
                        ctx = _create_green_context(sms, index)
                        contexts[lane, sms] = ctx
                        streams[lane, sms] = ctx.Stream()
            except Exception as exc:  # driver too old, MPS active, ...: fall back, say so
                ok, reason = False, f"creating green contexts failed: {exc!r}"
                contexts, streams = {}, {}
        if ok:
            sizes = tuple(sorted({sms for _, sms in streams}))
            info = ExecutionInfo("green-contexts", name, num_sms, granularity, sizes)
        else:
            info = ExecutionInfo("streams", name, num_sms, granularity, (), reason)
            logger.warning("llmsys.serve: %s", info.describe())
        full = {lane: torch.cuda.Stream(index) for lane in ("mixed", "prefill", "decode")}
        return cls(device, info, full, contexts, streams)

    def stream(self, lane: str, share: float) -> torch.cuda.Stream:
        """The stream for `lane` on `share` of the SMs (a plain stream for the whole device)."""
        if share >= 1.0 or lane not in ("prefill", "decode") or not self._streams:
            return self._full[lane]
        sms = min(self.info.partitions, key=lambda s: abs(s - share * self.info.num_sms))
        return self._streams[lane, sms]


__all__ = ["ExecutionInfo", "LaneStreams", "green_context_support", "sm_granularity"]
