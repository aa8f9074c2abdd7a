"""Running kvpress beside llmsys, shared by benchmarks/filter.py and benchmarks/kv.py.

kvpress pins transformers < 5.3 and llmsys needs >= 5.17, so kvpress runs in its own environment
(`.venv-kvpress`): the benchmark saves the model and its prompts to a temporary folder and re-runs
its own script there with ``--kvpress-worker FOLDER``; the worker writes ``kvpress.pt`` back.
This module imports no llmsys at module level, so the worker side can import it too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser, ratio: float) -> None:
    """The kvpress options of a benchmark: the environment's python and the (hidden) worker flags."""
    parser.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress/bin/python"))
    parser.add_argument("--kvpress-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kvpress-window", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--kvpress-kernel", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--kvpress-ratio", type=float, default=ratio, help=argparse.SUPPRESS)


def run_worker(
    script: str, python: str, model: Any, save_prompts: Callable[[Path], None], window: int, kernel: int, ratio: float
) -> dict[str, Any]:
    """Save `model` and the prompts (`save_prompts(folder)`), run `script`'s worker in the kvpress
    environment, and return what it wrote (or ``{"status": "failed", ...}``)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        save_prompts(Path(tmp))
        cmd = [python, str(Path(script).resolve()), "--kvpress-worker", tmp, "--kvpress-window", str(window),
               "--kvpress-kernel", str(kernel), "--kvpress-ratio", repr(ratio)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0:
            return {"status": "failed", "command": " ".join(cmd), "stderr": done.stderr[-3000:]}
        return torch.load(Path(tmp) / "kvpress.pt")


# -- worker side (kvpress environment) -----------------------------------------------------------


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "model", attn_implementation="sdpa").eval()


def recording(press_class: type) -> type:
    """`press_class` that also records, per prompt and layer, its scores and the kept indices per head
    into ``press.records[-1][layer_idx]`` (append a dict per prompt before running it)."""
    from kvpress.utils import compute_n_kept

    class Recording(press_class):  # type: ignore[misc, valid-type]
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
            kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
            self.records[-1][module.layer_idx] = {"scores": scores[0].float(), "indices": kept[0]}
            return super().compress(module, hidden_states, keys, values, attentions, kwargs)

    return Recording


def versions() -> dict[str, str]:
    import transformers

    return {"kvpress": importlib.metadata.version("kvpress"), "transformers": str(transformers.__version__),
            "torch": str(torch.__version__)}  # fmt: skip


# -- llmsys side ------------------------------------------------------------------------------------


def recording_snapkv() -> type:
    """llmsys's SnapKV that remembers the scores it ranked (``layer.policy_state["scores"]``)."""
    from dataclasses import dataclass

    from llmsys.kv import SnapKV, snapkv_scores

    @dataclass
    class RecordingSnapKV(SnapKV):
        def compact(self, layer: Any, step: Any) -> None:
            if step.is_prefill and layer.length > self.budget:
                keys, _ = layer.to_dense()
                queries = step.queries[:, :, -min(self.window, step.query_length, self.budget) :]
                layer.policy_state["scores"] = snapkv_scores(queries, keys, self.kernel)[0]
            super().compact(layer, step)

    return RecordingSnapKV
