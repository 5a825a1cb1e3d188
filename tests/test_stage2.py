"""Stage 2: backward simulation, DMD, the critic, the consistency baselines, and the Stage-2 method."""

import itertools

import pytest
import torch

from anystep.backward_simulation import (
    RolloutPlan,
    consistency_backward_simulation,
    draw_plan,
    flowmap_backward_simulation,
)
from anystep.flowmap import sample_consistency
from anystep.global_batch import WHOLE
from anystep.kinds import Parts, kind
from anystep.kinds.stage2 import Stage2Config
from anystep.objectives.consistency import consistency_pairs
from anystep.objectives.dmd import dmd_loss
from anystep.objectives.flowmap import Stage1Config
from anystep.worlds import OnDevice
from anystep.worlds.gmm import GMMConfig, GMMWorld


def _grid(n, k=5.0):
    """The shifted grid written out independently: 1000 * k s / (1 + (k - 1) s), s = 1 - i/n."""
    s = [1 - i / n for i in range(n + 1)]
    return [1000 * k * v / (1 + (k - 1) * v) for v in s]


class Spy(torch.nn.Module):
    """u = theta * x (theta a scalar parameter); records each call's (t, r, grad enabled)."""

    def __init__(self, theta=0.5):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))
        self.calls, self.inputs = [], []
        self.perturb = None  # (call index, delta): use theta + delta on that call only
        self.replay = {}     # call index -> output to return instead (a call held constant)

    def forward(self, x, t, r, cond):
        self.calls.append((float(t[0]), float(r[0]), torch.is_grad_enabled()))
        self.inputs.append(x.detach().clone())
        if len(self.calls) - 1 in self.replay:
            return self.replay[len(self.calls) - 1]
        theta = self.theta
        if self.perturb is not None and self.perturb[0] == len(self.calls) - 1:
            theta = theta + self.perturb[1]
        return theta * x


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 50])
def test_flowmap_rollout_makes_exactly_the_expected_calls(n):
    taus = _grid(n)
    for k in range(n):
        spy = Spy()
        flowmap_backward_simulation(spy, torch.randn(2, 1, 1, 2, 2, dtype=torch.float64), None,
                                    RolloutPlan(n, k))
        expected = ([(1000.0, taus[k])] if k > 0 else []) + [(taus[k], taus[k + 1])]
        expected += [(taus[k + 1], 0.0)] if k < n - 1 else []
        got = [(t, r) for t, r, _ in spy.calls]
        assert len(got) == len(expected) == 1 + (k > 0) + (k < n - 1)
        for (t, r), (te, re) in zip(got, expected):
            assert t == pytest.approx(te, rel=1e-6) and r == pytest.approx(re, rel=1e-6, abs=1e-9)
        assert all(grad for _, _, grad in spy.calls)


def _rollout(spy, noise, plan, grad):
    spy.calls.clear()
    return flowmap_backward_simulation(spy, noise, None, plan, grad=grad)


