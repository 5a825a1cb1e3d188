"""Stage-2 roles (student, critic, teacher) on one frozen base with peft LoRA adapters.

The official code holds three full transformers: the student (flow map), the critic and the frozen teacher
(velocity models), each with its own LoRA. Here one frozen ``AnyFlowTransformer3DModel`` built with
:func:`~anystep.models.wan.student_from_wan` (so at r = t it *is* the Wan teacher) carries two adapters:

* ``"student"``: LoRA on ``attn1.{to_q,to_k,to_v,to_out.0}``, ``ffn.net.0.proj``, ``ffn.net.2`` and the
  linears of ``condition_embedder.{time,delta}_embedder`` (the official Stage-1/2 student targets; the
  delta embedder trains through its LoRA, its base weights stay frozen as in the official code);
* ``"critic"``: LoRA on the same block linears, not on the embedders (the official teacher/critic targets);
* the teacher is the base with every adapter disabled (or, optionally, a frozen ``"teacher"`` adapter).

A training run asks :meth:`SharedBase.role` for a :class:`RoleView` per role. A view follows anystep's
flow-map contract ``u = view(x[B, F, C, H, W], t[B], r[B], text[B, L, D])`` and switches the shared base
to its adapter for the duration of each call. A velocity view (critic, teacher) ignores ``r`` and feeds
r = t, like :class:`~anystep.models.wan.WanVelocity`. What the generic trainer sees of a view,
``parameters()``, ``named_parameters()``, ``state_dict()`` and ``load_state_dict()``, is exactly that
role's adapter tensors, under peft's adapter-free key names (``blocks.0.attn1.to_q.lora_A.weight``): the
base is held outside nn.Module's bookkeeping, and the adapter Parameters are registered on the view too.

Adapter switching never touches ``requires_grad``: peft's ``set_adapter``/``enable_adapters`` freeze the
inactive adapters, which would silently drop the student's gradient when the critic or teacher runs between
the student's forward and its backward (DMD does exactly that), and which raises inside ``torch.func.jvp``.
The switch here sets only the LoRA layers' active-adapter and disabled flags.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from .checkpointing import BlockCheckpointing
from .wan import _check_video, anyflow_call, student_from_wan

# Substrings of the nn.Linear names that get LoRA (the official ``filter_learnable_module``).
VELOCITY_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")
STUDENT_TARGETS = VELOCITY_TARGETS + ("condition_embedder.time_embedder", "condition_embedder.delta_embedder")


@dataclass
class Adapter:
    """One LoRA adapter on the base: its targets (qualified module names), rank, alpha and Parameters
    (keyed by peft's adapter-free names, e.g. ``blocks.0.attn1.to_q.lora_A.weight``)."""

    name: str
    targets: list[str]
    rank: int
    alpha: float
    trainable: bool
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Role:
    adapter: str | None   # None: the bare base (all adapters disabled)
    flowmap: bool         # True: uses r (student); False: a velocity model, r := t (critic, teacher)
    owned: tuple[str, ...] = ()   # base modules this role trains fully (FAR student: far_patch_embedding)


def lora_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules whose name contains one of ``patterns`` (a layer that
    already carries LoRA counts as its base linear; peft's inner modules are skipped)."""
    tuner_paths = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    names = []
    for name, module in model.named_modules():
        inner = any(name.startswith(p + ".") for p in tuner_paths)
        is_linear = isinstance(module, nn.Linear) or (isinstance(module, LoraLayer)
                                                      and isinstance(module.get_base_layer(), nn.Linear))
        if is_linear and not inner and any(s in name for s in patterns):
            names.append(name)
    return names


class SharedBase(nn.Module):
    """A frozen ``AnyFlowTransformer3DModel`` with one LoRA adapter per trainable role.

    Args:
        base: the base transformer, e.g. ``student_from_wan(wan)``; every base parameter is frozen.
        rank, alpha: LoRA rank and alpha of the student and critic adapters (official: 256 / 256;
            ``alpha=None`` means alpha = rank). The scaling is alpha / rank.
        roles: the trainable roles to add among ``"student"`` and ``"critic"`` (both by default; a LoRA
            teacher fine-tune needs neither).
        teacher_adapter: also add a ``"teacher"`` adapter (velocity targets) for a teacher that is itself a
            LoRA on the base (the official teacher fine-tune); by default the teacher is the bare base.
        teacher_trainable: the teacher adapter trains (a teacher fine-tune run); frozen otherwise.

    ``role(name)`` gives the view of ``"student"``, ``"critic"`` or ``"teacher"``. Move the whole thing with
    ``shared.to(...)`` (or any view's ``.to(...)``, which moves the shared base). For gradient checkpointing
    call :meth:`enable_gradient_checkpointing` here, not on the base: the recomputation in backward must
    run with the adapter of the forward, not with whichever is active then.
    """

    def __init__(self, base: AnyFlowTransformer3DModel | AnyFlowFARTransformer3DModel, *, rank: int = 256,
                 alpha: float | None = None, roles: Sequence[str] = ("student", "critic"),
                 teacher_adapter: bool = False, teacher_trainable: bool = False):
        super().__init__()
        if set(roles) - {"student", "critic"}:
            raise ValueError(f"roles must be among 'student', 'critic'; got {list(roles)}")
        self.base = base.requires_grad_(False)
        self.causal = isinstance(base, AnyFlowFARTransformer3DModel)
        self.adapters: dict[str, Adapter] = {}
        self.roles: dict[str, Role] = {}
        self._views: dict[str, RoleView] = {}
        self._active: str | None = None
        self._tuners: list[LoraLayer] = []
        if "student" in roles:   # a causal (FAR) student also trains its compressed patch embedding fully
            self.add_role("student", targets=STUDENT_TARGETS, flowmap=True, rank=rank, alpha=alpha,
                          owned=("far_patch_embedding",) if self.causal else ())
        if "critic" in roles:
            self.add_role("critic", targets=VELOCITY_TARGETS, flowmap=False, rank=rank, alpha=alpha)
        self.add_role("teacher", targets=VELOCITY_TARGETS if teacher_adapter else None, flowmap=False,
                      trainable=teacher_trainable, rank=rank, alpha=alpha)

    @classmethod
    def from_wan(cls, wan: WanTransformer3DModel | AnyFlowTransformer3DModel, *, gate_value: float = 0.25,
                 deltatime_type: str = "r", **kwargs) -> SharedBase:
        """The shared base of a Wan teacher: ``student_from_wan(wan, gate_value, deltatime_type)`` (its own copy
        of the weights). An AnyFlow transformer (a released AnyFlow model, imported to train on) is the base as
        it is; its own gate and delta-time type must then be the ones asked for (an error otherwise)."""
        if isinstance(wan, AnyFlowTransformer3DModel):
            own = (wan.config.gate_value, wan.config.deltatime_type)
            if own != (gate_value, deltatime_type):
                raise ValueError(f"the AnyFlow base has gate_value={own[0]} and deltatime_type={own[1]!r}; "
                                 f"model.gate_value={gate_value} and model.deltatime_type={deltatime_type!r} "
                                 "were asked for: set them to the base's")
            return cls(wan, **kwargs)
        return cls(student_from_wan(wan, gate_value=gate_value, deltatime_type=deltatime_type), **kwargs)

    def copy_adapter(self, source: str, target: str) -> None:
        """Set adapter ``target``'s weights to ``source``'s (the critic starts as the LoRA teacher). Both
        must have the same targets and rank."""
        src, dst = self.adapters[source], self.adapters[target]
        if (src.targets, src.rank) != (dst.targets, dst.rank):
            raise ValueError(f"adapters {source!r} and {target!r} differ in targets or rank")
        with torch.no_grad():
            for key, p in dst.params.items():
                p.copy_(src.params[key])

    # ------------------------------------------------------------------ building
    def add_role(self, name: str, *, targets: Sequence[str] | None, flowmap: bool, trainable: bool = True,
                 rank: int = 256, alpha: float | None = None, owned: Sequence[str] = ()) -> None:
        """Add a role; ``targets`` (substrings of linear names) gives it a LoRA adapter of the same name,
        ``None`` makes it the bare base. ``owned``: base modules the role trains fully (their weights are the
        base's, so every role sees them; the FAR student's compressed patch embedding, which only its
        compressed context uses)."""
        if name in self.roles:
            raise ValueError(f"role {name!r} exists already")
        if targets is not None:
            self._add_adapter(name, lora_targets(self.base, targets), rank, rank if alpha is None else alpha,
                              trainable)
        for module in owned:   # fp32 master weights (as the adapters), computed in bf16 under autocast
            getattr(self.base, module).float().requires_grad_(trainable)
        self.roles[name] = Role(adapter=name if targets is not None else None, flowmap=flowmap, owned=tuple(owned))

    def _add_adapter(self, name: str, targets: list[str], rank: int, alpha: float, trainable: bool) -> None:
        if not targets:
            raise ValueError(f"adapter {name!r}: no linear layer matches the targets")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets)
        with warnings.catch_warnings():  # peft warns that a second adapter makes "multiple adapters"
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            self.base.add_adapter(config, adapter_name=name)  # diffusers' PeftAdapterMixin
        self.adapters[name] = Adapter(name, targets, rank, float(alpha), trainable)
        self._collect()
        with torch.no_grad():   # float32 adapters on a bf16 base (peft makes them in the base's dtype)
            for p in self.adapters[name].params.values():
                p.data = p.data.float()
        for module in self._tuners:
            if not (hasattr(module, "_active_adapter") and hasattr(module, "_disable_adapters")):
                raise RuntimeError(f"this peft version's LoRA layers lack _active_adapter/_disable_adapters; "
                                   f"anystep's adapter switch needs them ({type(module).__name__})")
        self._activate(None)
        self._restore_requires_grad()  # add_adapter froze the adapters added before this one

    def _collect(self) -> None:
        """(Re)read the LoRA layers and each adapter's Parameters from the base."""
        self._tuners = [m for m in self.base.modules() if isinstance(m, LoraLayer)]
        for adapter in self.adapters.values():
            adapter.params = {}
        for path, module in self.base.named_modules():
            if isinstance(module, LoraLayer):
                for layer_name in module.adapter_layer_names:
                    holder = getattr(module, layer_name)
                    for name, adapter in self.adapters.items():
                        if name not in holder:
                            continue
                        item = holder[name]   # a module (lora_A/B) or a bare Parameter (ParameterDict)
                        pairs = [("", item)] if isinstance(item, nn.Parameter) else item.named_parameters()
                        for pname, p in pairs:
                            adapter.params[".".join(filter(None, (path, layer_name, pname)))] = p
        for view in self._views.values():
            view._register_adapter_params()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._collect()  # in case the conversion made new Parameter objects
        return self

    def _restore_requires_grad(self) -> None:
        for adapter in self.adapters.values():
            for p in adapter.params.values():
                p.requires_grad_(adapter.trainable)
        for role in self.roles.values():
            trainable = self.adapters[role.adapter].trainable if role.adapter else True
            for module in role.owned:
                getattr(self.base, module).requires_grad_(trainable)

    # ------------------------------------------------------------------ switching
    def _activate(self, adapter: str | None) -> None:
        # peft's set_adapter / enable_adapters would also set requires_grad (freezing the inactive adapters),
        # which drops gradients still in flight and is an error inside torch.func transforms (jvp): set the
        # two state attributes they set, and nothing else. A layer without this adapter runs its base only.
        for module in self._tuners:
            module._disable_adapters = adapter is None
            if adapter is not None:
                module._active_adapter = [adapter]
        self._active = adapter

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[None]:
        """Run the base with ``adapter`` active (``None``: all disabled), then switch back."""
        previous = self._active
        if adapter != previous:
            self._activate(adapter)
        try:
            yield
        finally:
            if adapter != previous:
                self._activate(previous)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def enable_gradient_checkpointing(self, fraction: float = 1.0, save: str = "none") -> None:
        """Checkpoint the base's blocks (:class:`~anystep.models.checkpointing.BlockCheckpointing`: the first
        ``round(fraction * num_blocks)``, keeping the attention outputs with ``save="attention"``; default: every
        block, wholly); the recomputation re-activates the adapter its forward ran with."""
        self._blocks = BlockCheckpointing(self.base.blocks, fraction, save)
        self.base.enable_gradient_checkpointing(self._checkpoint)

    def _checkpoint(self, block: nn.Module, *args):
        adapter = self._active

        def run(*a):
            with self.using(adapter):
                return block(*a)

        return self._blocks(block, *args, run=run)

    # ------------------------------------------------------------------ views and export
    def role(self, name: str) -> RoleView:
        """The role's view (one object per role and SharedBase)."""
        if name not in self.roles:
            raise KeyError(f"unknown role {name!r}; roles: {sorted(self.roles)}")
        if name not in self._views:
            causal = self.causal and self.roles[name].flowmap
            self._views[name] = (CausalRoleView if causal else RoleView)(self, name)
        return self._views[name]

    def merged(self, role: str = "student",
               lora_state: Mapping[str, torch.Tensor] | None = None) -> AnyFlowTransformer3DModel:
        """A plain copy of the base (no peft layers) with the role's adapter merged in:
        ``W + (alpha / rank) B A``. ``lora_state`` (a view's state dict, e.g. its EMA) replaces the live
        adapter weights (and the role's fully trained base modules, if any)."""
        name = self.roles[role].adapter
        state = {}
        for key, value in self.base.state_dict().items():
            if ".lora_" not in key:
                state[key.replace(".base_layer.", ".")] = value.detach().clone()
        if lora_state is not None:
            for module in self.roles[role].owned:
                for key in [k for k in lora_state if k.startswith(module + ".")]:
                    state[key] = lora_state[key].detach().clone().to(state[key].dtype)
        if name is not None:
            adapter = self.adapters[name]
            lora = dict(lora_state) if lora_state is not None else adapter.params
            for path in adapter.targets:
                w = state[f"{path}.weight"]
                a, b = (lora[f"{path}.lora_{ab}.weight"].to(w.device, torch.float32) for ab in "AB")
                state[f"{path}.weight"] = (w.float() + adapter.scaling * (b @ a)).to(w.dtype)
        model = type(self.base).from_config(self.base.config)
        model.load_state_dict(state, strict=True, assign=True)
        return model.train(self.base.training)


class RoleView(nn.Module):
    """One role of a :class:`SharedBase` as a flow-map model. Its parameters and state dict are the role's
    adapter tensors only (none for the bare teacher); the base is not a submodule."""

    def __init__(self, shared: SharedBase, role: str):
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # a plain attribute: not in parameters()/state_dict()
        spec = shared.roles[role]
        self.role, self.adapter, self.flowmap = role, spec.adapter, spec.flowmap
        self._register_adapter_params()

    def _register_adapter_params(self) -> None:
        for name in list(self._modules):
            del self._modules[name]
        params = {} if self.adapter is None else dict(self._shared.adapters[self.adapter].params)
        for module in self._shared.roles[self.role].owned:
            for pname, p in getattr(self._shared.base, module).named_parameters():
                params[f"{module}.{pname}"] = p
        for key, p in params.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:  # mirror the base's module path, so the names are peft's
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_parameter(leaf, p)

    @property
    def shared(self) -> SharedBase:
        return self._shared

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.flowmap:
            r = t
        if self._shared.causal:   # a velocity role of a FAR base (critic, teacher): full attention
            return self.bidirectional(x, t, r, text)
        with self._shared.using(self.adapter):
            return anyflow_call(self._shared.base, x, t, r, text)

    def bidirectional(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """All frames as one chunk (FAR base), with this role's adapter (a velocity role uses r = t)."""
        from .far import bidirectional

        with self._shared.using(self.adapter):
            return bidirectional(self._shared.base, x, t.to(x.device), (r if self.flowmap else t).to(x.device), text)

    def _check_input(self, x: torch.Tensor) -> None:
        shared = self._shared
        _check_video(x, shared.base.config.in_channels)
        if shared.base.gradient_checkpointing and shared.base._gradient_checkpointing_func != shared._checkpoint:
            raise RuntimeError("gradient checkpointing was enabled on the base directly; use "
                               "SharedBase.enable_gradient_checkpointing() so that backward recomputes with "
                               "the right adapter")

    def _apply(self, fn, recurse: bool = True):
        # moving/casting a view moves the shared base (and so this view's tensors, which live in it)
        self._shared._apply(fn, recurse)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"RoleView(role={self.role!r}, adapter={self.adapter!r}, flowmap={self.flowmap}, "
                f"adapter_params={n})")


class CausalRoleView(RoleView):
    """The causal student's role of a FAR :class:`SharedBase`: a :class:`~anystep.causal.CausalFlowMap`
    (:class:`~anystep.models.far.CausalStudent` on the shared base, every call under this role's adapter)."""

    def __init__(self, shared: SharedBase, role: str):
        from .far import CausalStudent

        super().__init__(shared, role)
        object.__setattr__(self, "_causal", CausalStudent(shared.base, active=lambda: shared.using(self.adapter)))

    @property
    def chunk_partition(self) -> tuple[int, ...]:
        return self._causal.chunk_partition

    @property
    def full_chunk_limit(self) -> int:
        return self._causal.full_chunk_limit

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond) -> torch.Tensor:
        self._check_input(x)
        return self._causal(x, t, r, cond)

    def bidirectional(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._causal.bidirectional(x, t, r, text)

    def cache(self):
        return self._causal.cache()


def networks(roles: Iterable[object]) -> list[nn.Module]:
    """The distinct networks behind a run's roles, each once: a LoRA view's shared base, a wrapper's
    ``transformer`` (every call of the wrapper, the causal KV-cache rollout's too, goes through its forward), else
    the module itself; a role that is a plain function (an exact teacher) has none."""
    found: dict[int, nn.Module] = {}
    for module in roles:
        if isinstance(module, RoleView):
            found.setdefault(id(module.shared.base), module.shared.base)
        elif isinstance(module, nn.Module):
            net = getattr(module, "transformer", module)
            found.setdefault(id(net), net)
    return list(found.values())
