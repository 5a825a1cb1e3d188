"""The Python API: a trained run as a flow map you can call, sample at any N and judge.

    model = anystep.load("runs/shapes_stage1")        # a run folder, a checkpoint folder or shipped:<name>
    u = model(x_t, t, r, cond)                        # its average velocity over [r, t] (timesteps 0..1000)
    s = model.sample(steps=4, n=8, seed=0)            # its kind's own sampler -> Samples
    model.score(s)                                    # its world's exact judge (None: the world has none)
    s.save("samples.safetensors"); load_samples("samples.safetensors")

A :class:`Model` holds what :func:`anystep.build.load_model` returns (the network, its run's config and role)
and the run's world and judge. Sampling is the sweep's (:func:`anystep.evaluate.sweep.sample_batched`): a
student with its flow map and fused guidance (a causal student chunk by chunk), a teacher with the Euler sampler
and CFG, a consistency baseline by predicting x0 and re-noising. :class:`Samples` are the samples with the
noises, conditions and labels they were drawn for and the settings that drew them; :meth:`Samples.save` writes
them as one safetensors file whose metadata (strings) says what is inside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .build import build_world, load_model
from .causal import is_causal, sample_causal
from .config import RunConfig
from .errors import UsageError
from .evaluate.sweep import Sampler, sample_batched
from .flowmap import euler_step
from .worlds.base import EvalSet, Judge, World

FORMAT = "anystep.samples/1"   # the metadata 'format' of a samples file
SUFFIX = ".safetensors"


# ------------------------------------------------------------------------------------------------- samples
@dataclass
class Samples:
    """Samples ``x`` (B, F, C, H, W) on the CPU, drawn from ``noise`` for ``cond``; ``labels`` a readable label
    per sample (the prompt, the class); ``meta`` what the world's judge needs to score them (the clip specs or
    prompts, the class labels; None when they were drawn for a raw ``cond`` the judge cannot read); ``content``
    'videos' (pixels in [-1, 1]) or 'latents'; ``settings`` how they were drawn (spec, role, steps, seed,
    guidance, sampler, shift, world), as strings."""

    x: torch.Tensor
    noise: torch.Tensor
    cond: Any
    labels: list[str] | None
    meta: Any
    content: str
    settings: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def eval_set(self) -> EvalSet:
        """The noises and conditions as a judge reads them."""
        return EvalSet(self.noise, self.cond, self.meta)

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file: tensors ``samples``, ``noise``, ``cond`` (when a tensor) and ``meta``
        (when a tensor other than ``cond``), and as metadata (strings) the format, ``content``, ``layout``,
        ``range`` (videos), ``labels`` and ``prompts`` (JSON lists), ``meta`` ('cond' when the condition is the
        judge's meta) and every setting. Returns the path."""
        from safetensors.torch import save_file

        path = check_save_path(path)
        tensors = {"samples": self.x, "noise": self.noise}
        if torch.is_tensor(self.cond):
            tensors["cond"] = self.cond
        metadata = {"format": FORMAT, "content": self.content, "layout": "(B, F, C, H, W)", **self.settings}
        if self.meta is not None and self.meta is self.cond:
            metadata["meta"] = "cond"          # the condition is the judge's meta (class labels): stored once
        elif torch.is_tensor(self.meta):
            tensors["meta"] = self.meta
        if self.content == "videos":
            metadata["range"] = "[-1, 1]"
        if self.labels is not None:
            metadata["labels"] = json.dumps(self.labels)
        prompts = _prompts(self.meta)
        if prompts is not None:
            metadata["prompts"] = json.dumps(prompts)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        except OSError as err:
            raise UsageError(f"cannot write the samples to {path}: {err.strerror or err}") from err
        return path


