"""Deployment formats: SGLang, vLLM, vLLM-Ascend, and the errors engines' constraints call for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmsys.moe import (
    EPLBGreedy,
    MoETuner,
    Placement,
    PlacementConstraintError,
    Topology,
    check_deployable,
    export,
    pad_with_replicas,
    synthetic_trace,
    to_sglang,
    to_vllm,
    to_vllm_ascend,
    vllm_eplb_state,
)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(8, 4, 2, 400, seed=0)


@pytest.fixture(scope="module")
def placement(trace):
    return EPLBGreedy(4, num_slots=12)(trace)  # 3 slots per GPU, 4 replicas


def test_sglang_files_load_the_way_sglang_reads_them(tmp_path, placement):
    to_sglang(placement, tmp_path / "loc.json")
    to_sglang(placement, tmp_path / "loc.pt")
    from_json = json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"]
    from_pt = torch.load(tmp_path / "loc.pt", weights_only=True)["physical_to_logical_map"]
    np.testing.assert_array_equal(np.array(from_json), placement.phy2log)
    np.testing.assert_array_equal(from_pt.numpy(), placement.phy2log)
    # SGLang: rank r owns slots [r * n_local, (r + 1) * n_local)
    n_local = from_pt.shape[1] // 4
    for r in range(4):
        owned = from_pt[:, r * n_local : (r + 1) * n_local].numpy()
        np.testing.assert_array_equal(owned, placement.phy2log[:, placement.gpu_of_slot() == r])
    with pytest.raises(ValueError, match=r"\.json or \.pt"):
        to_sglang(placement, tmp_path / "loc.txt")


def test_vllm_tensor_and_eplb_state(tmp_path, placement):
    t = to_vllm(placement, tmp_path / "p2l.pt")
    assert t.dtype == torch.int64 and t.shape == (4, 12)
    assert torch.equal(torch.load(tmp_path / "p2l.pt", weights_only=True), t)
    state = vllm_eplb_state(placement)
    l2p, cnt = state["logical_to_physical_map"], state["logical_replica_count"]
    for l in range(4):
        for e in range(8):
            slots = l2p[l, e][l2p[l, e] >= 0]
            assert len(slots) == cnt[l, e]
            assert (t[l, slots] == e).all()
    assert int(cnt.sum()) == 4 * 12


def test_vllm_ascend_layer_list(tmp_path, placement):
    data = to_vllm_ascend(placement, tmp_path / "map.json")
    again = json.loads((tmp_path / "map.json").read_text())
    assert again == data and data["moe_layer_count"] == 4
    layer = data["layer_list"][2]
    assert layer["layer_id"] == 2 and layer["device_count"] == 4
    devices = np.array([d["device_expert"] for d in layer["device_list"]])
    np.testing.assert_array_equal(devices.ravel(), placement.phy2log[2])


def test_engine_constraint_errors_name_the_fix(trace, placement):
    with pytest.raises(PlacementConstraintError, match="not divisible by ep_size=8"):
        to_sglang(placement, ep_size=8)
    with pytest.raises(PlacementConstraintError, match="re-solve with topology=6"):
        to_vllm(placement, ep_size=6)
    unequal = MoETuner(3, equal_per_gpu=False, time_limit=5, refine="none")(trace)
    assert not unequal.is_equal_per_gpu()
    with pytest.raises(PlacementConstraintError, match="pad_with_replicas"):
        to_vllm_ascend(unequal)
    with pytest.raises(ValueError, match="unknown format"):
        export(placement, "tensorrt", "x.json")


def test_pad_with_replicas_makes_a_placement_deployable_without_moving_experts(trace):
    phy = np.array([[0, 1, 2, 3, 4, 5, 6, -1], [0, 1, 2, -1, 3, 4, 5, 6]] * 2)
    unequal = Placement(phy, 7, Topology.make(2))
    load = np.ones((7, 4))
    load[6] = 10.0
    padded = pad_with_replicas(unequal, load)
    assert check_deployable(padded) == 2
    kept = unequal.phy2log >= 0
    np.testing.assert_array_equal(padded.phy2log[kept], unequal.phy2log[kept])
    assert (padded.phy2log[~kept] == 6).all()  # the hottest expert fills the holes
