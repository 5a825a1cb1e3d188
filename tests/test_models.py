import pytest
import torch

from anystep.models.toy import ToyFlowMapNet
from anystep.models.wan import AnyFlowStudent, WanVelocity, student_from_wan, tiny_wan


def _perturbed_wan(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    wan = tiny_wan(heads=2, head_dim=8, layers=2, ffn_dim=32, text_dim=16, **kw)
    with torch.no_grad():  # Wan zero-inits some layers; make every weight matter
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return wan.to(dtype)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 8, 8, generator=g).to(dtype)   # (B, F, C, H, W)
    t = torch.tensor([999.0, 312.5])
    text = torch.randn(2, 5, 16, generator=g).to(dtype)
    return x, t, text


def test_student_equals_the_wan_teacher_at_r_equals_t_float64():
    wan = _perturbed_wan(torch.float64)
    student = student_from_wan(wan)
    x, t, text = _inputs(torch.float64)
    teacher_out = WanVelocity(wan)(x, t, t, text)
    student_out = AnyFlowStudent(student)(x, t, t, text)
    # not 1e-15: diffusers' two classes implement RoPE differently (Wan: real cos/sin tables from float32
    # frequencies; AnyFlow: a complex128 rotation), which leaves float32-level differences even in float64
    assert (teacher_out - student_out).abs().max() < 1e-6


def test_student_equals_the_wan_teacher_at_r_equals_t_float32():
    wan = _perturbed_wan()
    student = student_from_wan(wan)
    x, t, text = _inputs()
    diff = (WanVelocity(wan)(x, t, t, text) - AnyFlowStudent(student)(x, t, t, text)).abs().max()
    # float32 rounding only: the AnyFlow embedder runs B*F rows where Wan runs B (different matmul blocking)
    assert diff < 1e-5


def test_interpolated_embedding_is_bit_identical_to_the_time_embedding_at_r_equals_t():
    """(1 - g) E_t(t) + g E_r(t) with E_r a copy of E_t is E_t(t) bit for bit, so the student at r = t is
    bit-identical to the same network with gate 0 (no delta branch at all)."""
    wan = _perturbed_wan()
    student = student_from_wan(wan, gate_value=0.25)
    plain = student_from_wan(wan, gate_value=0.0)
    x, t, text = _inputs()
    assert torch.equal(AnyFlowStudent(student)(x, t, t, text), AnyFlowStudent(plain)(x, t, t, text))


def test_student_depends_on_r_and_its_delta_embedder_trains_and_is_saved():
    wan = _perturbed_wan()
    student = student_from_wan(wan)
    x, t, text = _inputs()
    out_t = AnyFlowStudent(student)(x, t, t, text)
    out_r = AnyFlowStudent(student)(x, t, t * 0.25, text)
    assert (out_t - out_r).abs().max() > 1e-3
    keys = [k for k in student.state_dict() if "delta_embedder" in k]
    assert len(keys) == 4
    out_r.square().mean().backward()
    grad = student.condition_embedder.delta_embedder.linear_1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert torch.equal(student.condition_embedder.delta_embedder.linear_1.weight,
                       wan.condition_embedder.time_embedder.linear_1.weight)


def test_layouts_are_checked():
    wan = _perturbed_wan()
    _x, t, text = _inputs()
    with pytest.raises(ValueError, match=r"\(B, F, C=3, H, W\)"):
        WanVelocity(wan)(torch.randn(2, 3, 4, 8, 8), t, t, text)  # (B, F, C=4, ...)
    with pytest.raises(ValueError, match="rms_norm_across_heads"):
        student_from_wan(tiny_wan(heads=2, head_dim=8, layers=1, ffn_dim=16, text_dim=16, qk_norm="rms_norm"))


def test_toy_flowmap_net_equals_its_velocity_net_at_r_equals_t():
    torch.manual_seed(0)
    vel = ToyFlowMapNet((2, 1, 2, 2), 4, hidden=32, depth=2)
    with torch.no_grad():
        for p in vel.delta_embedder.parameters():
            p.add_(1.0)  # before conversion the delta branch is unused (and differs)
    x = torch.randn(5, 2, 1, 2, 2)
    t = torch.rand(5) * 1000
    labels = torch.tensor([0, 1, 2, 3, 4])
    before = vel(x, t, t, labels)
    import copy
    student = copy.deepcopy(vel).to_flowmap()
    assert torch.equal(student(x, t, t, labels), before)
    assert (student(x, t, t * 0.1, labels) - before).abs().max() > 0
    with pytest.raises(ValueError, match="shape"):
        student(torch.randn(5, 8), t, t, labels)


def test_zero_init_delta_starts_as_the_velocity_network_for_every_r():
    """``model.delta_init=zero`` (the paper's Fig. 7 baseline): at the start the student is the velocity
    network at every r, not only at r = t, and its delta branch is the part that changes under training; the
    official copy depends on r from the start."""
    from anystep.models import zoo
    torch.manual_seed(0)
    vel = ToyFlowMapNet((2, 1, 2, 2), 4, hidden=32, depth=2)
    x, t, labels = torch.randn(5, 2, 1, 2, 2), torch.rand(5) * 1000, torch.tensor([0, 1, 2, 3, 4])
    r = t * torch.rand(5)
    zero = zoo.zero_init_delta(zoo.student_from(vel, gate_value=0.25))
    assert (zero(x, t, r, labels) - vel(x, t, t, labels)).abs().max() < 1e-5
    assert (zoo.student_from(vel, gate_value=0.25)(x, t, r, labels) - vel(x, t, t, labels)).abs().max() > 1e-3
    loss = zero(x, t, r, labels).square().mean()
    loss.backward()
    assert zero.delta_embedder.linear_2.weight.grad.abs().sum() > 0         # it trains
    wan = _perturbed_wan(torch.float64)
    student = zoo.zero_init_delta(zoo.student_from(WanVelocity(wan), gate_value=0.25).double())
    xw, tw, text = _inputs(torch.float64)
    rw = tw * 0.3
    assert (student(xw, tw, rw, text) - WanVelocity(wan)(xw, tw, tw, text)).abs().max() < 1e-6
