"""Loading one expert-parallel rank's experts from a checkpoint (`load_expert_parallel`).

Every family's tiny model is saved with `save_pretrained` (several safetensors files + an index);
each rank's loaded model must equal `from_pretrained` + the sharding `ExpertParallel` applies, bit
for bit, while reading only the held experts' bytes; the fused on-disk layout (what
`from_pretrained` also accepts) and dtype casts are checked the same way; a 2-process gloo run on
the loaded ranks matches the single-process model; layouts it cannot read raise errors naming the fix.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmsys.models import (
    UnsupportedCheckpointError,
    UnsupportedModelError,
    expert_parameter_bytes,
    held_experts,
    moe_blocks,
    shard_experts,
)
from llmsys.moe import (
    EPCase,
    EPLBGreedy,
    Placement,
    PlacementConstraintError,
    RoutingRecorder,
    Topology,
    check_expert_parallel,
    load_expert_parallel,
    rank_experts,
)
from llmsys.moe.parallel import CATEGORIES
from llmsys.testing import MOE_FAMILIES, tiny_model

# 6 slots on 2 ranks: expert 3 of layer 0 is on both ranks and twice on rank 0; layer 1 has a
# cross-rank replica of expert 1 and an empty slot
PHY2LOG = np.array([[0, 3, 3, 1, 2, 3], [2, 1, 0, 3, 1, -1]])
HELD = [[[0, 3], [0, 1, 2]], [[1, 2, 3], [1, 3]]]  # [rank][layer], sorted as ExpertParallel keeps them


def _placement(num_experts=4):
    return Placement(PHY2LOG, num_experts, Topology.make(2))


def _save(family, path, *, fused=False, max_shard_size="100KB", **config):
    model = tiny_model(family, **config)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if fused:  # the in-memory [E, ...] tensors on disk, under their in-memory names
        for name in os.listdir(path):
            if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
                os.remove(os.path.join(path, name))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight")
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return model


def _reference(path, rank, placement, **kwargs):
    """from_pretrained + the sharding ExpertParallel's entry applies on `rank`."""
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    full = sum(expert_parameter_bytes(b.experts) for b in moe_blocks(model))
    for block, keep in zip(moe_blocks(model), rank_experts(placement, rank)):
        shard_experts(block.experts, keep)
    return model, full


def _assert_same(got, ref):
    g, r = dict(got.named_parameters()), dict(ref.named_parameters())
    assert g.keys() == r.keys()
    for name, p in r.items():
        assert g[name].dtype == p.dtype and g[name].shape == p.shape, name
        assert torch.equal(g[name], p), name
        assert g[name].requires_grad == p.requires_grad, name
    gb, rb = dict(got.named_buffers()), dict(ref.named_buffers())
    assert gb.keys() == rb.keys()
    for name, b in rb.items():
        assert torch.equal(gb[name], b), name
    for gblock, rblock in zip(moe_blocks(got), moe_blocks(ref)):
        assert held_experts(gblock.experts) == held_experts(rblock.experts)
        assert gblock.experts.num_experts == rblock.experts.num_experts
    assert got.training is False


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_rank_model_equals_full_load_then_shard(family, tmp_path):
    _save(family, tmp_path)
    files = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()  # a sharded checkpoint
    placement = _placement()
    for rank in range(2):
        ref, full = _reference(tmp_path, rank, placement)
        got, info = load_expert_parallel(tmp_path, placement, rank, output_loading_info=True)
        _assert_same(got, ref)
        assert [list(h) for h in info.held] == HELD[rank]
        assert info.layout == "per-expert" and info.ignored_keys == []
        assert len(info.files) == len(files)
        # memory: the placement's share of the experts, read from disk and held
        row = full // (2 * 4)  # bytes of one expert (2 MoE layers x 4 experts, same shapes)
        share = sum(len(h) for h in HELD[rank]) * row
        assert sum(expert_parameter_bytes(b.experts) for b in moe_blocks(got)) == share
        assert info.expert_bytes_read == share < info.expert_bytes_total == full
        # ExpertParallel's entry keeps exactly these rows: it must reuse them (no copy)
        for block, keep in zip(moe_blocks(got), rank_experts(placement, rank)):
            before = [p.data_ptr() for p in block.experts.parameters()]
            shard_experts(block.experts, keep)
            assert [p.data_ptr() for p in block.experts.parameters()] == before


