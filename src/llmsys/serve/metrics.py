"""Serving metrics: TTFT, TBT (mean, P50, P90, P99), throughput, SLO attainment and goodput.

* TTFT: arrival to first token, per request.
* TBT: every gap between two consecutive tokens of a request, pooled over requests (the P99 TBT of
  Sarathi-Serve); TPOT is a request's mean gap.
* SLO attainment (DistServe): the fraction of requests with TTFT <= ttft_slo and TPOT <= tbt_slo;
  goodput: such requests per second.
* A run "meets the SLO" when P99 TTFT <= ttft_slo and P99 TBT <= tbt_slo (`meets_slo`); the
  maximum request rate under the SLO is the highest rate of a sweep that meets it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llmsys.serve.request import RequestState


@dataclass(frozen=True)
class RequestRecord:
    """One finished request's timeline (seconds on the run's clock)."""

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    first_token_time: float | None
    token_times: tuple[float, ...]
    finish_time: float | None
    finish_reason: str | None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tbts(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        gaps = self.tbts
        return sum(gaps) / len(gaps) if gaps else None

    @classmethod
    def of(cls, req: RequestState) -> RequestRecord:
        return cls(
            request_id=req.request_id,
            arrival=req.arrival,
            prompt_len=req.prompt_len,
            output_len=req.generated,
            first_token_time=req.first_token_time,
            token_times=tuple(req.token_times),
            finish_time=req.finish_time,
            finish_reason=req.finish_reason,
        )


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles of a latency, seconds (NaN when there are no samples)."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats:
        if len(samples) == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan, 0)
        x = np.asarray(samples, dtype=np.float64)
        p50, p90, p99 = np.percentile(x, [50, 90, 99])
        return cls(float(x.mean()), float(p50), float(p90), float(p99), int(x.size))


@dataclass(frozen=True)
class ServingMetrics:
    num_requests: int
    completed: int
    duration_s: float  # first arrival to last finish
    throughput_rps: float
    throughput_tps: float  # output tokens per second
    ttft: LatencyStats
    tbt: LatencyStats
    slo_attainment: float
    goodput_rps: float
    ttft_slo: float
    tbt_slo: float

    def meets_slo(self) -> bool:
        """P99 TTFT and P99 TBT both within their SLOs (and every request completed)."""
        return (
            self.completed == self.num_requests
            and _le(self.ttft.p99, self.ttft_slo)
            and (self.tbt.count == 0 or _le(self.tbt.p99, self.tbt_slo))
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["meets_slo"] = self.meets_slo()
        return data

    def row(self) -> dict:
        """A flat table row: latency percentiles, throughput, SLO attainment, goodput."""
        stats = {f"{name}_{q}": getattr(getattr(self, name), q) for name in ("ttft", "tbt")
                 for q in ("mean", "p50", "p90", "p99")}
        return {
            **stats,
            "throughput_rps": self.throughput_rps,
            "throughput_tps": self.throughput_tps,
            "slo_attainment": self.slo_attainment,
            "goodput_rps": self.goodput_rps,
            "meets_slo": self.meets_slo(),
        }


def _le(x: float, bound: float) -> bool:
    return not math.isnan(x) and x <= bound


def summarize(records: Iterable[RequestRecord], ttft_slo: float = 1.0, tbt_slo: float = 0.1) -> ServingMetrics:
    """Metrics of a run from its request records (cancelled requests are counted, not measured)."""
    records = list(records)
    done = [r for r in records if r.finish_reason in ("stop", "length")]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    gaps = [g for r in done for g in r.tbts]
    if records:
        start = min(r.arrival for r in records)
        end = max((r.finish_time for r in done if r.finish_time is not None), default=start)
        duration = max(end - start, 1e-12)
    else:
        duration = 0.0
    good = [r for r in done if r.ttft is not None and r.ttft <= ttft_slo and (r.tpot is None or r.tpot <= tbt_slo)]
    tokens = sum(r.output_len for r in done)
    return ServingMetrics(
        num_requests=len(records),
        completed=len(done),
        duration_s=duration,
        throughput_rps=len(done) / duration if duration else 0.0,
        throughput_tps=tokens / duration if duration else 0.0,
        ttft=LatencyStats.of(ttfts),
        tbt=LatencyStats.of(gaps),
        slo_attainment=len(good) / len(records) if records else float("nan"),
        goodput_rps=len(good) / duration if duration else 0.0,
        ttft_slo=ttft_slo,
        tbt_slo=tbt_slo,
    )


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured (NaN if measured is 0 or NaN)."""
    if measured == 0 or math.isnan(measured) or math.isnan(predicted):
        return float("nan")
    return (predicted - measured) / measured


__all__ = ["LatencyStats", "RequestRecord", "ServingMetrics", "relative_error", "summarize"]
