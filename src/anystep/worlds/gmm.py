"""Class-conditional isotropic Gaussian-mixture world with an exact (analytic) teacher.

Conventions (rectified flow, "timestep units" t in [0, 1000]):

    s = t / 1000,   a = 1 - s,   x_t = a x0 + s eps,   eps ~ N(0, I),   v = eps - x0.

The ODE runs from t = 1000 (noise) to t = 0 (data) with ``dx/dt = v(x, t) / 1000``.

Data: class k in [0, K) has M isotropic modes ``x0 | (k, m) ~ N(mu_km, sigma^2 I)`` with
within-class weights ``w_km``; the class prior is uniform. Label ``K`` is the NULL label: the
unconditional mixture of all K*M modes with weights ``w_km / K``.

Exact velocity. For one component j = (k, m) with mean mu and std sigma:

    x_t | j ~ N(a mu, V I),               V = a^2 sigma^2 + s^2
    E[x0  | x_t, j] = mu + (a sigma^2 / V) (x_t - a mu)
    E[eps | x_t, j] = (s / V) (x_t - a mu)
    v_j(x_t) = E[eps - x0 | x_t, j] = c (x_t - a mu) - mu,     c = (s - a sigma^2) / V

The posterior over components is ``post_j ∝ pi_j N(x_t; a mu_j, V I)`` (computed with a
log-sum-exp / softmax, so it is finite at t = 0 and t = 1000), and

    v(x_t) = sum_j post_j v_j(x_t) = c x_t - (c a + 1) sum_j post_j mu_j.

Checks: at t = 1000 (a = 0, V = 1) ``v = x - E[x0]``; at t = 0 (s = 0) ``v = -x``.

All math is float64. Velocities / flow maps are returned in the dtype of the input ``x``
(pass float32 when the result feeds a network); metrics return Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GMMConfig", "GMMWorld", "chi2_quantile", "frechet_distance_moments", "sqrtm_psd"]

T_MAX = 1000.0


@dataclass
class GMMConfig:
    """Configuration of :class:`GMMWorld`.

    Mode means are drawn once from a seeded ``N(0, mean_scale^2 I)`` and redrawn (rejection)
    until every pair of the K*M means is farther apart than ``min_separation * mode_std``.
    """

    num_classes: int = 4
    modes_per_class: int = 2
    shape: tuple[int, int, int, int] = (2, 1, 2, 2)
    mode_std: float = 0.15
    mean_scale: float = 1.0
    seed: int = 0
    min_separation: float = 6.0  # in units of mode_std
    max_tries: int = 10_000


# ----------------------------------------------------------------------------------------------
# small exact-math helpers
# ----------------------------------------------------------------------------------------------


def sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix: ``Q diag(sqrt(max(lam, 0))) Q^T`` (eigh)."""
    a = 0.5 * (a + a.transpose(-1, -2))
    lam, q = torch.linalg.eigh(a)
    return (q * lam.clamp_min(0.0).sqrt().unsqueeze(-2)) @ q.transpose(-1, -2)


