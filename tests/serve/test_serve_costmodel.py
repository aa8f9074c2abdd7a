"""The cost model: diminishing returns in the SM share, contention, profiles and their fitting."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from llmsys.serve import BatchWork, CostModel, ModelShape, Profile, ProfileError, default_profile
from llmsys.serve.costmodel import quantize_share
from llmsys.serve.profile import Sample, fit_cpu_profile, fit_gpu_profile, profile_cpu
from llmsys.testing import tiny_model

PREFILL = BatchWork.prefill_only([(0, 2048)])
DECODE = BatchWork.decode_only([1024] * 64)


def test_latency_falls_with_the_share_and_saturates():
    cm = CostModel(default_profile())
    shares = [k / 16 for k in range(1, 17)]
    for work in (PREFILL, DECODE, BatchWork.prefill_only([(0, 64)])):
        times = [cm.latency(work, s) for s in shares]
        assert all(a >= b for a, b in zip(times, times[1:]))
    # a small prefill has too few GEMM tiles for the whole device; decode saturates the bandwidth early
    small = BatchWork.prefill_only([(0, 64)])
    assert cm.latency(small, 0.5) == pytest.approx(cm.latency(small, 1.0))
    assert cm.latency(DECODE, 0.5) == pytest.approx(cm.latency(DECODE, 1.0), rel=0.05)
    assert cm.latency(PREFILL, 0.5) > 1.8 * cm.latency(PREFILL, 1.0) - cm.profile.overhead_s


def test_contention_hurts_decode_more_than_prefill():
    cm = CostModel(default_profile())
    d_alone, d_next = cm.latency(DECODE, 0.5), cm.latency(DECODE, 0.5, PREFILL, 0.5)
    p_alone, p_next = cm.latency(PREFILL, 0.5), cm.latency(PREFILL, 0.5, DECODE, 0.5)
    assert d_next > d_alone and p_next > p_alone
    assert d_next / d_alone > p_next / p_alone
    no_contention = CostModel(
        replace(default_profile(), contention_memory=0.0, contention_cache=0.0, contention_compute=0.0)
    )
    assert no_contention.latency(DECODE, 0.5, PREFILL, 0.5) == pytest.approx(no_contention.latency(DECODE, 0.5))


def test_mixed_batches_pay_the_decode_penalty():
    cm = CostModel(default_profile())
    mixed = BatchWork(prefill_tokens=512, prefill_seqs=1, prefill_pairs=512 * 513 / 2, decode_seqs=64,
                      decode_kv=64 * 1024)  # fmt: skip
    apart = replace(mixed, decode_seqs=0, decode_kv=0)
    t = cm.terms(mixed)
    assert t.decode_attention == pytest.approx(2.0 * cm.terms(BatchWork.decode_only([1024] * 64)).decode_attention)
    assert cm.terms(apart).decode_attention == 0


def test_model_shapes():
    model = tiny_model("llama")
    shape = ModelShape.from_model(model)
    assert shape.weight_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert shape.num_layers == 2 and shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    big = ModelShape.llama3_8b()
    assert 15.5e9 < big.weight_bytes < 16.5e9 and big.kv_bytes_per_token == 131072
    assert 420_000 < default_profile().kv_capacity_tokens() < 440_000


def test_profile_json_round_trip_and_errors(tmp_path):
    p = default_profile()
    path = p.save(tmp_path / "p.json")
    assert Profile.load(path) == p
    data = json.loads(path.read_text())
    for broken, match in (
        ({**data, "version": 99}, "version"),
        ({**data, "warp_speed": 1}, "unknown profile fields"),
        ({k: v for k, v in data.items() if k != "flops"}, "malformed"),
        ({**data, "flops": 0}, "flops must be > 0"),
        ({**data, "sm_granularity": 500}, "sm_granularity"),
    ):
        (tmp_path / "b.json").write_text(json.dumps(broken))
        with pytest.raises(ProfileError, match=match):
            Profile.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        Profile.load(tmp_path / "c.json")
    with pytest.raises(ProfileError, match="serve profile"):
        Profile.load(tmp_path / "missing.json")


def test_quantize_share():
    p = default_profile()
    assert quantize_share(0.5, p) == 0.5 and quantize_share(0.0, p) == 1 / 16 and quantize_share(2.0, p) == 1.0


def _cpu_truth() -> Profile:
    return Profile(
        name="truth", source="test", device="cpu", model=ModelShape.from_model(tiny_model("llama")),
        flops=2e10, attention_flops=5e9, bandwidth=1e30, attention_bandwidth=3e8,
        overhead_s=2e-3, per_seq_s=1e-4, per_prefill_seq_s=5e-4,
    )  # fmt: skip


def test_cpu_fit_recovers_a_known_profile():
    truth = CostModel(_cpu_truth())
    works = [BatchWork.prefill_only([(s, n)]) for s, n in ((0, 8), (0, 64), (0, 256), (128, 64))]
    works += [BatchWork.decode_only([kv] * b) for b in (1, 4, 16) for kv in (32, 256)]
    works += [BatchWork.prefill_only([(0, 32)] * 3)]
    samples = [Sample(w, truth.latency(w)) for w in works]
    fitted = fit_cpu_profile(samples, truth.profile.model)
    for name in ("overhead_s", "per_seq_s", "per_prefill_seq_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth.profile, name), rel=1e-3)
    for name in ("flops", "attention_flops", "attention_bandwidth"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth.profile, name), rel=1e-3)
    assert fitted.fit["max_abs_rel_error"] < 1e-3
    with pytest.raises(ProfileError, match="at least 6"):
        fit_cpu_profile(samples[:3], truth.profile.model)


def test_gpu_fit_reproduces_a_known_profile():
    truth = replace(default_profile(), bandwidth_saturation=0.4, contention_memory=0.7, mixed_decode_penalty=1.5)
    cm = CostModel(truth)
    samples = []
    for n in (256, 512, 1024, 2048, 4096):
        samples.append(Sample(BatchWork.prefill_only([(0, n)]), cm.latency(BatchWork.prefill_only([(0, n)]))))
    for b in (8, 32, 128):
        for kv in (512, 2048):
            w = BatchWork.decode_only([kv] * b)
            samples.append(Sample(w, cm.latency(w)))
    mixed = BatchWork(prefill_tokens=1024, prefill_seqs=1, prefill_pairs=1024 * 1025 / 2, decode_seqs=32,
                      decode_kv=32 * 1024)  # fmt: skip
    samples.append(Sample(mixed, cm.latency(mixed)))
    for s in (0.125, 0.25, 0.5, 0.75):
        samples.append(Sample(PREFILL, cm.latency(PREFILL, s), s))
        samples.append(Sample(DECODE, cm.latency(DECODE, s), s))
    for s in (0.5, 0.75):
        samples.append(Sample(PREFILL, cm.latency(PREFILL, s, DECODE, 1 - s), s, DECODE, 1 - s))
        samples.append(Sample(DECODE, cm.latency(DECODE, 1 - s, PREFILL, s), 1 - s, PREFILL, s))
    fitted = fit_gpu_profile(samples, replace(default_profile(), fit={}))
    assert fitted.fit["max_abs_rel_error"] < 0.03
    assert fitted.bandwidth_saturation == pytest.approx(0.4, rel=0.1)


def test_profile_cpu_is_fitted_to_the_engines_batches():
    profile = profile_cpu(tiny_model("llama", num_hidden_layers=1), quick=True)
    assert not profile.concurrent and profile.num_sms == 1
    samples = profile.fit["samples"]
    assert len(samples) >= 30 and profile.overhead_s > 0 and all(s["seconds"] > 0 for s in samples)
    assert {s["label"] for s in samples} == {"mixed", "prefill", "decode"}  # every lane kind was sampled
    assert any(s["work"]["prefill_seqs"] and s["work"]["decode_seqs"] for s in samples)  # mixed batches too
