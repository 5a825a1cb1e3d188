import pytest
import torch
from diffusers import FlowMapEulerDiscreteScheduler

from anystep.flowmap import euler_step, guided, sample
from anystep.worlds.gmm import GMMConfig, GMMWorld


def test_euler_step_equals_diffusers_scheduler_step():
    sched = FlowMapEulerDiscreteScheduler(shift=5.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    taus = torch.cat([sched.timesteps.double(), torch.zeros(1, dtype=torch.float64)])
    for i in range(4):
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        t, r = taus[i].expand(2), taus[i + 1].expand(2)
        ref = sched.step(u, taus[i], x, r_timestep=taus[i + 1]).prev_sample
        assert torch.allclose(euler_step(x, u, t, r), ref, atol=1e-12)


def test_sampler_follows_the_scheduler_loop():
    """Our any-step sampler against a loop written with diffusers' scheduler, same random model."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16).double()

    def model(x, t, r, cond):
        return torch.tanh(lin(x.flatten(1))).view_as(x) * (1 + t.double()[:, None, None, None, None] / 1000
                                                           - r.double()[:, None, None, None, None] / 2000)

    noise = torch.randn(3, 1, 1, 4, 4, dtype=torch.float64)
    for n in (1, 2, 5):
        sched = FlowMapEulerDiscreteScheduler(shift=5.0)
        sched.set_timesteps(n)
        x = noise.clone()
        sig = sched.sigmas.double() * 1000
        for i, t in enumerate(sched.timesteps):
            u = model(x, t.expand(3).float(), sig[i + 1].expand(3).float(), None)
            x = sched.step(u, t, x).prev_sample
        ours = sample(model, noise, None, n)
        assert torch.allclose(ours, x, atol=1e-10), n


def test_exact_flow_map_is_exact_at_every_step_count():
    """With the exact average velocity, flow-map sampling lands on the exact ODE solution for any N."""
    world = GMMWorld(GMMConfig())
    labels = torch.tensor([0, 1, 2, 3])
    noise = torch.randn(4, *world.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = world.sample_ode(noise, labels, steps=400)

    def exact_u(x, t, r, cond):
        return world.average_velocity(x.double(), t.double(), r.double(), cond, steps=200)

    for n in (1, 2, 4):
        out = sample(exact_u, noise, labels, n)
        assert (out - reference).abs().max() < 1e-5, n
    # while plain Euler with the instantaneous velocity is far off at N = 1
    euler = sample(exact_u, noise, labels, 1, mean_velocity=False)
    assert (euler - reference).abs().max() > 0.1


def test_guidance_is_the_usual_cfg_formula():
    def model(x, t, r, cond):
        return x * cond.view(-1, 1, 1, 1, 1)

    x = torch.ones(2, 1, 1, 1, 1)
    cond = torch.tensor([2.0, 3.0])
    null = torch.tensor([1.0])
    t = torch.full((2,), 500.0)
    out = guided(model, 4.0, null)(x, t, t, cond)
    assert torch.allclose(out.flatten(), torch.tensor([1 + 4 * (2 - 1), 1 + 4 * (3 - 1)], dtype=torch.float32))
    assert guided(model, 1.0, null) is model


def test_bad_grids_raise():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(lambda x, t, r, c: x, torch.zeros(1, 1, 1, 1, 1), None, [1000.0, 1000.0, 0.0])
    with pytest.raises(ValueError, match=r"\[0, 1000\]"):
        sample(lambda x, t, r, c: x, torch.zeros(1, 1, 1, 1, 1), None, [1100.0, 0.0])
    with pytest.raises(ValueError, match="steps"):
        sample(lambda x, t, r, c: x, torch.zeros(1, 1, 1, 1, 1), None, 0)
