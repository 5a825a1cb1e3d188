"""Tests for the analytic GMM world, each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anystep.worlds.gmm import GMMConfig, GMMWorld, chi2_quantile, frechet_distance_moments, sqrtm_psd


@pytest.fixture(scope="module")
def world() -> GMMWorld:
    return GMMWorld(GMMConfig())


@pytest.fixture(scope="module")
def world1d() -> GMMWorld:
    return GMMWorld(GMMConfig(num_classes=2, modes_per_class=2, shape=(1, 1, 1, 1), mode_std=0.2, mean_scale=1.5))


def _xt(world: GMMWorld, n: int, t: float, seed: int, labels=None):
    """Draw x_t = (1 - s) x0 + s eps from the forward process (float64)."""
    g = torch.Generator().manual_seed(seed)
    labels = world.sample_labels(n, g) if labels is None else labels
    x0 = world.sample_data(labels, g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = t / 1000.0
    return (1 - s) * x0 + s * eps, labels


# ------------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------------


def test_construction_is_seeded_and_separated(world):
    cfg = world.cfg
    assert world.dim == 8 and world.shape == (2, 1, 2, 2)
    assert world.num_classes == 4 and world.null_label == 4
    assert world.means.shape == (4, 2, 8) and world.means.dtype == torch.float64
    mu = world.means.reshape(-1, 8)
    d = torch.cdist(mu, mu) + torch.eye(8, dtype=torch.float64) * 1e9
    assert float(d.min()) > 6 * cfg.mode_std
    torch.testing.assert_close(world.weights, torch.tensor([[1 / 3, 2 / 3]] * 4, dtype=torch.float64))
    assert torch.equal(GMMWorld(GMMConfig()).means, world.means)
    assert not torch.equal(GMMWorld(GMMConfig(seed=1)).means, world.means)


def test_impossible_separation_raises():
    with pytest.raises(ValueError, match="pairwise distance"):
        GMMWorld(GMMConfig(num_classes=8, modes_per_class=4, shape=(1, 1, 1, 1), mode_std=0.5, max_tries=50))


# ------------------------------------------------------------------------------------------------
# exact velocity against independent references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [50.0, 300.0, 500.0, 900.0])
@pytest.mark.parametrize("label", [0, 1, 2])  # 2 = null label of the 2-class world
def test_velocity_matches_1d_quadrature(world1d, t, label):
    """E[eps - x0 | x_t] by brute-force quadrature over x0 (1-D), eps = (x_t - a x0) / s."""
    s, a = t / 1000.0, 1.0 - t / 1000.0
    sig = world1d.mode_std
    mu = world1d.means.reshape(-1)  # (K*M,)
    w = world1d.weights.reshape(-1) / world1d.num_classes if label == 2 else torch.zeros(4, dtype=torch.float64)
    if label < 2:
        w[2 * label : 2 * label + 2] = world1d.weights[label]
    x0 = torch.linspace(-10, 10, 400_001, dtype=torch.float64)
    log_p0 = torch.logsumexp(w.log()[:, None] - 0.5 * ((x0[None] - mu[:, None]) / sig) ** 2, dim=0)
    xs = torch.tensor([-2.0, -0.7, 0.0, 0.4, 1.3, 2.5], dtype=torch.float64)
    ref = []
    for xt in xs:
        logw = log_p0 - 0.5 * ((xt - a * x0) / s) ** 2
        p = torch.softmax(logw, dim=0)
        ref.append((p * ((xt - a * x0) / s - x0)).sum())
    ref = torch.stack(ref)
    v = world1d.velocity(xs.reshape(-1, 1, 1, 1, 1), t, torch.full((6,), label)).reshape(-1)
    torch.testing.assert_close(v, ref, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("t", [10.0, 250.0, 600.0, 990.0])
def test_velocity_matches_score_autograd(world, t):
    """Tweedie: E[eps|x_t] = -s grad log p_t(x_t), E[x0|x_t] = (x_t - s E[eps|x_t]) / (1 - s).

    log p_t is written here directly as the log-density of the Gaussian mixture
    sum_j pi_j N(a mu_j, V I) and differentiated with autograd.
    """
    s, a = t / 1000.0, 1.0 - t / 1000.0
    var = a**2 * world.mode_std**2 + s**2
    mu = world.means.reshape(-1, world.dim)
    x, labels = _xt(world, 24, t, seed=3)
    labels[:6] = world.null_label
    xf = x.reshape(24, -1).clone().requires_grad_(True)
    w = torch.zeros(24, mu.shape[0], dtype=torch.float64)
    for i, k in enumerate(labels.tolist()):
        if k == world.null_label:
            w[i] = world.weights.reshape(-1) / world.num_classes
        else:
            w[i, 2 * k : 2 * k + 2] = world.weights[k]
    d2 = ((xf[:, None, :] - a * mu[None]) ** 2).sum(-1)
    log_p = torch.logsumexp(w.log() - 0.5 * d2 / var - 0.5 * world.dim * math.log(2 * math.pi * var), dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), xf)
    e_eps = -s * score
    e_x0 = (xf.detach() - s * e_eps) / a
    ref = (e_eps - e_x0).reshape(x.shape)
    torch.testing.assert_close(world.velocity(x, t, labels), ref, rtol=1e-9, atol=1e-9)


def test_velocity_boundaries_and_finiteness(world):
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(16, *world.shape, generator=g, dtype=torch.float64)
    labels = torch.arange(16) % (world.num_classes + 1)
    # t = 0: x is data, eps independent of it -> v = -x.
    torch.testing.assert_close(world.velocity(x, 0.0, labels), -x, rtol=0, atol=1e-12)
    # t = 1000: x is noise -> v = x - E[x0 | label].
    means = torch.stack([world.exact_moments(int(k))[0] for k in labels]).reshape(x.shape)
    torch.testing.assert_close(world.velocity(x, 1000.0, labels), x - means, rtol=0, atol=1e-12)
    # far-away points and extreme guidance stay finite.
    far = 1e3 * x
    for t in [0.0, 1e-6, 1.0, 500.0, 999.999, 1000.0]:
        assert torch.isfinite(world.cfg_velocity(far, t, labels, 7.0)).all()


@settings(max_examples=30, deadline=None)
@given(
    t=st.floats(0.0, 1000.0),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
    guidance=st.floats(0.0, 8.0),
)
def test_velocity_finite_and_posterior_normalised(t, scale, seed, guidance):
    world = GMMWorld(GMMConfig())
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(5, *world.shape, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4])
    post = world.posterior(x, t, labels)
    torch.testing.assert_close(post.sum(-1), torch.ones(5, dtype=torch.float64))
    # conditional posteriors live on their own class's modes only
    assert float(post[0, 2:].abs().max()) == 0.0
    assert torch.isfinite(world.cfg_velocity(x, t, labels, guidance)).all()


def test_cfg_velocity_convention(world):
    x, labels = _xt(world, 32, 400.0, seed=5)
    t = torch.linspace(1, 999, 32, dtype=torch.float64)
    v_c = world.velocity(x, t, labels)
    v_u = world.velocity(x, t, torch.full_like(labels, world.null_label))
    torch.testing.assert_close(world.cfg_velocity(x, t, labels, 1.0), v_c, rtol=0, atol=0)
    torch.testing.assert_close(world.cfg_velocity(x, t, labels, 0.0), v_u, rtol=0, atol=1e-14)
    torch.testing.assert_close(world.cfg_velocity(x, t, labels, 3.0), v_u + 3.0 * (v_c - v_u))


def test_dtype_follows_input(world):
    x, labels = _xt(world, 4, 500.0, seed=6)
    assert world.velocity(x.float(), 500.0, labels).dtype == torch.float32
    assert world.velocity(x, 500.0, labels).dtype == torch.float64
    assert world.flow_map(x.float(), 500.0, 100.0, labels, steps=10).dtype == torch.float32
    assert world.sample_data(labels).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# flow map
# ------------------------------------------------------------------------------------------------


def _random_times(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    return 1000.0 * torch.maximum(a, b), 1000.0 * torch.minimum(a, b)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_map_converged_against_4x_steps(world, guidance):
    t, r = _random_times(48, seed=7)
    t[:8], r[:8] = 1000.0, 0.0  # full noise -> data trajectories
    g = torch.Generator().manual_seed(8)
    x = torch.randn(48, *world.shape, generator=g, dtype=torch.float64)
    labels = torch.arange(48) % (world.num_classes + 1)
    coarse = world.flow_map(x, t, r, labels, guidance, steps=200)
    fine = world.flow_map(x, t, r, labels, guidance, steps=800)
    assert float((coarse - fine).abs().max()) < 1e-5


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_map_composition(world, guidance):
    t, r = _random_times(32, seed=9)
    g = torch.Generator().manual_seed(10)
    mid = r + (t - r) * torch.rand(32, generator=g, dtype=torch.float64)
    x = torch.randn(32, *world.shape, generator=g, dtype=torch.float64)
    labels = torch.arange(32) % world.num_classes
    direct = world.flow_map(x, t, r, labels, guidance, steps=300)
    two = world.flow_map(world.flow_map(x, t, mid, labels, guidance, steps=300), mid, r, labels, guidance, steps=300)
    assert float((direct - two).abs().max()) < 1e-5


def test_flow_map_identity_and_order(world):
    x, labels = _xt(world, 6, 700.0, seed=11)
    t = torch.tensor([700.0, 700.0, 0.0, 1000.0, 350.5, 700.0], dtype=torch.float64)
    out = world.flow_map(x, t, t, labels, guidance=3.0, steps=7)
    assert torch.equal(out, x)
    r = t.clone()
    r[1] = 10.0
    out = world.flow_map(x, t, r, labels, steps=7)
    assert torch.equal(out[[0, 2, 3, 4, 5]], x[[0, 2, 3, 4, 5]]) and not torch.equal(out[1], x[1])
    with pytest.raises(ValueError, match="r > t"):
        world.flow_map(x, 300.0, 400.0, labels)
    with pytest.raises(ValueError, match="r > t"):
        world.average_velocity(x, t, t + 1e-3 * (t < 1000), labels)


def test_average_velocity_definition(world):
    x, labels = _xt(world, 8, 800.0, seed=12)
    t = torch.full((8,), 800.0, dtype=torch.float64)
    r = torch.tensor([800.0, 600.0, 0.0, 799.0, 800.0, 200.0, 400.0, 10.0], dtype=torch.float64)
    u = world.average_velocity(x, t, r, labels, guidance=2.0)
    x_r = world.flow_map(x, t, r, labels, guidance=2.0)
    torch.testing.assert_close(x - ((t - r) / 1000).reshape(-1, 1, 1, 1, 1) * u, x_r, rtol=0, atol=1e-12)
    v = world.cfg_velocity(x, t, labels, 2.0)
    torch.testing.assert_close(u[[0, 4]], v[[0, 4]], rtol=0, atol=0)
    # short intervals approach the instantaneous velocity
    torch.testing.assert_close(u[3], v[3], rtol=0, atol=2e-2)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_meanflow_identity_exact_average_velocity(world, guidance):
    """u(x_t, t, r) = v(x_t, t) - (t - r) d/dt u(x_t, t, r), d/dt along the ODE trajectory.

    All points lie on one exact trajectory: x_{t+d} is drawn from the forward process, and
    x_t, x_{t-d} are obtained from it with the exact flow map. d/dt u is a central difference.
    """
    delta, steps = 0.05, 200  # measured: residual <= 7e-7 (central-difference error ~ delta^2)
    for t0, r in [(700.0, 200.0), (500.0, 0.0), (300.0, 150.0), (950.0, 600.0)]:
        n = 16
        x_hi, labels = _xt(world, n, t0 + delta, seed=int(t0 + r))
        x_mid = world.flow_map(x_hi, t0 + delta, t0, labels, guidance, steps)
        x_lo = world.flow_map(x_hi, t0 + delta, t0 - delta, labels, guidance, steps)
        u_hi = world.average_velocity(x_hi, t0 + delta, r, labels, guidance, steps)
        u_mid = world.average_velocity(x_mid, t0, r, labels, guidance, steps)
        u_lo = world.average_velocity(x_lo, t0 - delta, r, labels, guidance, steps)
        du_dt = (u_hi - u_lo) / (2 * delta)
        v = world.cfg_velocity(x_mid, t0, labels, guidance)
        residual = u_mid - (v - (t0 - r) * du_dt)
        correction = (t0 - r) * du_dt
        assert float(correction.abs().max()) > 0.1  # the identity is not trivially u == v here
        assert float(residual.abs().max()) < 1e-5 * (1.0 + float(v.abs().max())), (t0, r)


# ------------------------------------------------------------------------------------------------
# sampling & metrics
# ------------------------------------------------------------------------------------------------


def test_chi2_quantile_against_closed_forms():
    # dof = 2: exponential, q = -2 ln(1 - p); dof = 1: q = Phi^{-1}((1 + p) / 2)^2.
    assert chi2_quantile(0.99, 2) == pytest.approx(-2 * math.log(0.01), rel=1e-10)
    z = float(torch.special.ndtri(torch.tensor(0.995, dtype=torch.float64)))
    assert chi2_quantile(0.99, 1) == pytest.approx(z * z, rel=1e-10)
    assert chi2_quantile(0.5, 4) == pytest.approx(3.356693980033321, rel=1e-9)  # solves (1+q/2) e^{-q/2} = 1/2
    assert chi2_quantile(0.99, 8) == pytest.approx(20.090235029663233, rel=1e-9)
    with pytest.raises(ValueError, match="p must be"):
        chi2_quantile(1.0, 3)


def test_sqrtm_and_fd_helpers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    r = sqrtm_psd(s)
    torch.testing.assert_close(r @ r, s)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance_moments(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    # isotropic closed form: |dmu|^2 + D (s1 - s2)^2
    eye = torch.eye(6, dtype=torch.float64)
    fd = frechet_distance_moments(mu, 4.0 * eye, mu + 1.0, 1.0 * eye)
    assert fd == pytest.approx(6.0 + 6.0 * (2.0 - 1.0) ** 2)


def test_exact_moments_match_sample_data(world):
    g = torch.Generator().manual_seed(13)
    labels = torch.full((40_000,), 2)
    x = world.sample_data(labels, g).double().reshape(40_000, -1)
    mean, cov = world.exact_moments(2)
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.03)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.06)
    m0, c0 = world.exact_moments(world.null_label)
    assert m0.shape == (8,) and c0.shape == (8, 8)
    with pytest.raises(ValueError, match="label out of range"):
        world.exact_moments(world.null_label + 1)


def test_data_samples_score_as_data(world):
    g = torch.Generator().manual_seed(14)
    labels = world.sample_labels(4000, g)
    x = world.sample_data(labels, g)
    m = world.evaluate(x, labels)
    assert set(m) == {"fd", "mode_kl", "precision"}
    assert m["fd"] < 0.02
    assert m["mode_kl"] < 0.01
    assert 0.982 < m["precision"] <= 1.0


def test_exact_ode_samples_match_data(world):
    g = torch.Generator().manual_seed(15)
    labels = world.sample_labels(4000, g)
    noise = torch.randn(4000, *world.shape, generator=g, dtype=torch.float64)
    x = world.sample_ode(noise, labels, steps=100)
    m = world.evaluate(x, labels, noise=noise)
    assert m["fd"] < 0.02
    assert m["mode_kl"] < 0.01
    assert m["precision"] > 0.98
    assert m["endpoint_error"] < 1e-4  # 100 vs 200 RK4 steps


def test_endpoint_error_measures_rms(world):
    g = torch.Generator().manual_seed(16)
    labels = world.sample_labels(64, g)
    noise = torch.randn(64, *world.shape, generator=g, dtype=torch.float64)
    x = world.sample_ode(noise, labels, guidance=2.0)
    assert world.endpoint_error(x, noise, labels, guidance=2.0) < 1e-10
    assert world.endpoint_error(x + 0.5, noise, labels, guidance=2.0) == pytest.approx(0.5, rel=1e-8)
    with pytest.raises(ValueError, match="noise shape"):
        world.endpoint_error(x, noise[:3], labels)


def test_collapsed_samples_flagged(world):
    g = torch.Generator().manual_seed(17)
    labels = world.sample_labels(2000, g)
    x = world.means[labels, 0] + world.mode_std * torch.randn(2000, world.dim, generator=g, dtype=torch.float64)
    x = x.reshape(2000, *world.shape)
    m = world.evaluate(x, labels)
    data = world.evaluate(world.sample_data(labels, g), labels)
    assert m["mode_kl"] > 1.0 and data["mode_kl"] < 0.01
    assert m["fd"] > 1.0 and m["fd"] > 50 * data["fd"]
    assert m["precision"] > 0.98


# ------------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise(world):
    x, labels = _xt(world, 4, 500.0, seed=18)
    with pytest.raises(ValueError, match="shape"):
        world.velocity(x.reshape(4, 8), 500.0, labels)
    with pytest.raises(ValueError, match="shape"):
        world.velocity(x[:, :1], 500.0, labels)
    with pytest.raises(ValueError, match="label out of range"):
        world.velocity(x, 500.0, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="label out of range"):
        world.velocity(x, 500.0, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="label out of range"):
        world.sample_data(torch.tensor([world.null_label]))
    with pytest.raises(ValueError, match="label out of range"):
        world.frechet_distance(x, torch.tensor([0, 1, 2, world.null_label]))
    with pytest.raises(ValueError, match="batch size"):
        world.velocity(x, 500.0, labels[:3])
    with pytest.raises(ValueError, match="integer"):
        world.velocity(x, 500.0, labels.double())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\]"):
        world.velocity(x, 1000.5, labels)
    with pytest.raises(ValueError, match="t must be a scalar or shape"):
        world.velocity(x, torch.ones(3) * 10, labels)
    with pytest.raises(ValueError, match="r must lie"):
        world.flow_map(x, 500.0, -1.0, labels)
    with pytest.raises(ValueError, match="steps"):
        world.flow_map(x, 500.0, 100.0, labels, steps=0)
