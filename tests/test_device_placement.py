"""Device placement, checked without a GPU.

The first CUDA run of Stage 1 crashed on a tensor that the library created on the CPU (by default) and mixed
with CUDA data. This guard finds that class of bug on a CPU-only machine: the data and the models live on the
CPU, and every training and sampling path runs under :class:`ImplicitDeviceOnMeta`, which puts every tensor
that *anystep's own code* creates without naming a device on ``meta``. Such a tensor cannot meet the real
(CPU) data: torch raises ("Cannot copy out of meta tensor", "Expected all tensors to be on the same device")
exactly where it would have met CUDA data on a GPU. Library code (diffusers, peft, torch) is left alone:
it may build tables on the CPU and move them, which is right on every device. So is the shapes world's
renderer and judge, a CPU component by contract (``OnDevice`` moves its batches to the training device, the
sweep judges CPU copies of the samples).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from anystep.backward_simulation import (
    RolloutPlan,
    consistency_backward_simulation,
    flowmap_backward_simulation,
)
from anystep.causal import causal_backward_simulation, sample_causal
from anystep.evaluate.sweep import Sampler, sample_batched
from anystep.flowmap import guided, sample, sample_consistency
from anystep.kinds import Parts, kind
from anystep.kinds.consistency import ConsistencyConfig
from anystep.kinds.stage2 import DMDConfig, Stage2Config
from anystep.models import zoo
from anystep.models.far import CausalStudent, far_student_from_wan
from anystep.models.roles import SharedBase
from anystep.models.wan import tiny_wan
from anystep.objectives.flowmap import Stage1Config
from anystep.train.loop import OptimConfig, Trainer
from anystep.worlds import OnDevice
from anystep.worlds.gmm import GMMData
from anystep.worlds.shapes import ShapesConfig, ShapesData

FACTORIES = {torch.linspace, torch.logspace, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor, torch.as_tensor}


class ImplicitDeviceOnMeta(TorchFunctionMode):
    """Tensor factories called from ``anystep`` without ``device=`` make their tensor on ``meta``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        copies_a_tensor = func in (torch.tensor, torch.as_tensor) and args and torch.is_tensor(args[0])
        if func in FACTORIES and "device" not in kwargs and not copies_a_tensor and self._from_anystep():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)

    @staticmethod
    def _from_anystep() -> bool:
        module = sys._getframe(2).f_globals.get("__name__", "")
        return module.startswith("anystep") and not module.startswith(CPU_COMPONENTS)


CPU_COMPONENTS = ("anystep.worlds.shapes",)


@contextlib.contextmanager
def implicit_tensors_on_meta():
    with ImplicitDeviceOnMeta():
        yield


def _shapes(causal: bool = False):
    shapes = (ShapesConfig(size=8, frames=5, shape_size=3.0, speed=1.0) if causal
              else ShapesConfig(size=8, frames=3, shape_size=3.0, speed=1.0))
    return ShapesData(shapes)


def _gmm():
    return GMMData()


def _wan_net(seed=0):
    torch.manual_seed(seed)
    return tiny_wan(in_channels=3, text_dim=32, heads=2, head_dim=8, layers=1, ffn_dim=16, patch=(1, 2, 2))


def _velocity(world):
    net = zoo.MLPConfig(hidden=16, depth=1) if world.network == "mlp" else zoo.ToyWanConfig(
        patch=(1, 2, 2), heads=2, head_dim=8, layers=1, ffn_dim=16)
    return zoo.velocity_network(world.network, net, world.network_inputs())


def _student(world):
    return zoo.student_from(_velocity(world))


def _far(partition=(1, 2, 2)):
    return CausalStudent(far_student_from_wan(_wan_net(), chunk_partition=partition))


def _method(name, roles, world, batch, **sections):
    """The kind's own method, built as the assembly builds it (on the data's device: the CPU)."""
    spec = kind(name)
    sections = {key: sections.get(key, make()) for key, make in spec.sections.items()}
    return spec.make(Parts(roles, OnDevice(world, "cpu"), batch, 0, sections))


def _step(method, tmp_path):
    optim = {role: OptimConfig(lr=1e-4, warmup_steps=0) for role in method.roles}
    trainer = Trainer(method, steps=1, out_dir=tmp_path, optim=optim, progress=False)
    with implicit_tensors_on_meta():
        stats = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