def check_save_path(path: str | Path) -> Path:
    """``path`` if a samples file can be written there (its folder made): a UsageError naming the problem for
    another suffix than .safetensors, a folder, or a place that cannot be written."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise UsageError(f"samples are saved as safetensors: the file name must end in {SUFFIX}, got {str(path)!r}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name ending in {SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot make the folder for {path}: {err.strerror or err}") from err
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write {path}: permission denied")
    return path


def load_samples(path: str | Path) -> Samples:
    """A samples file written by :meth:`Samples.save` (or ``anystep sample --save``) back as :class:`Samples`
    (``meta``: the class labels, or the prompts, which the shapes judge reads as they are)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"samples file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise UsageError(f"{path} is not an anystep samples file (metadata format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 (safe_open is not a mapping)
    labels = json.loads(metadata["labels"]) if "labels" in metadata else None
    prompts = json.loads(metadata["prompts"]) if "prompts" in metadata else None
    settings = {k: v for k, v in metadata.items() if k not in ("format", "content", "layout", "range", "labels",
                                                               "prompts", "meta")}
    cond = tensors.get("cond")
    meta = cond if metadata.get("meta") == "cond" else tensors.get("meta", prompts)
    return Samples(tensors["samples"], tensors["noise"], cond, labels, meta, metadata["content"], settings)


def _prompts(meta: Any) -> list[str] | None:
    """The prompts of a judge's meta (clip specs or prompt strings), else None."""
    if isinstance(meta, (list, tuple)) and meta:
        if all(isinstance(m, str) for m in meta):
            return list(meta)
        if all(callable(getattr(m, "prompt", None)) for m in meta):
            return [m.prompt() for m in meta]
    return None


# ------------------------------------------------------------------------------------------------- a model
class Model:
    """A trained run's network (its product by default: the teacher of a teacher run, else the student), its
    run config and role, and its world and judge. Call it as a flow map, sample it at any N, score samples."""

    def __init__(self, network: Any, config: RunConfig, role: str, spec: str):
        self.network, self.config, self.role, self.spec = network, config, role, spec

    def __repr__(self) -> str:
        return (f"Model(spec={self.spec!r}, kind={self.config.kind!r}, role={self.role!r}, "
                f"world={self.config.world.name!r}, sampler={self.sampler!r}, causal={self.causal})")

    # -------------------------------------------------------------------------------------- what it is
    @property
    def causal(self) -> bool:
        """Whether it is a chunk-causal (FAR) student: sampled chunk by chunk with a KV cache."""
        return is_causal(self.network)

    @property
    def sampler(self) -> str:
        """How it samples: its run kind's sampler for the run's product ('flowmap', 'euler', 'consistency'),
        the Euler sampler for a run's other (velocity) roles."""
        return self.config.spec.sampler if self.role == self.config.spec.product else "euler"

    @property
    def guidance(self) -> float:
        """Its default CFG scale (``SweepConfig.guidance_for`` its role): a student's ``sweep.student_guidance``
        (1: its guidance is fused), else the run's ``sweep.teacher_guidance``."""
        return self.config.sweep.guidance_for(self.role)

    @cached_property
    def world(self) -> World:
        """The run's world (``world.*`` of its config)."""
        return build_world(self.config)

    @cached_property
    def judge(self) -> Judge | None:
        """The world's exact judge, or None (the wan world has none)."""
        return self.world.judge()

    @property
    def device(self) -> torch.device:
        params = self.network.parameters() if isinstance(self.network, torch.nn.Module) else iter(())
        return next(params, torch.empty(0, device="cpu")).device

    def to(self, device: str | torch.device) -> Model:
        """Move the network to ``device`` (sampling runs there; samples come back on the CPU)."""
        self.network.to(device)
        return self

    # -------------------------------------------------------------------------------------- the flow map
    def __call__(self, x_t: torch.Tensor, t: float | torch.Tensor, r: float | torch.Tensor, cond: Any) -> torch.Tensor:
        """The average velocity ``u(x_t, t, r, cond)`` over [r, t] (t >= r, timestep units 0..1000; numbers or
        (B,) tensors; at r = t the instantaneous velocity). ``x_t`` (B, F, C, H, W); ``cond`` batch-first (class
        labels, prompt embeddings; a causal student's teacher-forcing condition). Gradients flow: wrap in
        ``torch.no_grad()`` to judge."""
        return self.network(x_t, _times(t, x_t), _times(r, x_t), cond)

    def step(self, x_t: torch.Tensor, t: float | torch.Tensor, r: float | torch.Tensor, cond: Any) -> torch.Tensor:
        """One flow-map jump ``x_r = x_t - (t - r)/1000 * u(x_t, t, r, cond)``."""
        t, r = _times(t, x_t), _times(r, x_t)
        return euler_step(x_t, self.network(x_t, t, r, cond), t, r)

    # -------------------------------------------------------------------------------------- sampling
    def sample(self, steps: int = 4, n: int | None = None, seed: int = 0, *, prompts: Sequence[str] | None = None,
               noise: torch.Tensor | None = None, cond: Any = None, guidance: float | None = None,
               given_frames: int = 0) -> Samples:
        """``n`` samples (default 4) at ``steps`` steps, its kind's way. Noises and conditions are the world's
        evaluation set for ``seed`` (the sweep's), or the ``prompts`` (shapes world, cycled to ``n``), or
        ``noise`` (n, F, C, H, W) and ``cond`` given directly (the wan world needs both). ``guidance``: the CFG
        scale (default :attr:`guidance`). ``given_frames``: a causal shapes student continues the prompts' real
        clips from their first K frames (I2V / V2V). The same arguments give bit-identical samples."""
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        ev = self._eval_set(n, seed, prompts, noise, cond)
        w = self.guidance if guidance is None else guidance
        if given_frames:
            if w != 1.0:
                raise UsageError("a causal student continues given frames with its fused guidance (1)")
            x = self._continue(ev, steps, given_frames)
        else:
            try:
                s = Sampler(self.role, self.network, w, self.sampler)
            except ValueError as err:
                raise UsageError(str(err)) from err
            null = self.world.null_cond if w != 1.0 else None
            x = sample_batched(s, null, ev.noise, ev.cond, steps, self.config.sweep.shift, seed=seed,
                               device=self.device)
        settings = {"spec": self.spec, "kind": self.config.kind, "role": self.role, "world": self.config.world.name,
                    "sampler": "causal" if self.causal else self.sampler, "steps": str(steps), "seed": str(seed),
                    "guidance": repr(float(w)), "shift": repr(float(self.config.sweep.shift))}
        if given_frames:
            settings["given_frames"] = str(given_frames)
        labels = self.judge.labels(ev) if self.judge is not None and ev.meta is not None else None
        return Samples(x, ev.noise, ev.cond, labels, ev.meta, self.content, settings)

    @property
    def content(self) -> str:
        """What its samples are: 'videos' (pixels in [-1, 1]) or 'latents', as its world says."""
        return self.world.content

    def _eval_set(self, n: int | None, seed: int, prompts: Sequence[str] | None, noise: torch.Tensor | None,
                  cond: Any) -> EvalSet:
        """The noises, conditions and judge's meta to sample: the world's evaluation set for ``seed``, with the
        prompts' clips or the given noise and condition in its place (a given condition is the judge's meta
        where the world's own conditions are, as the gmm world's class labels; else the samples cannot be
        scored)."""
        given = [len(v) for v in (noise, cond) if v is not None]
        n = n if n is not None else (given[0] if given else 4)
        if n < 1 or any(g != n for g in given):
            raise UsageError(f"sample: n, noise and cond must agree on the number of samples (>= 1); got n = {n}, "
                             f"{given} rows given")
        if prompts and cond is not None:
            raise UsageError("sample: give prompts or cond, not both")
        if noise is not None and cond is not None:
            ev = EvalSet(noise, cond, cond if self._cond_is_meta else None)
        else:
            ev = self.world.eval_set(n, seed)
            if prompts:
                ev = self._prompted(ev, prompts, seed)
            if noise is not None:
                ev = EvalSet(noise, ev.cond, ev.meta)
            if cond is not None:
                ev = EvalSet(ev.noise, cond, cond if self._cond_is_meta else None)
        shape = tuple(self.world.shape)
        if tuple(ev.noise.shape[1:]) != shape:
            raise UsageError(f"noise must be (n, {', '.join(map(str, shape))}) in the {self.world.name!r} world, got "
                             f"{tuple(ev.noise.shape)}")
        return ev

    @cached_property
    def _cond_is_meta(self) -> bool:
        """Whether the world's evaluation sets use the condition itself as the judge's meta (class labels)."""
        try:
            ev = self.world.eval_set(1, 0)
        except UsageError:   # a world without evaluation sets (wan)
            return False
        return ev.meta is ev.cond

    def _prompted(self, ev: EvalSet, prompts: Sequence[str], seed: int) -> EvalSet:
        """``ev`` with the shapes world's clips of ``prompts`` (cycled to its size, random starts from ``seed``)."""
        if self.world.name != "shapes":
            raise UsageError("prompts are for the shapes world (the wan world takes cond= prompt embeddings)")
        n, g = ev.noise.shape[0], torch.Generator().manual_seed(seed)
        try:
            specs = [self.world.world.sample_specs(1, g, prompt=p)[0] for p in (list(prompts) * n)[:n]]
        except ValueError as err:
            raise UsageError(f"prompt: {err}") from err
        return EvalSet(ev.noise, self.world.embed(specs), specs)

    def _continue(self, ev: EvalSet, steps: int, given_frames: int) -> torch.Tensor:
        """A causal shapes student's continuation of ``ev``'s real clips from their first ``given_frames``."""
        if not self.causal or self.world.name != "shapes" or ev.meta is None:
            raise UsageError("given frames (I2V / V2V) are for causal students of the shapes world, with prompts "
                             "or the evaluation set (not a raw cond)")
        given = self.world.world.render(ev.meta)[:, :given_frames]   # the prompts' real first frames
        device = self.device
        x = sample_causal(self.network, ev.noise.to(device), ev.cond.to(device), steps,
                          shift=self.config.sweep.shift, given=given.to(device))
        return x.cpu()

    # -------------------------------------------------------------------------------------- judging
    def score(self, samples: Samples) -> dict[str, float]:
        """The world's exact metrics of ``samples`` (a UsageError when the world has no judge, or the samples
        were drawn for a raw condition it cannot read). The gmm endpoint error is against the exact ODE at the
        CFG scale the samples follow: the run's (a student's fused scale), or the one a teacher sampled with."""
        if self.judge is None:
            raise UsageError(f"the {self.world.name!r} world has no judge: score the samples with your own metric")
        if samples.meta is None:
            raise UsageError("these samples were drawn for a raw cond the judge cannot read: sample with prompts "
                             "or the evaluation set to score them")
        follows = self.config.spec.guidance(self.config) if self.role == "student" else \
            float(samples.settings.get("guidance", self.guidance))
        partition = tuple(self.network.chunk_partition) if self.causal else None
        return self.judge.score(samples.x, samples.eval_set, follows, partition)


def _times(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a float32 (B,) tensor on ``x``'s device (a number or a 0-d tensor is repeated)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def load(spec: str | Path, role: str | None = None, ema: bool = True) -> Model:
    """A trained run as a :class:`Model`: ``spec`` a run folder (its newest checkpoint), a checkpoint folder or
    ``shipped:<name>``; ``role`` the network to load (default: the run's product; 'teacher', 'critic');
    ``ema``: its EMA weights when saved. The network is in eval mode on the CPU (:meth:`Model.to` moves it)."""
    network, config, role = load_model(str(spec), role, ema)
    return Model(network, config, role, str(spec))
