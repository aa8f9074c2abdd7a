"""Data-parallel QZO: 2 CPU processes (gloo) end with scales bit-identical to one process over the same
global batch, and exchange exactly one scalar per step.

The workers are this file run as a script (``python test_qzo_ddp.py --worker RANK ...``), so nothing has
to be importable by name in the child processes. The model is a small int4 MLP rather than a
transformers model so that each child starts in ~2 s (importing transformers alone takes ~5 s here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS = 3


def data(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(8, 64, generator=gen)
    return {"x": x, "y": torch.sin(x[:, :32] * 2)}


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def build():
    from llmsys.qzo import QZO, Int4Linear

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32)]
    model = torch.nn.Sequential(*[Int4Linear.from_linear(m, 32, backend="reference") if isinstance(m, torch.nn.Linear)
                                  else m for m in layers])
    return model, QZO(model, lr=1e-2, seed=7)


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from llmsys.qzo import quantized_scales, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    model, opt = build()
    train(model, opt, data, STEPS, loss_fn=mse, progress=False)
    dist.all_reduce = original
    if rank == 0:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in quantized_scales(model)}, out)
        Path(out + ".json").write_text(json.dumps({"all_reduce_numel": calls}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~10-20 s on 2 busy cores
def test_two_processes_match_one_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from llmsys.qzo import quantized_scales, train

    out = str(tmp_path / "ddp.safetensors")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(r), "2", str(port), out], env=env)
        for r in range(2)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0]

    model, opt = build()  # one process, the same global batch as 2 micro-batches (= the 2 shards)
    train(model, opt, data, STEPS, loss_fn=mse, micro_batches=2, progress=False)
    ddp = load_file(out)
    single = dict(quantized_scales(model))
    assert set(ddp) == set(single)
    start, _ = build()
    assert any(not torch.equal(single[n], t) for n, t in quantized_scales(start))  # training moved them
    for name, t in single.items():
        assert torch.equal(ddp[name], t), name
    assert json.loads(Path(out + ".json").read_text())["all_reduce_numel"] == [1] * STEPS


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