def frechet_distance_moments(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
    """``FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S2^{1/2} S1 S2^{1/2})^{1/2})`` in float64."""
    mu1, s1, mu2, s2 = (z.double() for z in (mu1, s1, mu2, s2))
    r2 = sqrtm_psd(s2)
    inner = r2 @ s1 @ r2
    inner = 0.5 * (inner + inner.T)
    tr_sqrt = torch.linalg.eigvalsh(inner).clamp_min(0.0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_sqrt
    return float(fd.clamp_min(0.0))


def chi2_quantile(p: float, dof: int, iters: int = 200) -> float:
    """Quantile of the chi-squared distribution: solve ``P(dof/2, q/2) = p`` by bisection.

    ``P`` is the regularised lower incomplete gamma function (``torch.special.gammainc``),
    which is the chi2 CDF: ``F(q; dof) = P(dof/2, q/2)``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"chi2_quantile: p must be in (0, 1), got {p}")
    if dof < 1:
        raise ValueError(f"chi2_quantile: dof must be >= 1, got {dof}")
    k = torch.tensor(0.5 * dof, dtype=torch.float64)

    def cdf(q: float) -> float:
        return float(torch.special.gammainc(k, torch.tensor(0.5 * q, dtype=torch.float64)))

    lo, hi = 0.0, float(dof) + 10.0
    while cdf(hi) < p:
        hi *= 2.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _softmax_no_subnormals(logits: Tensor) -> Tensor:
    """Softmax over the last dim (log-sum-exp stable) that sets weights below ``e^-700`` to 0.

    Equal to ``torch.softmax`` up to ~1e-304 relative, but never produces subnormal floats,
    which are orders of magnitude slower on CPUs. ``-inf`` logits give exactly 0.
    """
    z = logits - logits.amax(dim=-1, keepdim=True)
    keep = z > _LOG_TINY
    e = torch.where(keep, torch.exp(z.clamp_min(_LOG_TINY)), torch.zeros_like(z))
    return e / e.sum(dim=-1, keepdim=True)


_LOG_TINY = -700.0


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------


class GMMWorld:
    """Class-conditional isotropic GMM with exact velocity, flow map and exact metrics."""

    def __init__(self, cfg: GMMConfig | None = None):
        cfg = GMMConfig() if cfg is None else cfg
        if len(cfg.shape) != 4 or any(int(n) < 1 for n in cfg.shape):
            raise ValueError(f"GMMConfig.shape must be 4 positive ints (F, C, H, W), got {cfg.shape}")
        if cfg.num_classes < 1 or cfg.modes_per_class < 1:
            raise ValueError("GMMConfig.num_classes and modes_per_class must be >= 1")
        if not cfg.mode_std > 0 or not cfg.mean_scale > 0:
            raise ValueError("GMMConfig.mode_std and mean_scale must be > 0")
        self.cfg = cfg
        self._shape = tuple(int(n) for n in cfg.shape)
        self._dim = math.prod(self._shape)
        k, m = cfg.num_classes, cfg.modes_per_class
        self.means = self._draw_means()  # (K, M, D) float64
        w = torch.arange(1, m + 1, dtype=torch.float64)
        self.weights = (w / w.sum()).expand(k, m).clone()  # (K, M), within class ∝ 1..M
        self.mode_std = float(cfg.mode_std)
        # log prior over the K*M components for each label row; row K is the null label.
        logw = torch.full((k + 1, k * m), -math.inf, dtype=torch.float64)
        for c in range(k):
            logw[c, c * m : (c + 1) * m] = self.weights[c].log()
        logw[k] = (self.weights.reshape(-1) / k).log()
        self._log_prior = logw
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # -- construction -------------------------------------------------------------------------
    def _draw_means(self) -> Tensor:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed)
        n = cfg.num_classes * cfg.modes_per_class
        min_d = cfg.min_separation * cfg.mode_std
        for _ in range(cfg.max_tries):
            mu = cfg.mean_scale * torch.randn(n, self._dim, generator=g, dtype=torch.float64)
            d = torch.cdist(mu, mu).masked_fill(torch.eye(n, dtype=torch.bool), math.inf)
            if n == 1 or float(d.min()) > min_d:
                return mu.reshape(cfg.num_classes, cfg.modes_per_class, self._dim)
        raise ValueError(
            f"could not draw {n} mode means in {self._dim} dims with pairwise distance > {min_d:.3g} "
            f"after {cfg.max_tries} tries; increase mean_scale or lower min_separation/mode_std"
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def modes_per_class(self) -> int:
        return self.cfg.modes_per_class

    @property
    def null_label(self) -> int:
        return self.cfg.num_classes

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(flat means (K*M, D), log prior (K+1, K*M)) on ``device``, float64, cached."""
        if device not in self._cache:
            self._cache[device] = (
                self.means.reshape(-1, self._dim).to(device),
                self._log_prior.to(device),
            )
        return self._cache[device]

    # -- validation ---------------------------------------------------------------------------
    def _check_x(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != self._shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, self._shape))}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
        return x

    def _check_labels(self, labels: Tensor, batch: int | None, allow_null: bool) -> Tensor:
        if not isinstance(labels, Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D long tensor (B,), got {getattr(labels, 'shape', labels)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"labels has batch size {labels.shape[0]} but x has batch size {batch}")
        hi = self.null_label if allow_null else self.num_classes - 1
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > hi):
            what = "[0, num_classes] (num_classes = null label)" if allow_null else "[0, num_classes)"
            raise ValueError(
                f"label out of range: labels must lie in {what} = [0, {hi}], "
                f"got min {int(labels.min())}, max {int(labels.max())}"
            )
        return labels.long()

    def _check_time(self, t, batch: int, device: torch.device, name: str = "t") -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        if not torch.isfinite(t).all() or float(t.min()) < 0.0 or float(t.max()) > T_MAX:
            raise ValueError(f"{name} must lie in [0, {T_MAX:g}] (timestep units)")
        return t

    # -- sampling -----------------------------------------------------------------------------
    def sample_labels(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """``n`` labels uniform over the K real classes (never the null label), long (n,)."""
        dev = generator.device if generator is not None else device
        return torch.randint(0, self.num_classes, (n,), generator=generator, device=dev)

    def sample_data(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Data ``x0 = mu_{k,m} + sigma z`` with ``m ~ Categorical(w_k)``; float32 (B, F, C, H, W)."""
        labels = self._check_labels(labels, None, allow_null=False)
        dev = generator.device if generator is not None else labels.device
        lab = labels.to(dev)
        w = self.weights.to(dev)[lab]
        if lab.numel() == 0:
            return torch.empty(0, *self._shape, dtype=torch.float32, device=dev)
        m = torch.multinomial(w, 1, generator=generator).squeeze(1)
        mu = self.means.to(dev)[lab, m]
        z = torch.randn(mu.shape, generator=generator, dtype=torch.float64, device=dev)
        return (mu + self.mode_std * z).float().reshape(-1, *self._shape)

    # -- exact velocity -------------------------------------------------------------------------
    def posterior(self, x: Tensor, t, labels: Tensor) -> Tensor:
        """Posterior over the K*M components, (B, K*M) float64.

        ``log post_j = log pi_j(label) - |x_t - a mu_j|^2 / (2V) + const``  (softmax over j).
        """
        x = self._check_x(x)
        labels = self._check_labels(labels, x.shape[0], allow_null=True).to(x.device)
        t = self._check_time(t, x.shape[0], x.device)
        return self._posterior(x.double().reshape(x.shape[0], -1), t / T_MAX, labels)

    def _posterior(self, xf: Tensor, s: Tensor, labels: Tensor) -> Tensor:
        mu, log_prior = self._on(xf.device)
        a = (1.0 - s)[:, None]
        var = a**2 * self.mode_std**2 + s[:, None] ** 2  # (B, 1)
        d2 = (xf[:, None, :] - a[:, :, None] * mu[None]).pow(2).sum(-1)  # (B, K*M)
        return _softmax_no_subnormals(log_prior[labels] - 0.5 * d2 / var)

    def _velocity_flat(self, xf: Tensor, s: Tensor, labels: Tensor) -> Tensor:
        """``v = c x - (c a + 1) sum_j post_j mu_j``, ``c = (s - a sigma^2) / V``; float64 (B, D)."""
        mu, _ = self._on(xf.device)
        a = (1.0 - s)[:, None]
        var = a**2 * self.mode_std**2 + s[:, None] ** 2
        c = (s[:, None] - a * self.mode_std**2) / var
        mean_mu = self._posterior(xf, s, labels) @ mu
        return c * xf - (c * a + 1.0) * mean_mu

    def _cfg_velocity_flat(self, xf: Tensor, s: Tensor, labels: Tensor, guidance: float) -> Tensor:
        v_c = self._velocity_flat(xf, s, labels)
        if guidance == 1.0:
            return v_c
        v_u = self._velocity_flat(xf, s, torch.full_like(labels, self.null_label))
        return v_u + guidance * (v_c - v_u)

    def velocity(self, x: Tensor, t, labels: Tensor) -> Tensor:
        """Exact ``E[eps - x0 | x_t]`` for label ``< K`` (class) or ``== K`` (unconditional)."""
        return self.cfg_velocity(x, t, labels, 1.0)

    def cfg_velocity(self, x: Tensor, t, labels: Tensor, guidance: float) -> Tensor:
        """Classifier-free guided velocity ``v_u + w (v_c - v_u)``; ``w = 1`` gives ``v_c``."""
        x = self._check_x(x)
        labels = self._check_labels(labels, x.shape[0], allow_null=True).to(x.device)
        t = self._check_time(t, x.shape[0], x.device)
        v = self._cfg_velocity_flat(x.double().reshape(x.shape[0], -1), t / T_MAX, labels, float(guidance))
        return v.reshape(x.shape).to(x.dtype)

    # -- exact flow map -------------------------------------------------------------------------
    def flow_map(self, x: Tensor, t, r, labels: Tensor, guidance: float = 1.0, steps: int = 200) -> Tensor:
        """``Phi(x_t, t, r)``: solution at time r of ``dx/dtau = v_cfg(x, tau) / 1000`` from x at t.

        Classical RK4 in float64 with ``steps`` equal steps over [r, t] (per sample, so t and r
        may differ across the batch; t == r gives exactly x). Requires ``t >= r``.
        """
        x = self._check_x(x)
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        b = x.shape[0]
        labels = self._check_labels(labels, b, allow_null=True).to(x.device)
        t = self._check_time(t, b, x.device, "t")
        r = self._check_time(r, b, x.device, "r")
        if bool((r > t).any()):
            raise ValueError("flow_map needs r <= t (the ODE runs from noise t=1000 towards data t=0); got r > t")
        g = float(guidance)
        y = x.double().reshape(b, -1)
        h = ((r - t) / int(steps))[:, None]  # (B, 1), <= 0, timestep units

        def f(yy: Tensor, tau: Tensor) -> Tensor:
            return self._cfg_velocity_flat(yy, tau / T_MAX, labels, g) / T_MAX

        for i in range(int(steps)):
            tau = t + i * h[:, 0]
            k1 = f(y, tau)
            k2 = f(y + 0.5 * h * k1, tau + 0.5 * h[:, 0])
            k3 = f(y + 0.5 * h * k2, tau + 0.5 * h[:, 0])
            k4 = f(y + h * k3, tau + h[:, 0])
            y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return y.reshape(x.shape).to(x.dtype)

    def average_velocity(
        self, x: Tensor, t, r, labels: Tensor, guidance: float = 1.0, steps: int = 200
    ) -> Tensor:
        """``u(x_t, t, r) = (x_t - Phi(x_t, t, r)) / ((t - r) / 1000)``; equals ``v_cfg`` where t == r."""
        x = self._check_x(x)
        b = x.shape[0]
        tt = self._check_time(t, b, x.device, "t")
        rr = self._check_time(r, b, x.device, "r")
        x_r = self.flow_map(x.double(), tt, rr, labels, guidance, steps)
        dt = ((tt - rr) / T_MAX).reshape(b, 1, 1, 1, 1)
        u = (x.double() - x_r) / torch.where(dt > 0, dt, torch.ones_like(dt))
        v = self.cfg_velocity(x.double(), tt, labels, guidance)
        return torch.where(dt > 0, u, v).to(x.dtype)

    def sample_ode(self, noise: Tensor, labels: Tensor, guidance: float = 1.0, steps: int = 200) -> Tensor:
        """Exact ODE samples: ``Phi(noise, 1000, 0)``."""
        return self.flow_map(noise, T_MAX, 0.0, labels, guidance, steps)

    # -- exact moments & metrics ------------------------------------------------------------------
    def exact_moments(self, label: int) -> tuple[Tensor, Tensor]:
        """Mean (D,) and covariance (D, D) of the data distribution of ``label`` (K = unconditional).

        ``mean = sum_m w_m mu_m``;  ``cov = sigma^2 I + sum_m w_m mu_m mu_m^T - mean mean^T``.
        """
        label = int(label)
        if not 0 <= label <= self.num_classes:
            raise ValueError(f"label out of range: expected [0, {self.num_classes}], got {label}")
        if label == self.null_label:
            w = self.weights.reshape(-1) / self.num_classes
            mu = self.means.reshape(-1, self._dim)
        else:
            w, mu = self.weights[label], self.means[label]
        mean = w @ mu
        cov = self.mode_std**2 * torch.eye(self._dim, dtype=torch.float64)
        cov = cov + (mu.T * w) @ mu - torch.outer(mean, mean)
        return mean, cov

    def _flat_samples(self, samples: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        samples = self._check_x(samples, "samples")
        labels = self._check_labels(labels, samples.shape[0], allow_null=False)
        if samples.shape[0] == 0:
            raise ValueError("samples is empty")
        return samples.detach().double().cpu().reshape(samples.shape[0], -1), labels.cpu()

    def frechet_distance(self, samples: Tensor, labels: Tensor) -> float:
        """Mean over present classes of FD(empirical moments of the class's samples, exact moments).

        Empirical covariance uses the ``n - 1`` divisor (``n = 1`` gives a zero covariance).
        """
        xf, labels = self._flat_samples(samples, labels)
        fds = []
        for k in labels.unique().tolist():
            xk = xf[labels == k]
            mu_e = xk.mean(0)
            dev = xk - mu_e
            cov_e = dev.T @ dev / max(xk.shape[0] - 1, 1)
            mu_x, cov_x = self.exact_moments(k)
            fds.append(frechet_distance_moments(mu_e, cov_e, mu_x, cov_x))
        return float(sum(fds) / len(fds))

    def _nearest_mode(self, xf: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Index (B,) and distance (B,) of the nearest mode of each sample's own class."""
        mu = self.means[labels]  # (B, M, D)
        d = (xf[:, None, :] - mu).pow(2).sum(-1).sqrt()
        dist, idx = d.min(dim=1)
        return idx, dist

    def mode_kl(self, samples: Tensor, labels: Tensor, smoothing: float = 1e-3) -> float:
        """Mean over present classes of ``KL(w_k || q_k)``, ``q = (freq + eps) / (1 + M eps)``.

        ``freq_m`` = fraction of the class's samples whose nearest own-class mode is m.
        """
        xf, labels = self._flat_samples(samples, labels)
        idx, _ = self._nearest_mode(xf, labels)
        m = self.modes_per_class
        kls = []
        for k in labels.unique().tolist():
            freq = torch.bincount(idx[labels == k], minlength=m).double()
            q = (freq / freq.sum() + smoothing) / (1.0 + m * smoothing)
            p = self.weights[k]
            kls.append(float((p * (p / q).log()).sum()))
        return float(sum(kls) / len(kls))

    def precision_radius(self, p: float = 0.99) -> float:
        """``sqrt(chi2.ppf(p, D)) * sigma``: the radius holding mass p of one mode."""
        return math.sqrt(chi2_quantile(p, self._dim)) * self.mode_std

    def precision(self, samples: Tensor, labels: Tensor, p: float = 0.99) -> float:
        """Fraction of samples within ``precision_radius(p)`` of their nearest own-class mode."""
        xf, labels = self._flat_samples(samples, labels)
        _, dist = self._nearest_mode(xf, labels)
        return float((dist <= self.precision_radius(p)).double().mean())

    def endpoint_error(
        self, samples: Tensor, noise: Tensor, labels: Tensor, guidance: float = 1.0, steps: int = 200
    ) -> float:
        """Per-element RMS of ``samples - Phi(noise, 1000, 0)`` (exact ODE, same guidance)."""
        samples = self._check_x(samples, "samples")
        noise = self._check_x(noise, "noise")
        if noise.shape != samples.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != samples shape {tuple(samples.shape)}")
        ref = self.sample_ode(noise.detach().double(), labels, guidance, steps)
        diff = samples.detach().double().to(ref.device) - ref
        return float(diff.pow(2).mean().sqrt())

    def evaluate(
        self, samples: Tensor, labels: Tensor, noise: Tensor | None = None, guidance: float = 1.0
    ) -> dict[str, float]:
        """``{"fd", "mode_kl", "precision"}`` plus ``"endpoint_error"`` when ``noise`` is given."""
        out = {
            "fd": self.frechet_distance(samples, labels),
            "mode_kl": self.mode_kl(samples, labels),
            "precision": self.precision(samples, labels),
        }
        if noise is not None:
            out["endpoint_error"] = self.endpoint_error(samples, noise, labels, guidance)
        return out


# ----------------------------------------------------------------------------------------------
# the world as a data source, and its judge
# ----------------------------------------------------------------------------------------------


class GMMData:
    """The exact world as a :class:`~anystep.worlds.base.World`: class labels (long (B,)) as the condition,
    the label ``num_classes`` as the null one, the analytic velocity as the exact teacher."""

    name, network = "gmm", "mlp"
    content = "latents"   # samples are points of the mixture's space

    def __init__(self, gmm: GMMConfig | None = None):
        self.world = GMMWorld(gmm)
        self.null_cond = torch.tensor([self.world.null_label], device="cpu")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.world.shape

    def network_inputs(self) -> dict:
        return {"shape": self.world.shape, "num_classes": self.world.num_classes}

    def batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """``rows`` of a batch of ``n`` samples and their labels (all are drawn)."""
        labels = self.world.sample_labels(n, generator)
        return self.world.sample_data(labels, generator)[rows], labels[rows]

    def conditions(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> Tensor:
        """A batch's labels. The data's own draws are made too (and dropped): the generator's stream is the
        same whether a step needs the data or only its conditions."""
        return self.batch(n, generator, rows)[1]

    def eval_set(self, n: int, seed: int):
        from .base import EvalSet

        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n, device="cpu") % self.world.num_classes
        noise = torch.randn((n, *self.shape), generator=g, device="cpu")
        return EvalSet(noise, labels, labels)

    def exact_teacher(self):
        """The analytic velocity (float64 inside), a flow-map model that ignores r."""
        world = self.world

        def u(x, t, r, labels):
            return world.velocity(x.double(), t.double(), labels).to(x.dtype)
        return u

    def judge(self) -> GMMJudge:
        return GMMJudge(self.world)


class GMMJudge:
    """The exact metrics of :class:`GMMWorld` (Frechet distance to the exact class moments, mode KL, precision)
    and the endpoint error against the exact guided ODE from the same noise, solved once per evaluation set and
    guidance (every sampler and N of a sweep shares it)."""

    primary_metric, higher_is_better, picture, picture_samples = "fd", False, "scatter", 1000

    def __init__(self, world: GMMWorld):
        self.world = world
        self._reference: dict[tuple[int, float], Tensor] = {}

    def score(self, samples: Tensor, ev, guidance: float = 1.0, chunk_partition=None) -> dict[str, float]:
        out = self.world.evaluate(samples, ev.meta)
        key = (id(ev), guidance)
        if key not in self._reference:
            self._reference = {key: self.world.sample_ode(ev.noise.double(), ev.meta, guidance)}
        diff = samples.detach().double().cpu() - self._reference[key]
        out["endpoint_error"] = float(diff.pow(2).mean().sqrt())
        return out

    def labels(self, ev) -> list[str]:
        return [f"class {int(k)}" for k in ev.meta]

    def marks(self) -> Tensor:
        """The mode means, (K*M, D)."""
        return self.world.means.reshape(-1, self.world.dim)
