"""Student, critic and teacher as LoRA views of one frozen base (anystep.models.roles).

References are independent of the code under test: a separate plain AnyFlow model, diffusers' Wan teacher,
and separate peft models holding only one adapter (targets given here as a regex, not taken from roles.py).
"""

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from anystep.models.roles import SharedBase
from anystep.models.wan import AnyFlowStudent, WanVelocity, student_from_wan, tiny_wan

RANK, ALPHA = 4, 8.0   # scaling 2: a wrong scaling shows
STUDENT_RE = r".*\.(attn1\.to_(q|k|v|out\.0)|ffn\.net\.(0\.proj|2)|(time|delta)_embedder\.linear_[12])"
CRITIC_RE = r".*\.(attn1\.to_(q|k|v|out\.0)|ffn\.net\.(0\.proj|2))"
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _wan():
    torch.manual_seed(0)
    wan = tiny_wan(heads=2, head_dim=8, layers=2, ffn_dim=32, text_dim=32)
    with torch.no_grad():  # Wan zero-inits some layers; make every weight matter
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return wan


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 3, 8, 8, generator=g)   # (B, F, C, H, W)
    t = torch.tensor([937.5, 312.5])
    r = torch.tensor([833.3, 0.0])
    text = torch.randn(2, 4, 32, generator=g)
    return x, t, r, text


def _randomize(*views, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for view in views:
            for p in view.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _shared(wan, **kw):
    return SharedBase.from_wan(wan, rank=RANK, alpha=ALPHA, **kw)


def _peft_copy(wan, lora_state, regex):
    """A separate AnyFlow model with one peft adapter holding ``lora_state``."""
    model = student_from_wan(wan).requires_grad_(False)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=regex), "ref")
    loaded = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(lora_state[name.replace(".ref.", ".")])
                p.requires_grad_(True)
                loaded += 1
    assert loaded == len(lora_state)
    return AnyFlowStudent(model), model