def test_bytes_read_are_the_held_rows_only(tmp_path):
    """Count independently: the per-expert tensors of the held experts are all the expert bytes read."""
    _save("olmoe", tmp_path, max_shard_size="10GB")
    placement = _placement()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for rank in range(2):
        _, info = load_expert_parallel(tmp_path, placement, rank, output_loading_info=True)
        wanted = 0
        for layer, keep in enumerate(HELD[rank]):
            for e in keep:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    wanted += 4 * int(np.prod(sizes[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]))
        assert info.expert_bytes_read == wanted


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_layout_and_dtype_cast(family, tmp_path):
    _save(family, tmp_path, fused=True)
    placement = _placement()
    for rank in range(2):
        ref, full = _reference(tmp_path, rank, placement, dtype=torch.bfloat16)
        got, info = load_expert_parallel(tmp_path, placement, rank, dtype=torch.bfloat16, output_loading_info=True)
        _assert_same(got, ref)
        assert info.layout == "fused"
        assert got.dtype == torch.bfloat16
        # on disk float32: read bytes are twice the bf16 bytes held
        held = sum(expert_parameter_bytes(b.experts) for b in moe_blocks(got))
        assert info.expert_bytes_read == 2 * held == 2 * sum(len(h) for h in HELD[rank]) * full // 8


def test_checkpoint_dtype_and_tied_embeddings(tmp_path):
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    placement = _placement()
    ref, _ = _reference(tmp_path, 1, placement)
    got = load_expert_parallel(tmp_path, placement, 1)
    assert got.dtype == torch.bfloat16  # dtype=None follows the checkpoint, as from_pretrained
    _assert_same(got, ref)
    assert got.lm_head.weight is got.model.embed_tokens.weight


