"""Routing traces: recorder over every MoE family, statistics, persistence, importers, synthetic traces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsys.models import UnsupportedModelError, forward, moe_blocks
from llmsys.moe import RoutingRecorder, RoutingTrace, TraceError, load_trace, synthetic_shape_trace, synthetic_trace
from llmsys.moe.trace import zipf_exponent
from llmsys.testing import every_moe_family, tiny_model


def _ids(batch=2, seq=12, seed=0):
    return torch.randint(3, 500, (batch, seq), generator=torch.Generator().manual_seed(seed))


@every_moe_family
def test_recorder_records_what_each_router_chose(family):
    model = tiny_model(family)
    blocks = moe_blocks(model)
    inputs = {}  # the MoE blocks' inputs, captured independently of the recorder
    handles = [
        b.block.register_forward_hook(lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0].detach()))
        for i, b in enumerate(blocks)
    ]
    ids = [_ids(2, 12, 0), _ids(1, 5, 1)]
    with torch.no_grad(), RoutingRecorder(model) as rec:
        for chunk in ids:
            forward(model, chunk)
    for h in handles:
        h.remove()
    trace = rec.trace()
    assert trace.topk.shape == (2 * 12 + 5, len(blocks), blocks[0].top_k)
    assert trace.layer_ids == tuple(b.layer_idx for b in blocks)
    for i, b in enumerate(blocks):
        hidden = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[i]])
        with torch.no_grad():
            expected = b.router(hidden)[2]
        np.testing.assert_array_equal(trace.topk[:, i], expected.numpy())
    assert all(not b.router._forward_hooks for b in blocks)  # hooks removed on exit
    # every token lands on top_k distinct experts in every layer
    np.testing.assert_array_equal(trace.load.sum(axis=0), np.full(len(blocks), trace.num_tokens * trace.top_k))


def test_recorder_skips_dense_layers_and_rejects_dense_models():
    model = tiny_model("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    with torch.no_grad(), RoutingRecorder(model) as rec:
        forward(model, _ids())
    assert rec.trace().layer_ids == (0, 2)
    with pytest.raises(UnsupportedModelError):
        RoutingRecorder(tiny_model("llama"))


def _reference_transitions(topk: np.ndarray, E: int) -> np.ndarray:
    T, L, k = topk.shape
    R = np.zeros((E, E, L - 1))
    for t in range(T):
        for l in range(L - 1):
            for a in topk[t, l]:
                for b in topk[t, l + 1]:
                    if a >= 0 and b >= 0:
                        R[a, b, l] += 1
    return R


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_load_and_transitions_match_a_token_by_token_count(T, L, k, seed):
    rng = np.random.default_rng(seed)
    E = 6
    topk = np.stack([[rng.choice(E, k, replace=False) for _ in range(L)] for _ in range(T)])
    topk[rng.random(topk.shape) < 0.1] = -1  # engine padding
    trace = RoutingTrace(topk, E)
    np.testing.assert_array_equal(trace.transitions, _reference_transitions(topk, E))
    for l in range(L):
        expected = np.bincount(topk[:, l][topk[:, l] >= 0], minlength=E)
        np.testing.assert_array_equal(trace.load[:, l], expected)
    if (topk >= 0).all():  # each token counts once per (e1, e2) pair: k transitions per assignment
        np.testing.assert_array_equal(trace.transitions.sum(axis=1), k * trace.load[:, :-1])
        np.testing.assert_array_equal(trace.transitions.sum(axis=0), k * trace.load[:, 1:])


def test_save_load_roundtrip_and_bad_files(tmp_path):
    trace = synthetic_trace(8, 4, 2, 50, seed=3)
    trace = RoutingTrace(trace.topk, 8, (1, 3, 5, 7), "unit test")
    path = trace.save(tmp_path / "t")
    again = load_trace(path)
    np.testing.assert_array_equal(again.topk, trace.topk)
    assert (again.num_experts, again.layer_ids, again.source) == (8, (1, 3, 5, 7), "unit test")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TraceError, match="not a RoutingTrace"):
        load_trace(tmp_path / "other.npz")


def test_trace_validation():
    with pytest.raises(TraceError, match="num_experts"):
        RoutingTrace(np.array([[[0, 8]]]), 8)
    with pytest.raises(TraceError, match="tokens, layers, k"):
        RoutingTrace(np.zeros((3, 2)), 8)
    with pytest.raises(TraceError, match="layer_ids"):
        RoutingTrace(np.zeros((3, 2, 1), dtype=int), 8, (0,))


def test_vllm_import_concatenates_requests():
    a = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])  # [seq=2, layers=2, topk=2]
    b = torch.tensor([[[3, 2], [1, 0]]])
    trace = RoutingTrace.from_vllm([a, b], num_experts=4)
    assert trace.topk.shape == (3, 2, 2)
    np.testing.assert_array_equal(trace.topk[2], b[0].numpy())
    with pytest.raises(TraceError, match="seq, layers, topk"):
        RoutingTrace.from_vllm(np.zeros((2, 2)), 4)


def test_sglang_import_transposes_and_drops_padding(tmp_path):
    ids = torch.tensor([[[0, 1], [2, 3], [-1, -1]], [[1, 2], [3, 0], [-1, -1]]])  # [layers=2, tokens=3, k]
    torch.save({"topk_ids_of_layer": ids, "rank": 0}, tmp_path / "dump.pt")
    trace = RoutingTrace.from_sglang([tmp_path / "dump.pt", {"topk_ids_of_layer": ids[:, :1]}], num_experts=4)
    assert trace.topk.shape == (3, 2, 2)  # 2 real tokens from the file + 1 from the dict
    np.testing.assert_array_equal(trace.topk[1], [[2, 3], [3, 0]])
    with pytest.raises(TraceError, match="topk_ids_of_layer"):
        RoutingTrace.from_sglang({"logical_count": ids}, 4)


def test_concat_and_select():
    t1, t2 = synthetic_trace(8, 3, 2, 10, seed=1), synthetic_trace(8, 3, 2, 7, seed=2)
    both = RoutingTrace.concat([t1, t2])
    assert both.num_tokens == 17
    np.testing.assert_array_equal(both.select(slice(10, None)).topk, t2.topk)
    with pytest.raises(TraceError):
        RoutingTrace.concat([t1, synthetic_trace(4, 3, 2, 5)])


def _hot_ratio(trace):
    P = trace.load
    return float((P.max(axis=0) / P.mean(axis=0)).mean())


def _successor_concentration(trace):
    """Mean over (layer, expert) of the share of its tokens that go to its most frequent successor."""
    R = trace.transitions
    rows = R.sum(axis=1)
    return float((R.max(axis=1)[rows > 0] / rows[rows > 0]).mean())


def test_synthetic_skew_and_affinity_do_what_they_say():
    base = dict(num_experts=16, num_layers=6, top_k=2, num_tokens=4000, seed=0)
    ratios = [_hot_ratio(synthetic_trace(**base, skew=s, affinity=0.0)) for s in (0.0, 0.6, 1.2)]
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[0] < 1.25  # uniform popularity: only sampling noise
    conc = [_successor_concentration(synthetic_trace(**base, skew=0.0, affinity=a)) for a in (0.0, 0.5, 1.0)]
    assert conc[0] < conc[1] < conc[2]
    # the same seed gives the same trace
    np.testing.assert_array_equal(synthetic_trace(**base).topk, synthetic_trace(**base).topk)
    for bad in (dict(affinity=1.5), dict(skew=-1.0), dict(top_k=20)):
        with pytest.raises(ValueError):
            synthetic_trace(**{**base, **bad})


@pytest.mark.parametrize("E", [8, 64, 256])
def test_default_skew_gives_the_documented_hot_ratio(E):
    s = zipf_exponent(E, 3.0)
    weights = 1.0 / np.arange(1, E + 1) ** s
    assert abs(weights.max() / weights.mean() - 3.0) < 1e-3


def test_shape_presets():
    trace = synthetic_shape_trace("mixtral", 64)
    assert (trace.num_experts, trace.num_layers, trace.top_k) == (8, 32, 2)
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic_shape_trace("gpt5", 10)


def test_sample_seed_draws_new_tokens_from_the_same_model():
    base = dict(num_experts=8, num_layers=4, top_k=2, num_tokens=20000, seed=3)
    a, b = synthetic_trace(**base, sample_seed=1), synthetic_trace(**base, sample_seed=2)
    other = synthetic_trace(**{**base, "seed": 4}, sample_seed=1)
    assert not np.array_equal(a.topk, b.topk)
    np.testing.assert_array_equal(a.topk, synthetic_trace(**base, sample_seed=1).topk)

    def shares(t):
        return t.load / t.load.sum(axis=0)

    same = np.abs(shares(a) - shares(b)).max()
    assert same < 0.02  # sampling noise only
    assert np.abs(shares(a) - shares(other)).max() > 5 * same  # another model differs for real
    assert "sample_seed=1" in a.source


def test_stats_read_skew_and_inter_layer_dependence():
    E, T = 8, 4000
    rng = np.random.default_rng(0)
    first = rng.integers(0, E, T)
    perm = rng.permutation(E)
    chained = RoutingTrace(np.stack([first, perm[first]], axis=1)[:, :, None], E)  # layer 1 = f(layer 0)
    independent = RoutingTrace(rng.integers(0, E, (T, 2, 1)), E)
    st_chained, st_independent = chained.stats(), independent.stats()
    assert abs(st_chained["interlayer_mi"] - np.log(E)) < 0.01  # the next expert is known: MI = H = log E
    assert st_chained["interlayer_mi_shuffled"] < 0.02
    assert abs(st_independent["interlayer_mi"] - st_independent["interlayer_mi_shuffled"]) < 0.01
    skewed = RoutingTrace(np.array([[[0]], [[0]], [[0]], [[1]]]), 2)  # loads 3 and 1: hottest / mean = 1.5
    assert skewed.stats()["hot_ratio"] == 1.5 and skewed.stats()["hot_ratio_max"] == 1.5


def test_from_file_names_the_fix_for_files_that_are_not_traces(tmp_path):
    np.save(tmp_path / "routed.npy", np.zeros((3, 2, 2), dtype=np.int64))  # a raw engine dump
    with pytest.raises(TraceError, match="from_vllm"):
        RoutingTrace.from_file(tmp_path / "routed.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a numpy file at all")
    with pytest.raises(TraceError, match="not a RoutingTrace file"):
        RoutingTrace.from_file(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        RoutingTrace.from_file(tmp_path / "missing.npz")
