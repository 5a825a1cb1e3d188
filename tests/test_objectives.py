import pytest
import torch

from anystep.models.toy import ToyFlowMapNet
from anystep.models.wan import AnyFlowStudent, student_from_wan, tiny_wan
from anystep.objectives.flow_matching import flow_matching_error, noisy
from anystep.objectives.flowmap import (
    Stage1Config,
    Stage1Objective,
    central_difference_and_null,
    exact_derivative,
    fuse_guidance,
    meanflow_target,
    rebalance,
)


def _smooth_net(max_freq=5.0):
    torch.manual_seed(0)
    net = ToyFlowMapNet((2, 1, 2, 2), 4, hidden=32, depth=2, max_freq=max_freq).to_flowmap()
    return net.double()


def test_central_difference_matches_the_exact_jvp_on_a_smooth_model():
    net = _smooth_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 1, 2, 2, generator=g, dtype=torch.float64)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([100.0, 300, 500, 700, 900, 950, 990, 999]).double()
    r = t * 0.3
    labels = torch.arange(8) % 4
    fd, _ = central_difference_and_null(net, x, v, t, r, labels, None, 5.0, True, torch.ones(8, dtype=torch.bool))
    jvp = exact_derivative(net, x, v, t, r, labels)
    rel = (fd - jvp).norm() / jvp.norm()
    assert rel < 1e-3, rel.item()


