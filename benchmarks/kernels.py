"""Benchmark the llmsys.kernels ops: PyTorch reference vs Triton kernel.

    python benchmarks/kernels.py [--quick] [--out DIR] [--triton-on-cpu] [--repeats N]

On CUDA both backends are timed (bf16 inputs) and each result also reports achieved memory bandwidth
(unique bytes read + written / time) as a fraction of a measured device-to-device copy. On CPU only the
reference is timed (fp32) unless --triton-on-cpu is passed (then the Triton interpreter runs: very
slow, use with --quick). Writes kernels.json and kernels.png into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from _common import (
    bar_plot,
    copy_bandwidth,
    machine_info,
    print_table,
    time_cuda_graph,
    time_fn,
    write_json,
)


@dataclass
class Case:
    op: str
    name: str  # the size, e.g. "B8 ctx4096"
    run: Callable[[str], torch.Tensor | tuple[torch.Tensor, ...]]  # backend -> output
    nbytes: int  # unique bytes read + written (the minimum any implementation must move)
    shape: str


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    from llmsys.kernels import (
        abstract_scores,
        chunk_minmax,
        fixed_chunk_bounds,
        gathered_decode_attention,
        last_query_scores,
        paged_decode_attention,
        rerotate_keys,
    )

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    on_gpu = device.type == "cuda"
    # Llama-3-8B-like heads: Hq=32, Hkv=8, D=128; 16-token pages.
    Hq, Hkv, D, page = 32, 8, 128, 16
    if on_gpu:
        decode_sizes = [(8, 4096), (32, 2048), (1, 32768)]
        seq_sizes = [8192, 32768]
    elif quick:
        decode_sizes = [(4, 1024), (1, 4096)]
        seq_sizes = [2048]
    else:
        decode_sizes = [(8, 4096), (1, 16384)]
        seq_sizes = [4096, 16384]

    cases: list[Case] = []
    for B, ctx in decode_sizes:
        n_pages = ctx // page
        k_pages, v_pages = randn(B * n_pages, Hkv, page, D), randn(B * n_pages, Hkv, page, D)
        table = torch.randperm(B * n_pages, generator=gen).view(B, n_pages)
        table = table.to(device=device, dtype=torch.int32)
        lens = torch.full((B,), ctx, device=device, dtype=torch.int32)
        q = randn(B, Hq, D)
        moved = _nbytes(q, k_pages, v_pages, table, q)
        cases.append(Case(
            "paged_decode_attention", f"B{B} ctx{ctx}",
            lambda be, a=(q, k_pages, v_pages, table, lens): paged_decode_attention(*a, backend=be),
            moved, f"q[{B},{Hq},{D}] pages[{B * n_pages},{Hkv},{page},{D}]",
        ))
        k, v = randn(B, Hkv, ctx, D), randn(B, Hkv, ctx, D)
        cases.append(Case(
            "gathered_decode_attention", f"B{B} ctx{ctx}",
            lambda be, a=(q, k, v): gathered_decode_attention(*a, backend=be),
            _nbytes(q, k, v, q), f"q[{B},{Hq},{D}] kv[{B},{Hkv},{ctx},{D}]",
        ))

    for T in seq_sizes:
        keys = randn(1, Hkv, T, D)
        bounds = fixed_chunk_bounds(T, page, device=device)
        C = bounds.numel() - 1
        cases.append(Case(
            "chunk_minmax", f"T{T} chunk{page}",
            lambda be, a=(keys, bounds): chunk_minmax(*a, backend=be),
            _nbytes(keys) + 2 * C * Hkv * D * keys.element_size(), f"keys[1,{Hkv},{T},{D}] C={C}",
        ))
        kmin, kmax = chunk_minmax(keys, bounds, backend="reference")
        q1 = randn(1, Hq, D)
        cases.append(Case(
            "abstract_scores", f"C{C}",
            lambda be, a=(q1, kmin, kmax): abstract_scores(*a, backend=be),
            _nbytes(q1, kmin, kmax) + Hq * C * 4, f"q[1,{Hq},{D}] kmin[1,{Hkv},{C},{D}]",
        ))
        for softmax, W in ((False, 1), (True, 32)):
            qw = randn(1, Hq, W, D)
            label = "snapkv W32" if softmax else "gemfilter W1"
            cases.append(Case(
                "last_query_scores", f"{label} T{T}",
                lambda be, a=(qw, keys), s=softmax: last_query_scores(
                    *a, softmax=s, pool_kernel=7, backend=be
                ),
                _nbytes(qw, keys) + T * 4, f"q[1,{Hq},{W},{D}] k[1,{Hkv},{T},{D}]",
            ))
        inv_freq = (1.0 / 500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device)
        delta = torch.full((T,), -1024, dtype=torch.int64, device=device)
        cases.append(Case(
            "rerotate_keys", f"T{T}",
            lambda be, a=(keys, delta, inv_freq): rerotate_keys(*a, backend=be),
            2 * _nbytes(keys) + _nbytes(delta), f"keys[1,{Hkv},{T},{D}]",
        ))
    return cases


def _max_abs_diff(a: Any, b: Any) -> float:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 1 min on CPU)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    parser.add_argument("--triton-on-cpu", action="store_true", help="also time the Triton interpreter")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.triton_on_cpu:
        # Must precede the first triton import (llmsys.kernels imports it).
        os.environ["TRITON_INTERPRET"] = "1"
    from llmsys.kernels import triton_available, use_triton

    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    repeats = args.repeats or (5 if args.quick else 20)
    time_triton = triton_available() and use_triton(device) and (on_gpu or args.triton_on_cpu)

    info = machine_info()
    print(f"device: {info.get('gpu', info['cpu'])} | torch {info['torch']} | triton {info['triton']}")
    copy_bps = None
    if on_gpu:
        copy_bps = copy_bandwidth(device)
        print(f"device-to-device copy: {copy_bps / 1e9:.0f} GB/s (bytes read + written)")

    rows: list[dict[str, Any]] = []
    for case in make_cases(device, dtype, args.quick):
        backends = ["reference", "triton"] if time_triton else ["reference"]
        outputs = {}
        for be in backends:
            budget = 20.0 if (be == "triton" and not on_gpu) else None  # the interpreter is slow
            t = time_fn(lambda c=case, b=be: c.run(b), device, warmup=2, repeats=repeats, max_total_s=budget)
            outputs[be] = case.run(be)
            # On CUDA, also time the GPU alone (CUDA graph replay): small ops are launch-bound on the
            # wall clock, and bandwidth should describe the kernel.
            g = time_cuda_graph(lambda c=case, b=be: c.run(b), device, repeats=repeats) if on_gpu else None
            kernel_ms = g["median_ms"] if g else t["median_ms"]
            gbps = case.nbytes / (kernel_ms * 1e-3) / 1e9
            rows.append({
                "op": case.op, "case": case.name, "shape": case.shape, "dtype": dtype_name,
                "backend": be, "median_ms": t["median_ms"], "min_ms": t["min_ms"], "repeats": t["repeats"],
                "graph_ms": g["median_ms"] if g else None,
                "MB_moved": case.nbytes / 1e6, "GB/s": gbps,
                "frac_of_copy": (gbps * 1e9 / copy_bps) if copy_bps else None,
            })
        if len(outputs) == 2:
            diff = _max_abs_diff(outputs["triton"], outputs["reference"])
            rows[-1]["max_abs_diff"] = diff
            rows[-1]["speedup"] = rows[-2]["median_ms"] / rows[-1]["median_ms"]  # wall clock
        print(f"  {case.op:27s} {case.name:22s} done", file=sys.stderr)

    columns = ["op", "case", "backend", "median_ms", "graph_ms", "GB/s", "frac_of_copy", "speedup"]
    columns.append("max_abs_diff")
    print()
    print_table(rows, columns)

    out = Path(args.out)
    write_json(out / "kernels.json", {
        "machine": info,
        "device": str(device),
        "dtype": str(dtype),
        "quick": args.quick,
        "copy_bandwidth_GBps": copy_bps / 1e9 if copy_bps else None,
        "bytes_model": "unique bytes read + written (inputs once, outputs); two-pass kernels read K twice",
        "timing": "median_ms: wall clock per call (incl. Python dispatch + launches), median over repeats; "
        "graph_ms (CUDA): GPU time per call from CUDA-graph replays; GB/s uses graph_ms when present",
        "results": rows,
    })
    labels = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in rows))  # ordered, unique
    series = {}
    for be in ("reference", "triton"):
        by_label = {f"{r['op']}\n{r['case']}": r["median_ms"] for r in rows if r["backend"] == be}
        if by_label:
            series[be] = [by_label.get(lbl) for lbl in labels]
    where = info.get("gpu") or info["cpu"]
    bar_plot(out / "kernels.png", labels, series, ylabel="median ms (log)",
             title=f"llmsys.kernels on {where} ({dtype_name})")
    print(f"\nwrote {out / 'kernels.json'} and {out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
