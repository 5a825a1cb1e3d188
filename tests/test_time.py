import math

import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from anystep import time as T
from anystep.global_batch import Part


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16, 32, 50, 64])
def test_grid_equals_diffusers_scheduler(n):
    sched = FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(n)
    ours = T.grid(n)
    assert torch.allclose(ours, sched.sigmas.double() * 1000, atol=1e-9, rtol=0)
    assert torch.allclose(ours[:-1], sched.timesteps.double(), atol=1e-9, rtol=0)


def test_grid_reference_values():
    # reference table (official scheduler, shift 5)
    assert torch.allclose(T.grid(4), torch.tensor([1000, 937.5, 2500 / 3, 625, 0], dtype=torch.float64))
    assert torch.allclose(T.grid(2), torch.tensor([1000, 2500 / 3, 0], dtype=torch.float64))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_grid_rejects_bad_step_counts(bad):
    with pytest.raises(ValueError, match="steps"):
        T.grid(bad)


def test_custom_grid():
    assert T.custom_grid([1000, 500]).tolist() == [1000, 500, 0]
    with pytest.raises(ValueError, match="decreasing"):
        T.custom_grid([1000, 1000, 0])
    with pytest.raises(ValueError, match="lie in"):
        T.custom_grid([1200, 0])


@given(st.floats(0, 1, allow_subnormal=False), st.floats(0, 1, allow_subnormal=False))
@settings(max_examples=200, deadline=None)
def test_shift_is_monotone_and_fixes_endpoints(a, b):
    lo, hi = min(a, b), max(a, b)
    assert float(T.time_shift(lo)) <= float(T.time_shift(hi)) + 1e-15
    assert float(T.time_shift(0.0)) == 0.0 and float(T.time_shift(1.0)) == 1.0


def test_buckets_exact_at_batch_64():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        b = T.assign_buckets(64, generator=g)
        assert torch.bincount(b, minlength=3).tolist() == [32, 16, 16]


def test_buckets_batch_one_sees_all_three_with_the_right_frequencies():
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([T.assign_buckets(1, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64), atol=0.03)


def test_official_split_ties_buckets_to_rank_order():
    # 16 GPUs x 2: ranks 0-7 diffusion, 8-11 consistency, 12-15 free
    got = [T.assign_buckets(2, split="official", part=Part(k, 16)).tolist() for k in range(16)]
    assert got[:8] == [[0, 0]] * 8 and got[8:12] == [[1, 1]] * 4 and got[12:] == [[2, 2]] * 4
    # a batch of one on one process always lands in the same bucket (round(0.5) = 0: always 'free')
    assert {T.assign_buckets(1, split="official").item() for _ in range(10)} == {T.FREE}


def test_time_pairs_respect_buckets_and_order():
    p = T.sample_time_pairs(512, generator=torch.Generator().manual_seed(1))
    assert (p.r <= p.t).all() and (p.t <= 1000).all() and (p.r >= 0).all()
    assert torch.equal(p.t[p.bucket == T.DIFFUSION], p.r[p.bucket == T.DIFFUSION])
    assert (p.r[p.bucket == T.CONSISTENCY] == 0).all()
    free = p.bucket == T.FREE
    assert (p.r[free] < p.t[free]).all()


def test_time_pairs_max_min_distribution():
    # before the shift, t = max(u1, u2) has CDF s^2: check through the inverse shift
    p = T.sample_time_pairs(20000, generator=torch.Generator().manual_seed(2))
    s = p.t.double() / 1000
    unshifted = s / (5 - 4 * s)  # inverse of 5s/(1+4s)
    assert abs((unshifted <= 0.5).double().mean().item() - 0.25) < 0.015


def test_bf16_times_emulate_the_official_quantisation():
    p = T.sample_time_pairs(256, generator=torch.Generator().manual_seed(0), time_dtype=torch.bfloat16)
    big = p.t[p.t > 512]
    assert torch.equal(big, big.bfloat16().float())  # representable in bf16 (spacing 4 there)


def test_beta08_reference_values():
    # values computed from the official definition (reference sec. 3.6)
    for sigma, expected in [(0.05, 0.17), (0.1, 0.35), (0.25, 0.80), (0.5, 1.29), (0.9, 1.04), (0.95, 0.78)]:
        w = T.beta08_weight(torch.tensor([sigma * 1000]))
        assert abs(w.item() - expected) < 0.011, (sigma, w.item())
    g, w = T.beta08_table()
    assert abs(w.sum().item() - 1000) < 1e-9
    assert abs(g[w.argmax()].item() / 1000 - 2 / 3) < 0.01 and abs(w.max().item() - 1.41) < 0.01


def test_logit_normal_is_shifted_and_in_range():
    t = T.logit_normal(10000, generator=torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1000).all()
    # median of sigmoid(N(0,1)) is 0.5, shifted: 1000 * shift(0.5) = 833.3
    assert abs(t.median().item() - 833.33) < 10


def test_beta08_weight_answers_on_the_device_of_t():
    """The first CUDA Stage-1 step crashed here: the lookup table was made on the CPU and indexed with CUDA
    times. On ``meta`` (any device but the CPU) the weight must come back on the times' device."""
    from anystep.time import beta08_weight

    t = torch.tensor([10.0, 500.0, 990.0])
    w = beta08_weight(t.to("meta"))
    assert w.device.type == "meta" and w.shape == (3,) and w.dtype == torch.float32
    assert beta08_weight(t).device.type == "cpu"


@pytest.mark.parametrize("diffusion, consistency", [(0.8, 0.5), (-0.1, 0.5), (0.5, -0.25), (1.0, 0.01)])
def test_bucket_ratios_beyond_one_or_negative_are_refused(diffusion, consistency):
    """``0.8 / 0.5`` used to train 80/20/0 silently (an operator-precedence slip in the check)."""
    from anystep.objectives.flowmap import Stage1Config
    from anystep.time import assign_buckets

    with pytest.raises(ValueError, match="bucket ratios"):
        assign_buckets(4, diffusion, consistency)
    with pytest.raises(ValueError, match="bucket ratios"):
        Stage1Config(diffusion_ratio=diffusion, consistency_ratio=consistency)


def test_normal_loss_weight_is_the_normal_density_on_the_shifted_grid():
    """The time-sampler ablation's Normal(0.5, 0.25) weight (paper Fig. 6b): on grid points the weight ratio of
    two sigmas is the ratio of the density there, by hand; the table sums to 1000 like beta08's."""
    g, w = T.weight_table("normal")
    assert abs(w.sum().item() - 1000) < 1e-9
    assert abs(g[w.argmax()].item() / 1000 - 0.5) < 0.01
    at = {s: T.loss_weight(torch.tensor([s * 1000.0]), "normal").item() for s in (0.25, 0.5, 0.75)}
    for s in (0.25, 0.75):   # exp(-0.5 ((s - 0.5) / 0.25)^2) = exp(-0.5) relative to the peak
        assert abs(at[s] / at[0.5] - math.exp(-0.5)) < 0.01, s
    beta = T.loss_weight(torch.tensor([250.0, 500.0]), "beta08")
    assert not torch.allclose(beta, torch.tensor([at[0.25], at[0.5]]))