def test_view_tensors_are_exactly_the_role_adapters():
    shared = _shared(_wan())
    student, critic, teacher = (shared.role(n) for n in ("student", "critic", "teacher"))
    blocks = {f"blocks.{i}.{m}.lora_{ab}.weight" for i in (0, 1) for m in BLOCK_LINEARS for ab in "AB"}
    embedders = {f"condition_embedder.{e}_embedder.linear_{j}.lora_{ab}.weight"
                 for e in ("time", "delta") for j in (1, 2) for ab in "AB"}
    assert set(student.state_dict()) == blocks | embedders
    assert set(critic.state_dict()) == blocks
    assert dict(teacher.named_parameters()) == {} and teacher.state_dict() == {}
    assert dict(student.named_parameters()).keys() == student.state_dict().keys()
    w = student.state_dict()
    assert w["blocks.0.ffn.net.0.proj.lora_A.weight"].shape == (RANK, 16)
    assert w["blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (32, RANK)
    assert w["condition_embedder.delta_embedder.linear_1.lora_A.weight"].shape == (RANK, 256)
    # the view's tensors are the base's adapter tensors (shared, not copies); the base is frozen
    base = {id(p): n for n, p in shared.base.named_parameters()}
    assert all(".lora_" in base[id(p)] and ".student." in base[id(p)] for p in student.parameters())
    assert all(".critic." in base[id(p)] for p in critic.parameters())
    assert all(p.requires_grad == (".lora_" in n) for n, p in shared.base.named_parameters())
    assert shared.role("student") is student
    with pytest.raises(KeyError):
        shared.role("generator")


def test_fresh_adapters_leave_every_view_equal_to_the_base():
    wan = _wan()
    shared = _shared(wan)
    x, t, r, text = _inputs()
    plain = AnyFlowStudent(student_from_wan(wan))   # a separate copy without peft
    with torch.no_grad():
        assert torch.equal(shared.role("student")(x, t, r, text), plain(x, t, r, text))
        at_t = plain(x, t, t, text)
        for name in ("critic", "teacher"):
            assert torch.equal(shared.role(name)(x, t, t, text), at_t)
            assert torch.equal(shared.role(name)(x, t, r, text), at_t)   # velocity views ignore r


def test_teacher_view_is_the_wan_teacher_whatever_the_adapters():
    wan = _wan()
    shared = _shared(wan)
    _randomize(shared.role("student"), shared.role("critic"))
    x, t, _, text = _inputs()
    with torch.no_grad():
        ref = WanVelocity(wan)(x, t, t, text)
        out = shared.role("teacher")(x, t, t, text)
        shared.role("student")(x, t, t, text)   # switching back and forth leaves no trace
        again = shared.role("teacher")(x, t, t, text)
    # float32 rounding only (diffusers' Wan and AnyFlow classes differ in RoPE and matmul blocking)
    assert (out - ref).abs().max() < 1e-5
    assert torch.equal(out, again)
    assert (shared.role("critic")(x, t, t, text) - ref).abs().max() > 1e-3   # the adapters do act


def test_views_equal_separate_peft_models_in_any_call_order():
    wan = _wan()
    shared = _shared(wan)
    student, critic = shared.role("student"), shared.role("critic")
    _randomize(student, critic)
    ref_s, _ = _peft_copy(wan, student.state_dict(), STUDENT_RE)
    ref_c, _ = _peft_copy(wan, critic.state_dict(), CRITIC_RE)
    x, t, r, text = _inputs()
    with torch.no_grad():
        want_s, want_c = ref_s(x, t, r, text), ref_c(x, t, t, text)
        for _ in range(2):
            torch.testing.assert_close(student(x, t, r, text), want_s, rtol=0, atol=1e-6)
            torch.testing.assert_close(critic(x, t, t, text), want_c, rtol=0, atol=1e-6)
        shared.role("teacher")(x, t, t, text)
        torch.testing.assert_close(student(x, t, r, text), want_s, rtol=0, atol=1e-6)
    assert (want_s - ref_c(x, t, r, text)).abs().max() > 1e-3


def test_gradients_reach_only_the_called_role():
    shared = _shared(_wan())
    student, critic = shared.role("student"), shared.role("critic")
    _randomize(student, critic)
    x, t, r, text = _inputs()

    student(x, t, r, text).square().mean().backward()                          # (a)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is None for n, p in shared.base.named_parameters() if ".lora_" not in n)   # (c)

    for p in student.parameters():
        p.grad = None
    critic(x, t, t, text).square().mean().backward()                           # (b)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for n, p in shared.base.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_student_gradient_survives_critic_and_teacher_calls_before_backward(checkpointing):
    """(d) DMD's order: student rollout with grad, critic and teacher under no_grad, then backward. peft's
    own adapter switch would freeze the student's LoRA and silently drop its gradient."""
    wan = _wan()
    shared = _shared(wan)
    student, critic, teacher = shared.role("student"), shared.role("critic"), shared.role("teacher")
    _randomize(student, critic)
    if checkpointing:   # backward recomputes the blocks, after the critic was active
        shared.enable_gradient_checkpointing()
    x, t, r, text = _inputs()
    mid = (t + r) / 2

    def rollout(model):   # two flow-map steps t -> mid -> r, then a loss
        x1 = x - (t - mid)[:, None, None, None, None] / 1000 * model(x, t, mid, text)
        return x1 - (mid - r)[:, None, None, None, None] / 1000 * model(x1, mid, r, text)

    out = rollout(student)
    with torch.no_grad():
        fake, real = critic(out, r, r, text), teacher(out, r, r, text)
    critic(out.detach(), t, t, text).sum()   # a critic graph that is never back-propagated
    (out * (fake - real)).mean().backward()

    ref, ref_model = _peft_copy(wan, student.state_dict(), STUDENT_RE)
    ref_out = rollout(ref)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    (ref_out * (fake - real)).mean().backward()
    ref_grads = {n.replace(".ref.", "."): p.grad for n, p in ref_model.named_parameters() if ".lora_" in n}
    for name, p in student.named_parameters():
        assert p.requires_grad and p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in critic.parameters())