STAGE1_VARIANTS = [Stage1Config(), Stage1Config(derivative="jvp"), Stage1Config(fd_boundary="none"),
                   Stage1Config(time_dtype="bfloat16", bucket_split="official"),
                   Stage1Config(weight_type="uniform", fuse_guidance_scale=None)]


@pytest.mark.parametrize("cfg", STAGE1_VARIANTS, ids=["official", "jvp", "fd_none", "bf16_times", "plain"])
def test_stage1_creates_every_tensor_on_the_data_device(cfg, tmp_path):
    world = _shapes()
    _step(_method("stage1", {"student": _student(world)}, world, 4, stage1=cfg), tmp_path)


def test_teacher_and_consistency_create_every_tensor_on_the_data_device(tmp_path):
    world = _gmm()
    _step(_method("teacher", {"teacher": _velocity(world)}, world, 8), tmp_path / "t")
    roles = {"student": _student(world), "teacher": world.exact_teacher()}
    _step(_method("consistency", roles, world, 8, consistency=ConsistencyConfig(intervals=4)), tmp_path / "c")


@pytest.mark.parametrize("name, grad", [("stage2", "all"), ("stage2", "one"), ("cbs", None)])
def test_stage2_creates_every_tensor_on_the_data_device(name, grad, tmp_path):
    world = _shapes()
    roles = {"student": _student(world), "critic": _velocity(world),
             "teacher": _velocity(world).requires_grad_(False)}
    cfg = (Stage2Config(rollout_grad=grad, rollout_steps=(2, 4), dmd_batch_size=2) if grad else
           DMDConfig(rollout_steps=(2, 4), dmd_batch_size=2))
    _step(_method(name, roles, world, 4, **{name: cfg}), tmp_path)


def test_stage2_with_lora_roles_creates_every_tensor_on_the_data_device(tmp_path):
    world = _shapes()
    shared = SharedBase.from_wan(_wan_net(), rank=4)
    roles = {r: shared.role(r) for r in ("student", "critic", "teacher")}
    _step(_method("stage2", roles, world, 2, stage2=Stage2Config(rollout_steps=(2,), dmd_batch_size=2)), tmp_path)


def test_causal_stage1_and_stage2_create_every_tensor_on_the_data_device(tmp_path):
    world = _shapes(causal=True)
    _step(_method("stage1", {"student": _far()}, world, 2, stage1=Stage1Config(bidirectional_prob=1.0)),
          tmp_path / "s1")
    shared = SharedBase(far_student_from_wan(_wan_net(), chunk_partition=(1, 2, 2)), rank=4)
    roles = {r: shared.role(r) for r in ("student", "critic", "teacher")}
    _step(_method("stage2", roles, world, 2, stage2=Stage2Config(rollout_steps=(2,), dmd_batch_size=2)),
          tmp_path / "s2")


def test_samplers_create_every_tensor_on_the_data_device():
    world = _shapes(causal=True)
    ev = world.eval_set(2, seed=0)
    student, far = _student(world), _far()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), implicit_tensors_on_meta():
        for steps in (1, 3, [1000.0, 500.0, 0.0]):
            sample(student, ev.noise, ev.cond, steps)
            sample(guided(_velocity(world), 3.0, world.null_cond), ev.noise, ev.cond, steps, mean_velocity=False)
            sample_consistency(student, ev.noise, ev.cond, steps, generator=g)
        for mode in ("flowmap", "euler", "consistency"):
            sample_batched(Sampler(mode, student, 1.0, mode), world.null_cond, ev.noise, ev.cond, 2, 5.0)
        sample_causal(far, ev.noise, ev.cond, 2)
        sample_causal(far, ev.noise, ev.cond, 2, given=ev.noise[:, :1].clone())
        plan = RolloutPlan(4, 1)
        flowmap_backward_simulation(student, ev.noise, ev.cond, plan)
        consistency_backward_simulation(student, ev.noise, ev.cond, plan, generator=g)
        causal_backward_simulation(far, ev.noise, ev.cond, plan)


def test_the_guard_catches_an_implicit_cpu_tensor():
    """The guard itself: a tensor made without a device cannot meet the data (it could on a CPU-only run)."""
    probe = {"__name__": "anystep.probe", "torch": torch}
    exec("def scaled(x):\n    return x * torch.linspace(0, 1, x.shape[0])\n", probe)  # noqa: S102
    x = torch.ones(3)
    assert torch.equal(probe["scaled"](x), torch.linspace(0, 1, 3))
    with implicit_tensors_on_meta(), pytest.raises((RuntimeError, NotImplementedError)):
        probe["scaled"](x)