def test_difference_is_exact_for_a_linear_model_and_one_sided_at_the_edges():
    # u = a t + b x (per element): dF/dt along dx/dt = v/1000 is a + b v / 1000, exactly
    a, b = 0.003, 0.7

    def lin(x, t, r, cond):
        return a * t.double().view(-1, 1, 1, 1, 1) + b * x

    x = torch.randn(4, 1, 1, 2, 2, dtype=torch.float64)
    v = torch.randn(x.shape, dtype=torch.float64)
    t = torch.tensor([1000.0, 998.0, 500.0, 3.0]).double()  # at the t = 1000 edge, near it, inside, near r
    r = torch.tensor([0.0, 0.0, 100.0, 1.0]).double()
    fd, _ = central_difference_and_null(lin, x, v, t, r, None, None, 5.0, True, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(fd, a + b * v / 1000, atol=1e-12)


def test_one_sided_difference_never_leaves_the_domain():
    seen = []

    def spy(x, t, r, cond):
        seen.append((t.clone(), r.clone()))
        return x

    t = torch.tensor([1000.0, 997.0, 2.0])
    r = torch.tensor([0.0, 0.0, 0.0])
    x = torch.zeros(3, 1, 1, 1, 1)
    central_difference_and_null(spy, x, x, t, r, None, None, 5.0, True, torch.ones(3, dtype=torch.bool))
    ts, rs = seen[0]
    assert ts.max() <= 1000 and (ts >= rs).all()
    seen.clear()
    central_difference_and_null(spy, x, x, t, r, None, None, 5.0, False, torch.ones(3, dtype=torch.bool))
    assert seen[0][0].max() > 1000  # the official behaviour steps outside


def test_meanflow_target_reduces_to_flow_matching_at_r_equals_t():
    v = torch.randn(3, 1, 1, 2, 2)
    t = torch.tensor([10.0, 500.0, 999.0])
    assert torch.equal(meanflow_target(v, t, t, torch.randn_like(v)), v)
    dudt = torch.randn_like(v)
    r = torch.zeros(3)
    assert torch.allclose(meanflow_target(v, t, r, dudt), v - t.view(-1, 1, 1, 1, 1) * dudt)


def test_guidance_fusion_value_and_gradient():
    u_c = torch.tensor([2.0], requires_grad=True)
    u_u = torch.tensor([0.5], requires_grad=True)
    out = fuse_guidance(u_c, u_u, 3.0)
    assert torch.allclose(out, torch.tensor([(2.0 + 2 * 0.5) / 3]))
    out.backward()
    assert torch.allclose(u_c.grad, torch.tensor([1 / 3])) and u_u.grad is None  # stop-grad on the null branch
    # F_c learns u_u + w (F~ - u_u): the CFG-guided velocity
    target = torch.tensor([1.0])
    solved_c = 0.5 + 3.0 * (target - 0.5)
    assert torch.allclose(fuse_guidance(solved_c, u_u.detach(), 3.0), target)


def test_rebalance_sets_values_to_the_diffusion_mean_with_adaptive_gradient():
    losses = torch.tensor([1.0, 4.0, 0.5], requires_grad=True)
    is_diff = torch.tensor([True, False, False])
    out = rebalance(losses, is_diff, torch.tensor(1.0), c=0.0)
    assert torch.allclose(out, torch.tensor([1.0, 1.0, 1.0]))
    out.sum().backward()
    assert torch.allclose(losses.grad, torch.tensor([1.0, 1 / 4, 1 / 0.5]))


def test_rebalance_power_interpolates_between_the_official_scale_and_plain_mse():
    losses = torch.tensor([1.0, 4.0, 0.25], requires_grad=True)
    is_diff = torch.tensor([True, False, False])
    out = rebalance(losses, is_diff, torch.tensor(1.0), c=0.0, power=0.5)
    # value L * (1 / L)^0.5 = sqrt(L); gradient (1 / L)^0.5 (the scale is stop-grad)
    assert torch.allclose(out, torch.tensor([1.0, 2.0, 0.5]))
    out.sum().backward()
    assert torch.allclose(losses.grad, torch.tensor([1.0, 0.5, 2.0]))
    plain = rebalance(losses.detach(), is_diff, torch.tensor(1.0), c=0.0, power=0.0)
    assert torch.equal(plain, losses.detach())
    with pytest.raises(ValueError, match="rebalance_power must be in"):
        Stage1Config(rebalance_power=1.5)


class _Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.calls = []

    def forward(self, x, t, r, cond):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.w * x * (1 + t.view(-1, 1, 1, 1, 1) / 1000)


def test_stage1_batches_the_no_grad_calls_and_skips_diffusion_samples():
    spy = _Spy()
    obj = Stage1Objective(Stage1Config(cond_dropout=0.0), null_cond=torch.zeros(1, 2))
    x0 = torch.randn(8, 1, 1, 2, 2)
    loss, _stats = obj(spy, x0, torch.ones(8, 2), torch.Generator().manual_seed(0))
    assert spy.calls[0] == (8, True)            # the student with grad
    assert spy.calls[1] == (8 + 2 * 4, False)   # null branch + (plus, minus) for the 4 non-diffusion samples
    assert len(spy.calls) == 2
    loss.backward()
    assert spy.w.grad is not None and torch.isfinite(loss)


def test_stage1_batch_of_one_uses_the_running_diffusion_mean():
    spy = _Spy()
    obj = Stage1Objective(Stage1Config(cond_dropout=0.0, fuse_guidance_scale=None))
    g = torch.Generator().manual_seed(0)
    seen_nonfinite = False
    for _ in range(12):
        loss, _ = obj(spy, torch.randn(1, 1, 1, 2, 2), torch.ones(1, 2), g)
        seen_nonfinite |= not torch.isfinite(loss).item()
    assert not seen_nonfinite and torch.isfinite(obj.diffusion_mean_ema)


def test_stage1_jvp_and_central_difference_agree_on_a_smooth_model():
    net = _smooth_net().float()
    x0 = torch.randn(16, 2, 1, 2, 2)
    labels = torch.arange(16) % 4
    losses = {}
    for d in ("central_difference", "jvp"):
        obj = Stage1Objective(Stage1Config(derivative=d, cond_dropout=0.0), null_cond=torch.tensor([4]))
        losses[d], _ = obj(net, x0, labels, torch.Generator().manual_seed(3))
    assert torch.allclose(losses["central_difference"], losses["jvp"], rtol=2e-3)


def test_exact_jvp_runs_through_diffusers_anyflow_transformer_on_cpu():
    torch.manual_seed(0)
    student = AnyFlowStudent(student_from_wan(tiny_wan(heads=2, head_dim=8, layers=1, ffn_dim=16, text_dim=8)))
    x = torch.randn(2, 2, 3, 8, 8)
    v = torch.randn_like(x)
    t, r = torch.tensor([600.0, 900.0]), torch.tensor([200.0, 100.0])
    text = torch.randn(2, 4, 8)
    jvp = exact_derivative(student, x, v, t, r, text)
    fd, _ = central_difference_and_null(student, x, v, t, r, text, None, 0.05, True, torch.ones(2, dtype=torch.bool))
    assert ((fd - jvp).norm() / jvp.norm()) < 0.02


def test_flow_matching_error_is_zero_for_the_true_straight_path_velocity():
    x0 = torch.randn(4, 1, 1, 2, 2)
    eps = torch.randn_like(x0)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    assert torch.allclose(noisy(x0, eps, t)[0], x0[0]) and torch.allclose(noisy(x0, eps, t)[3], eps[3])

    def oracle(x, tt, r, cond):
        return eps - x0

    assert flow_matching_error(oracle, x0, eps, t, None).abs().max() == 0


def test_stage1_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="derivative"):
        Stage1Config(derivative="forward")
    with pytest.raises(ValueError, match="epsilon"):
        Stage1Config(epsilon=0)