@pytest.mark.parametrize("plan", [RolloutPlan(4, 0), RolloutPlan(4, 2), RolloutPlan(8, 7), RolloutPlan(2, 1)])
def test_rollout_gradient_reaches_the_parameters_through_every_segment(plan):
    """d(sum x^)/d theta by autograd against a central difference in theta (every call perturbed); with
    grad='one', against a difference that perturbs the fine step's call only and holds the other calls'
    outputs at their unperturbed values (they run without gradient)."""
    noise = torch.randn(3, 1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spy = Spy()
    fine = (plan.k > 0)  # index of the fine call: after the first jump when there is one
    for grad, perturbed in (("all", None), ("one", fine)):
        spy.theta.grad = None
        _rollout(spy, noise, plan, grad).sum().backward()
        if perturbed is not None:
            with torch.no_grad():
                outs = [spy.theta * x for x in spy.inputs[-len(spy.calls):]]
            spy.replay = {i: o for i, o in enumerate(outs) if i != fine}
        h = 1e-6
        vals = []
        for sign in (1, -1):
            with torch.no_grad():
                if perturbed is None:
                    spy.theta += sign * h
                else:
                    spy.perturb = (perturbed, sign * h)
                vals.append(_rollout(spy, noise, plan, grad).sum())
                if perturbed is None:
                    spy.theta -= sign * h
                spy.perturb = None
        spy.replay = {}
        numeric = (vals[0] - vals[1]) / (2 * h)
        assert spy.theta.grad is not None
        assert float(spy.theta.grad) == pytest.approx(float(numeric), rel=1e-5), grad
    # with several calls, 'one' and 'all' must differ (the other segments carry gradient under 'all')
    if len(spy.calls) > 1:
        spy.theta.grad = None
        _rollout(spy, noise, plan, "all").sum().backward()
        g_all = float(spy.theta.grad)
        spy.theta.grad = None
        _rollout(spy, noise, plan, "one").sum().backward()
        assert abs(g_all - float(spy.theta.grad)) > 1e-3


def test_consistency_rollout_calls_and_gradient():
    spy = Spy()
    out = consistency_backward_simulation(spy, torch.randn(2, 1, 1, 2, 2, dtype=torch.float64), None,
                                          RolloutPlan(8, 5), generator=torch.Generator().manual_seed(0))
    taus = _grid(8)
    assert [t for t, _, _ in spy.calls] == pytest.approx(taus[:6])
    assert all(r == 0 for _, r, _ in spy.calls)
    assert [g for _, _, g in spy.calls] == [False] * 5 + [True]
    out.sum().backward()
    assert spy.theta.grad is not None


def test_plans_are_reproducible_and_cover_all_steps():
    a = [draw_plan((2, 4, 8, 16, 50), torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(0)
    plans = [draw_plan((2, 4), g) for _ in range(400)]
    assert {(p.n, p.k) for p in plans} == {(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)}
    with pytest.raises(ValueError, match="0 <= k < n"):
        RolloutPlan(4, 4)


class Recorder(torch.nn.Module):
    """A velocity model f(z, t) = a z + b cond (cond a tensor); records its inputs."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b
        self.inputs = []

    def forward(self, z, t, r, cond):
        self.inputs.append((z.clone(), t.clone(), r.clone(), cond.clone()))
        return self.a * z + self.b * cond.view(-1, 1, 1, 1, 1)


def test_dmd_gradient_equals_a_hand_computation():
    torch.manual_seed(0)
    x_hat = torch.randn(2, 2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    cond, null = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    critic, teacher = Recorder(0.3, 0.1), Recorder(-0.2, 0.5)
    loss, _ = dmd_loss(x_hat, critic, teacher, cond, null, guidance=3.0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    (z, tau, r, c_cond), = critic.inputs
    (zt, taut, rt, t_cond), = teacher.inputs
    assert torch.equal(r, tau) and torch.equal(zt[:2], z) and torch.equal(zt[2:], z) and torch.equal(c_cond, cond)
    assert torch.equal(taut, torch.cat([tau, tau])) and torch.equal(rt, taut)
    assert torch.equal(t_cond, torch.tensor([1.0, -2.0, 0.0, 0.0], dtype=torch.float64))
    s = (tau.double() / 1000).view(-1, 1, 1, 1, 1)
    c = cond.view(-1, 1, 1, 1, 1)
    x0_fake = z - s * (0.3 * z + 0.1 * c)
    x0_c, x0_u = z - s * (-0.2 * z + 0.5 * c), z - s * (-0.2 * z)
    x0_real = x0_c + 3.0 * (x0_c - x0_u)
    g = (x0_fake - x0_real) / (x_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(x_hat.grad, 2 * g / x_hat.numel(), atol=1e-12)
    # the re-noised point lies on the straight path from the rollout
    assert bool(((tau >= 0) & (tau <= 1000)).all())


def _gmm_binding():
    from anystep.worlds.gmm import GMMData
    return OnDevice(GMMData(), "cpu")


def _stage2(student, critic, teacher, **cfg):
    """The Stage-2 kind's method, made as the assembly makes it."""
    sections = {"stage2": Stage2Config(**cfg), "stage1": Stage1Config(fuse_guidance_scale=1.0)}
    roles = {"student": student, "critic": critic, "teacher": teacher}
    return kind("stage2").make(Parts(roles, _gmm_binding(), 8, 0, sections))


def test_rollout_grid_shift_follows_rollout_shift_and_defaults_to_dmd_shift():
    noise = torch.randn(2, *_gmm_binding().shape, dtype=torch.float64)
    for overrides, k in (({"dmd_shift": 2.0}, 2.0), ({"dmd_shift": 1.0, "rollout_shift": 5.0}, 5.0)):
        student = Spy()
        method = _stage2(student, Recorder(0.0, 0.0), Recorder(0.0, 0.0), rollout_steps=(4,), **overrides)
        method.rollout(noise, None, draw_plan((4,), method.plans), torch.Generator().manual_seed(0), WHOLE)
        times = {round(v, 6) for t, r, _ in student.calls for v in (t, r)}
        assert times <= {round(v, 6) for v in _grid(4, k)} and len(times) >= 3


def test_stage2_shifts_must_be_positive():
    for name in ("dmd_shift", "critic_shift", "rollout_shift"):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            Stage2Config(**{name: 0.0})


def test_critic_step_is_flow_matching_on_the_stop_grad_rollout():
    """The critic sees z = (1 - t/1000) x^ + (t/1000) eps at (t, r = t) and regresses eps - x^, with x^ the
    rollout made without gradient."""
    student = Spy(0.0)  # u = 0: the rollout returns its own noise, x^ = noise
    critic = Recorder(0.7, 0.0)
    method = _stage2(student, critic, Recorder(0.0, 0.0), dmd_batch_size=4, cond_dropout=0.0)
    critic_phase = next(p for p in method.phases(1, torch.Generator().manual_seed(0)) if p.role == "critic")
    terms, _ = critic_phase.run(WHOLE)
    assert student.calls and all(not g for _, _, g in student.calls)
    x_hat = student.inputs[0]
    (z, t, r, _), = critic.inputs
    assert torch.equal(r, t) and z.shape == x_hat.shape == (4, *_gmm_binding().shape)
    s = (t.double() / 1000).view(-1, 1, 1, 1, 1)
    eps = (z.double() - (1 - s) * x_hat.double()) / s
    assert eps.std().item() == pytest.approx(1.0, abs=0.35)        # it is the fresh noise
    expected = (0.7 * z.double() - (eps - x_hat.double())).pow(2).mean()
    assert terms["loss/critic"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_generator_step_updates_no_other_role():
    torch.manual_seed(0)
    world = _gmm_binding()
    from anystep.models.toy import ToyFlowMapNet
    net = ToyFlowMapNet(world.shape, world.world.num_classes, hidden=16, depth=1)
    student = ToyFlowMapNet(world.shape, world.world.num_classes, hidden=16, depth=1).to_flowmap()
    critic = ToyFlowMapNet(world.shape, world.world.num_classes, hidden=16, depth=1)
    teacher = net.requires_grad_(False)
    method = _stage2(student, critic, teacher, dmd_batch_size=4)
    gen_phase, critic_phase = method.phases(0, torch.Generator().manual_seed(0))
    assert (gen_phase.role, critic_phase.role) == ("student", "critic")
    terms, _ = gen_phase.run(WHOLE)
    assert set(terms) == {"loss/dmd", "loss/stage1"}
    sum(terms.values()).backward()
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.delta_embedder.parameters())
    terms, _ = critic_phase.run(WHOLE)
    student.zero_grad(set_to_none=True)
    terms["loss/critic"].backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for n, p in critic.named_parameters() if not n.startswith("delta_embedder"))
    # critic_ratio 2: the generator steps every other iteration only
    method = _stage2(student, critic, teacher, critic_ratio=2)
    assert [p.role for p in method.phases(1, torch.Generator())] == ["critic"]


def test_consistency_sampler_with_the_exact_flow_map_reproduces_the_exact_ode():
    world = GMMWorld(GMMConfig())
    labels = torch.arange(8) % world.num_classes
    noise = torch.randn(8, *world.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def exact(x, t, r, lab):
        return world.average_velocity(x.double(), t.double(), r.double(), lab)

    one = sample_consistency(exact, noise, labels, 1)
    assert torch.allclose(one, world.sample_ode(noise, labels), atol=1e-6)
    # more steps re-noise with fresh noise: the samples differ from the ODE's but stay on the data
    four = sample_consistency(exact, noise, labels, 4, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(four, one, atol=1e-3)


def test_consistency_pairs_are_adjacent_grid_times():
    t, s = consistency_pairs(500, 8, generator=torch.Generator().manual_seed(0))
    taus = torch.tensor(_grid(8), dtype=torch.float64)
    idx = [int(torch.argmin((taus - v).abs())) for v in t]
    assert torch.allclose(t, taus[idx]) and torch.allclose(s, taus[[i + 1 for i in idx]])
    assert len(set(idx)) == 8


def _plan_on_rank(rank, world, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # each rank seeds differently on purpose: the plan must still be rank 0's everywhere
        plans = [draw_plan((2, 4, 8, 16, 50), torch.Generator().manual_seed(100 + rank + i)) for i in range(8)]
        out[rank] = [(p.n, p.k) for p in plans]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_plans_are_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_plan_on_rank, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    rank0 = [(p.n, p.k) for p in (draw_plan((2, 4, 8, 16, 50), torch.Generator().manual_seed(100 + i))
                                  for i in range(8))]
    assert out[0] == out[1] == rank0


def test_dmd_times_follow_the_shifted_uniform_and_the_optional_clamp():
    from anystep.objectives.dmd import dmd_times
    g = torch.Generator().manual_seed(0)
    tau = dmd_times(20000, 5.0, g)
    # P(tau <= 1000 shift(s)) = s for the shifted uniform: check at s = 0.5 (tau = 833.3)
    assert float((tau <= 1000 * 5 * 0.5 / (1 + 4 * 0.5)).double().mean()) == pytest.approx(0.5, abs=0.015)
    clamped = dmd_times(20000, 5.0, torch.Generator().manual_seed(0), 20.0, 980.0)
    assert float(clamped.min()) == 20.0 and float(clamped.max()) == 980.0
    assert torch.equal(clamped, tau.clamp(20.0, 980.0))
    with pytest.raises(ValueError, match="dmd_time_range"):
        Stage2Config(dmd_time_range=(500.0, 100.0))


def test_consistency_sampler_renoises_with_fresh_noise_between_steps():
    """With u = 0 the endpoint map returns its input, so two steps give exactly the re-noised point
    (1 - s1) noise + s1 fresh at s1 = tau_1 / 1000, fresh drawn from the sampler's generator."""
    noise = torch.randn(3, 1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_consistency(lambda x, t, r, c: torch.zeros_like(x), noise, None, 2,
                             generator=torch.Generator().manual_seed(1))
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)).to(noise)
    s1 = _grid(2)[1] / 1000
    assert torch.allclose(out, (1 - s1) * noise + s1 * fresh, atol=1e-12)


def test_consistency_distillation_loss_equals_a_hand_computation():
    """Student u = 0.3 x, teacher v = -0.5 x, one sample: f(x_t, t) against sg f(x_s, s), x_s one teacher
    Euler step from x_t, f(x, t) = x - (t/1000) u(x, t, 0), (t, s) adjacent on the 8-interval grid."""
    from anystep.objectives.consistency import consistency_distillation_loss
    taus = _grid(8)
    for seed in range(3):
        student, teacher = Spy(0.3), Spy(-0.5)
        x0 = torch.randn(1, 1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        loss, _ = consistency_distillation_loss(student, teacher, x0, None, intervals=8,
                                                generator=torch.Generator().manual_seed(seed))
        (t, r, tgrad), = teacher.calls
        (s, r1, g1), (t2, r2, g2) = student.calls
        assert r == pytest.approx(t) and not tgrad and (r1, r2, g1, g2) == (0.0, 0.0, False, True)
        assert t2 == pytest.approx(t) and any(abs(t - a) < 1e-3 and abs(s - b) < 1e-3 for a, b in itertools.pairwise(taus))
        x_t = teacher.inputs[0]
        x_s = x_t - (t - s) / 1000 * (-0.5 * x_t)
        assert torch.allclose(student.inputs[0], x_s, atol=1e-6)
        pred, target = x_t - t / 1000 * 0.3 * x_t, x_s - s / 1000 * 0.3 * x_s
        assert loss.item() == pytest.approx((pred - target).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("dropout", [None, 0.5])
def test_rollout_and_critic_see_the_raw_prompts_by_default(dropout):
    """Official Stage 2 drops no prompt of the DMD rollout or the critic (its 10% dropout is inside the
    co-trained Stage-1 loss); ``stage2.cond_dropout`` turns a dropout on."""
    world = _gmm_binding()
    null = world.null_cond.item()
    critic = Recorder(0.5, 0.0)
    kwargs = {} if dropout is None else {"cond_dropout": dropout}
    method = _stage2(Spy(0.1), critic, Recorder(0.3, 0.0), dmd_batch_size=8, cotrain_weight=0.0, **kwargs)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        for phase in method.phases(step, g):
            phase.run(WHOLE)
    labels = torch.cat([cond for *_, cond in critic.inputs])
    assert labels.numel() == 6 * 2 * 8          # the DMD call and the critic's own step, every iteration
    assert ((labels == null).sum() > 0) == (dropout is not None)
    assert Stage2Config().cond_dropout == 0.0