def _ids(batch, seq=12, seed=0):
    return torch.randint(3, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_two_processes_load_their_experts_and_match_one_process(tmp_path):
    cases, fulls = [], []
    for i, family in enumerate(MOE_FAMILIES):
        path = tmp_path / family
        model = _save(family, path)
        ids = _ids(4, seed=i)
        with torch.no_grad(), RoutingRecorder(model) as rec:
            model(ids)
        placement = EPLBGreedy(2, num_slots=6)(rec.trace()) if i % 2 else _placement()
        fulls.append(sum(expert_parameter_bytes(b.experts) for b in moe_blocks(model)))
        cases.append(EPCase(family, placement, ids, checkpoint=str(path)))
    for check, full in zip(check_expert_parallel(cases, world_size=2), fulls):
        assert check.max_abs_diff <= 1e-5, (check.family, check.max_abs_diff)
        for key in (*CATEGORIES, "total"):
            np.testing.assert_array_equal(check.measured[key], check.predicted[key], err_msg=f"{check.family} {key}")
        assert check.memory_match and check.reentry_diff == 0.0, check.family
        # loaded sharded: what the rank holds on entry is already its share, and that is all it read
        assert check.entry_expert_bytes == check.held_expert_bytes == check.expected_expert_bytes
        assert check.expert_bytes_read == check.held_expert_bytes
        assert max(check.held_expert_bytes) < full
        assert all(e is not None and "holds only experts" in e for e in check.outside_errors)


def _rewrite(path, change):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_errors_name_the_fix(tmp_path):
    good = tmp_path / "good"
    _save("mixtral", good, max_shard_size="10GB")
    placement = _placement()

    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        load_expert_parallel(tmp_path / "nowhere", placement, 0)

    no_safetensors = tmp_path / "bin"
    no_safetensors.mkdir()
    shutil.copy(good / "config.json", no_safetensors / "config.json")
    torch.save({}, no_safetensors / "pytorch_model.bin")
    with pytest.raises(UnsupportedCheckpointError, match=r"no model.safetensors.*from_pretrained"):
        load_expert_parallel(no_safetensors, placement, 0)

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    with pytest.raises(UnsupportedModelError, match="supported MoE families"):
        load_expert_parallel(dense, placement, 0)

    # a placement of another model: experts, layers; a rank outside it
    with pytest.raises(PlacementConstraintError, match=r"2 MoE layers x 8 experts .* 2 x 4"):
        load_expert_parallel(good, Placement(np.array([list(range(8))] * 2), 8, Topology.make(2)), 0)
    with pytest.raises(PlacementConstraintError, match=r"3 MoE layers x 4 experts .* 2 x 4"):
        load_expert_parallel(good, Placement(np.array([[0, 1, 2, 3]] * 3), 4, Topology.make(2)), 0)
    with pytest.raises(PlacementConstraintError, match="rank 2 is outside"):
        load_expert_parallel(good, placement, 2)

    def variant(name, change, pattern, config=None):
        path = tmp_path / name
        shutil.copytree(good, path)
        _rewrite(path, change)
        if config:
            cfg = json.loads((path / "config.json").read_text())
            cfg.update(config)
            (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedCheckpointError, match=pattern):
            load_expert_parallel(path, placement, 0)

    key = "model.layers.0.block_sparse_moe.experts.{}.{}"
    # per-expert biases (a layout the fused parameters have no place for)
    variant(
        "bias",
        lambda t: t.update({key.format(0, "w1.bias"): torch.zeros(128)}),
        r"does not know how to place.*w1\.bias",
    )
    # an expert beyond num_experts
    variant("extra", lambda t: t.update({key.format(4, "w1.weight"): torch.zeros(128, 64)}), r"experts\.4\.w1")

    def rename(t):  # unknown projection names
        for e in range(4):
            t[key.format(e, "fc1.weight")] = t.pop(key.format(e, "w1.weight"))

    variant("names", rename, r"neither stored fused .* nor per expert.*from_pretrained")
    # a tensor the model needs is missing (from_pretrained would initialise it randomly)
    variant("missing", lambda t: t.pop("model.norm.weight"), r"lacks tensors.*model\.norm\.weight")
    # a config that does not match the tensors: wrong shapes, never a silent reinterpretation
    variant(
        "shape",
        lambda t: None,
        r"experts\.0\.w1\.weight is \[128, 64\], expected \[96, 64\]",
        {"intermediate_size": 96},
    )


def test_set_held_experts_matches_shard_experts_and_checks_its_input():
    from llmsys.models import set_held_experts

    full, cut = tiny_model("qwen2_moe"), tiny_model("qwen2_moe")
    experts, target = moe_blocks(full)[0].experts, moe_blocks(cut)[0].experts
    rows = {n: getattr(experts, n).detach()[[3, 1]].clone() for n in ("gate_up_proj", "down_proj")}
    with pytest.raises(ValueError, match="rows of shape"):
        set_held_experts(experts, [3, 1, 0], rows)
    with pytest.raises(ValueError, match="distinct experts"):
        set_held_experts(experts, [3, 3], rows)
    set_held_experts(experts, [3, 1], rows)
    shard_experts(target, [3, 1])
    assert held_experts(experts) == held_experts(target) == (3, 1) and experts.num_experts == 2
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(experts, name), getattr(target, name))
    hidden = torch.randn(5, 64)
    idx, w = torch.tensor([[3, 1]] * 5), torch.rand(5, 2)
    assert torch.equal(experts(hidden, idx, w), target(hidden, idx, w))  # global ids, as after shard_experts
    with pytest.raises(ValueError, match="already sharded"):
        set_held_experts(experts, [3], {n: t[:1] for n, t in rows.items()})


def test_dense_mlp_layers_are_read_whole(tmp_path):
    # Qwen3-MoE with a dense first layer: the placement covers the 2 MoE layers (decoder layers 1, 2)
    _save("qwen3_moe", tmp_path, num_hidden_layers=3, mlp_only_layers=[0])
    placement = _placement()
    ref, _ = _reference(tmp_path, 0, placement)
    got = load_expert_parallel(tmp_path, placement, 0)
    assert [b.layer_idx for b in moe_blocks(got)] == [1, 2]
    _assert_same(got, ref)
