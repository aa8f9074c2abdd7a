"""Workloads for the simulator and the benchmarks: Poisson arrivals, prompt/output length distributions.

The synthetic distributions are *shaped like* three public traces from their published summary
statistics; they are not fitted to the traces (no download is possible here). Each is a log-normal
per length, clipped, with a median and a spread (sigma of the log):

| name | prompt median / sigma / clip | output median / sigma / clip |
|---|---|---|
| `sharegpt` | 100 / 1.0 / [4, 4096] | 200 / 1.0 / [4, 2048] |
| `longbench` | 7000 / 0.6 / [1000, 16000] | 60 / 0.7 / [8, 512] |
| `arxiv` | 7000 / 0.45 / [2000, 16000] | 250 / 0.4 / [64, 600] |

* `sharegpt`: chat, after the ShareGPT statistics of the vLLM paper (means of 161 prompt and 338
  output tokens); these give means of ~165 and ~330.
* `longbench`: long-context QA, after LongBench (Bai et al. 2023: ~6.7k words on average, i.e.
  ~8-9k tokens) with short answers.
* `arxiv`: summarisation, after arXiv summarisation (Cohan et al. 2018: articles of ~4.9k words,
  abstracts of ~220 words).

A user's own trace is a CSV with columns `prompt_len,output_len` and optionally `arrival` (seconds);
without `arrival`, Poisson arrivals at the requested rate are drawn.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmsys.serve.errors import WorkloadError


@dataclass(frozen=True)
class LengthDistribution:
    """A clipped log-normal: exp(N(log(median), sigma)) rounded and clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.exp(rng.normal(np.log(self.median), self.sigma, size=n))
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class Dataset:
    name: str
    prompt: LengthDistribution
    output: LengthDistribution
    description: str


DATASETS: dict[str, Dataset] = {
    "sharegpt": Dataset(
        "sharegpt",
        LengthDistribution(100, 1.0, 4, 4096),
        LengthDistribution(200, 1.0, 4, 2048),
        "chat, shaped like ShareGPT (short prompts, replies of a few hundred tokens)",
    ),
    "longbench": Dataset(
        "longbench",
        LengthDistribution(7000, 0.6, 1000, 16000),
        LengthDistribution(60, 0.7, 8, 512),
        "long-context QA, shaped like LongBench (thousands of prompt tokens, short answers)",
    ),
    "arxiv": Dataset(
        "arxiv",
        LengthDistribution(7000, 0.45, 2000, 16000),
        LengthDistribution(250, 0.4, 64, 600),
        "summarisation, shaped like arXiv summarisation (papers to abstracts)",
    ),
}


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: when it arrives and how long its prompt and its output are."""

    arrival: float
    prompt_len: int
    output_len: int


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of `n` requests of a Poisson process of `rate` requests/s, starting at 0."""
    if rate <= 0:
        raise WorkloadError(f"request rate must be > 0, got {rate}")
    gaps = rng.exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic_workload(dataset: str, rate: float, num_requests: int, seed: int = 0) -> list[WorkloadRequest]:
    """`num_requests` Poisson arrivals at `rate` with lengths from a synthetic distribution."""
    try:
        ds = DATASETS[dataset]
    except KeyError:
        raise WorkloadError(f"unknown dataset {dataset!r}; one of {sorted(DATASETS)} (or a CSV file)") from None
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    prompts = ds.prompt.sample(rng, num_requests)
    outputs = ds.output.sample(rng, num_requests)
    arrivals = poisson_arrivals(rate, num_requests, rng)
    return [WorkloadRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def load_csv_workload(
    path: str | Path, rate: float | None = None, num_requests: int | None = None, seed: int = 0
) -> list[WorkloadRequest]:
    """A workload from a CSV with `prompt_len,output_len[,arrival]` columns.

    Without an `arrival` column, arrivals are Poisson at `rate` (required then). `num_requests`
    keeps the first rows (or cycles through them if there are fewer).
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise WorkloadError(f"no workload file at {path}") from None
    if not rows:
        raise WorkloadError(f"{path}: no rows; expected a header `prompt_len,output_len[,arrival]` and data")
    missing = {"prompt_len", "output_len"} - set(rows[0])
    if missing:
        raise WorkloadError(f"{path}: missing column(s) {sorted(missing)}; have {sorted(rows[0])}")
    try:
        prompts = [int(r["prompt_len"]) for r in rows]
        outputs = [int(r["output_len"]) for r in rows]
        arrivals = [float(r["arrival"]) for r in rows] if "arrival" in rows[0] and rows[0]["arrival"] else None
    except (TypeError, ValueError) as exc:
        raise WorkloadError(f"{path}: non-numeric value ({exc})") from None
    if min(prompts) < 1 or min(outputs) < 1:
        raise WorkloadError(f"{path}: prompt_len and output_len must be >= 1")
    n = num_requests or len(rows)
    idx = [i % len(rows) for i in range(n)]
    if arrivals is None or num_requests and num_requests > len(rows):
        if rate is None:
            raise WorkloadError(f"{path} has no `arrival` column: give a request rate (--rate)")
        times = poisson_arrivals(rate, n, np.random.default_rng(seed)).tolist()
    else:
        idx = sorted(idx, key=lambda i: arrivals[i])
        start = arrivals[idx[0]]
        times = [arrivals[i] - start for i in idx]
    return [WorkloadRequest(float(t), prompts[i], outputs[i]) for t, i in zip(times, idx)]


def burst_workload(prompt_lens: list[int], output_lens: list[int]) -> list[WorkloadRequest]:
    """Every request at time 0 (the CPU engine-vs-simulator comparison)."""
    return [WorkloadRequest(0.0, p, o) for p, o in zip(prompt_lens, output_lens)]


__all__ = [
    "DATASETS",
    "Dataset",
    "LengthDistribution",
    "WorkloadRequest",
    "burst_workload",
    "load_csv_workload",
    "poisson_arrivals",
    "synthetic_workload",
]