def test_forward_mode_jvp_through_a_view():
    """Stage 1's exact derivative (torch.func.jvp) runs through the student view while it switches adapters."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    wan = _wan()
    shared = _shared(wan)
    student = shared.role("student")
    _randomize(student)
    ref, _ = _peft_copy(wan, student.state_dict(), STUDENT_RE)
    x, t, r, text = _inputs()
    tangents = (torch.randn_like(x) / 1000, torch.ones_like(t))

    def dudt(model):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda xx, tt: model(xx, tt, r, text), (x, t), tangents)[1]

    torch.testing.assert_close(dudt(student), dudt(ref), rtol=0, atol=1e-6)
    assert shared.active_adapter is None and all(p.requires_grad for p in student.parameters())


def test_checkpointing_must_go_through_the_shared_base():
    shared = _shared(_wan())
    shared.base.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="SharedBase.enable_gradient_checkpointing"):
        shared.role("student")(*_inputs())


def test_view_state_dict_round_trip_through_safetensors(tmp_path):
    wan = _wan()
    shared = _shared(wan)
    _randomize(shared.role("student"), shared.role("critic"))
    x, t, r, text = _inputs()
    for name in ("student", "critic"):
        save_file(shared.role(name).state_dict(), tmp_path / f"{name}.safetensors")
    torch.manual_seed(123)   # a different LoRA-A initialisation
    fresh = _shared(wan)
    with torch.no_grad():
        assert not torch.equal(fresh.role("student")(x, t, r, text), shared.role("student")(x, t, r, text))
        for name in ("student", "critic"):
            fresh.role(name).load_state_dict(load_file(tmp_path / f"{name}.safetensors"))
        for name, rr in (("student", r), ("critic", t), ("teacher", t)):
            assert torch.equal(fresh.role(name)(x, t, rr, text), shared.role(name)(x, t, rr, text))
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.role("student").load_state_dict(load_file(tmp_path / "critic.safetensors"))


def test_merged_adapter_equals_the_adapter_view():
    wan = _wan()
    shared = _shared(wan)
    student, critic = shared.role("student"), shared.role("critic")
    _randomize(student, critic)
    x, t, r, text = _inputs()
    merged = shared.merged("student")
    assert merged.state_dict().keys() == student_from_wan(wan).state_dict().keys()   # a plain model
    with torch.no_grad():
        torch.testing.assert_close(AnyFlowStudent(merged)(x, t, r, text), student(x, t, r, text),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(AnyFlowStudent(shared.merged("critic"))(x, t, t, text),
                                   critic(x, t, t, text), rtol=0, atol=1e-5)
        # an explicit LoRA state (e.g. the EMA) instead of the live one; zeros give back the base
        zeros = {k: torch.zeros_like(v) for k, v in student.state_dict().items()}
        plain = AnyFlowStudent(student_from_wan(wan))(x, t, r, text)
        assert torch.equal(AnyFlowStudent(shared.merged("student", zeros))(x, t, r, text), plain)
        # merging copies: the shared base is untouched
        assert (shared.role("teacher")(x, t, t, text) - WanVelocity(wan)(x, t, t, text)).abs().max() < 1e-5


def test_adamw_on_a_view_updates_only_its_adapter():
    shared = _shared(_wan())
    student, critic, teacher = shared.role("student"), shared.role("critic"), shared.role("teacher")
    before = {n: p.detach().clone() for n, p in shared.base.named_parameters()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    assert len(opt.param_groups[0]["params"]) == len(student.state_dict())
    x, t, r, text = _inputs()
    for _ in range(3):
        opt.zero_grad()
        out = student(x, t, r, text)
        with torch.no_grad():
            target = teacher(x, t, t, text) + critic(x, t, t, text)
        (out - target).square().mean().backward()
        opt.step()
    after = dict(shared.base.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {n for n in before if ".lora_" in n and ".student." in n}


def test_moving_a_view_moves_the_shared_base():
    wan = _wan()
    shared = _shared(wan)
    student = shared.role("student")
    _randomize(student)
    x, t, r, text = _inputs()
    with torch.no_grad():
        want = student(x, t, r, text).double()
        student.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in shared.base.parameters())
        assert all(p.dtype == torch.float64 for p in student.parameters())
        out = student(x.double(), t.double(), r.double(), text.double())
    assert (out - want).abs().max() < 1e-4
    assert {id(p) for p in student.parameters()} <= {id(p) for p in shared.base.parameters()}


def test_from_wan_builds_the_asked_delta_time_and_refuses_a_conflicting_anyflow_base():
    wan = tiny_wan(in_channels=4, text_dim=32, heads=2, head_dim=8, layers=1, ffn_dim=16)
    shared = SharedBase.from_wan(wan, rank=4, gate_value=0.5, deltatime_type="t-r")
    assert shared.base.config.gate_value == 0.5 and shared.base.config.deltatime_type == "t-r"
    with pytest.raises(ValueError, match="deltatime_type"):
        SharedBase.from_wan(student_from_wan(wan), rank=4, deltatime_type="t-r")
