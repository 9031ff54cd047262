"""What the two certified operators share: global projections, calibrated noise, two phases.

Both run plain SGD (no momentum, constant step gamma) on the minibatch-mean retain gradient for
a noisy phase, adding Gaussian noise to the scoped parameters after each step, then fine-tune
without noise on the retain set; fine-tuning is post-processing and keeps the certificate.

The release carries the scope's batch-norm statistics too, and the coarse model's were computed
while it learned the forget set. They are reset before the noisy phase and re-estimated on the
retain images from the noisy phase's last iterate, which is post-processing as well.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import certificate as cert
from ..certificate import Certificate, CertificateError
from ..model import SCOPE_MODULES, FrozenInputs, Model
from ..retain import FORGETS
from .base import Operator


def global_norm(tensors) -> torch.Tensor:
    """L2 norm of all tensors concatenated."""
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


@torch.no_grad()
def project_(tensors, radius: float) -> None:
    """Scale all tensors together so their concatenated L2 norm is at most `radius`."""
    tensors = list(tensors)
    scale = torch.clamp(radius / (global_norm(tensors) + 1e-12), max=1.0)
    for t in tensors:
        t.mul_(scale.to(t.dtype))


@torch.no_grad()
def add_noise_(tensors, sigma: float, rng: torch.Generator) -> None:
    for t in tensors:
        t.add_(torch.randn(t.shape, generator=rng, device=t.device, dtype=t.dtype) * sigma)


def scope_batch_norms(model: Model, scope: str | None = None) -> list[torch.nn.Module]:
    """The batch-norm layers of the scope that keep running statistics."""
    children = dict(model.net.named_children())
    return [
        m
        for name in SCOPE_MODULES[scope or model.config.scope]
        for m in children[name].modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def reset_batch_statistics(model: Model) -> None:
    for m in scope_batch_norms(model):
        m.reset_running_stats()


@torch.no_grad()
def estimate_batch_statistics(
    model: Model, inputs: FrozenInputs, rows: np.ndarray, batch_size: int
) -> None:
    """Reset the scope's batch-norm statistics and re-estimate them as the plain average over
    batches of `rows` (momentum None: every batch counts the same), with the current weights."""
    norms = scope_batch_norms(model)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    for start in range(0, len(rows) if norms else 0, batch_size):
        frozen = inputs[rows[start : start + batch_size]]
        model.net.eval()  # only the scope's batch norms learn statistics
        for m in norms:
            m.train()
        with model.autocast():
            model.scoped_forward(frozen)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.net.eval()


def scope_coverage(model: Model, scope: str) -> dict[str, str]:
    """How the release covers each tensor of the scope; raises if one is not covered."""
    blocks = SCOPE_MODULES[scope]
    statistics = {id(b) for m in scope_batch_norms(model, scope) for b in m.buffers()}
    coverage = {}
    for name, tensor in [*model.net.named_parameters(), *model.net.named_buffers()]:
        if name.split(".")[0] not in blocks:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            coverage[name] = cert.NOISED
        elif id(tensor) in statistics:
            coverage[name] = cert.REESTIMATED
        else:
            raise CertificateError(
                f"the {scope} scope carries buffer {name}, which the certified operators neither "
                "noise nor re-estimate; choose a scope without it"
            )
    return coverage


def collapse_warning(certificate: Certificate) -> str | None:
    """A warning when one step's noise draw outweighs the scope's parameters (METHOD 5.4)."""
    per_step, norm = certificate.noise_norm_per_step, certificate.parameter_norm
    if per_step <= norm:
        return None
    remedy = (
        "Use scope='head' (far fewer parameters) or a larger epsilon to shrink the noise."
        if certificate.scope != "head"
        else "Only a larger epsilon or delta shrinks the noise on the head."
    )
    return (
        f"{certificate.operator}: one step's noise has expected norm {per_step:.3g}, more than "
        f"the {certificate.scope} scope's parameter norm {norm:.3g} "
        f"(x{per_step / norm if norm else math.inf:.2g}; {certificate.noise_norm:.3g} over the "
        f"{certificate.noisy_steps} noisy steps); the noisy phase will erase what the scope "
        f"learned and only fine-tuning can bring it back. {remedy}"
    )


@dataclass
class CertifiedOperator(Operator):
    """An operator with an (eps, delta) certificate: a noisy phase, then noise-free fine-tuning."""

    epsilon: float = 1.0
    delta: float = 1e-5
    lam: float = 0.0  # weight decay inside the noisy phase
    # After the noise the scope is as good as re-initialised, so post-processing is training:
    # Adam at training's lr. Any post-processing keeps the certificate.
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    # The signal-to-noise ratio the certificate says how to keep (eps or sigma that gives it).
    target_snr: float = 1.0

    accountant = ""

    def noisy_steps(self) -> int:
        raise NotImplementedError

    @property
    def sigma(self) -> float:
        raise NotImplementedError

    def clipping(self) -> dict[str, float]:
        raise NotImplementedError

    def snr_bound(self) -> float:
        """Bound on the signal-to-noise ratio of any linear read-out of the released scope."""
        raise NotImplementedError

    def epsilon_for_snr(self, snr: float) -> float | None:
        """The eps whose noise keeps a read-out ratio of `snr`; None where eps does not set it."""
        raise NotImplementedError

    def sigma_for_snr(self, snr: float) -> float:
        """The per-step sigma that keeps a read-out ratio of `snr`."""
        raise NotImplementedError

    def achieved_delta(self) -> float:
        return self.delta

    def __post_init__(self):
        super().__post_init__()
        if not self.target_snr > 0:
            raise ValueError(f"target_snr must be positive, got {self.target_snr}")
        self.steps = self.noisy_steps() + self.finetune_steps

    def phase(self, step: int) -> str:
        return "noisy" if step <= self.noisy_steps() else "fine-tune"

    def optimiser(self, model: Model, phase: str) -> torch.optim.Optimizer:
        if phase == "noisy":  # the calibration assumes plain SGD with a constant step
            return torch.optim.SGD(model.scoped_parameters(), lr=self.lr, momentum=0.0)
        return torch.optim.Adam(model.scoped_parameters(), lr=self.finetune_lr)

    def loss(self, retain_ce, forget_ce):
        # The certified updates use the retain gradient only; the forget CE is reported.
        forget = forget_ce.mean().detach() if forget_ce.numel() else retain_ce.detach() * 0
        return {"total": retain_ce, "retain": retain_ce.detach(), "forget": forget}

    def prepare(self, model: Model) -> None:
        warning = collapse_warning(self.certificate(model))
        if warning:
            warnings.warn(warning, stacklevel=2)
        reset_batch_statistics(model)  # the coarse model's statistics never reach the release

    def batch_statistics_in(self, phase: str) -> bool:
        # Normalising with the reset statistics (mean 0, variance 1) let the noised decoder's
        # activations grow to 1e14 (default decoder, 128 px); batch statistics keep them in
        # range. Whatever the running averages pick up is reset at the phase's end.
        return phase == "noisy" or self.batch_statistics

    def phase_end(self, model: Model, phase: str, inputs, retain_rows) -> None:
        if phase == "noisy":
            estimate_batch_statistics(model, inputs, retain_rows, self.batch_size)

    def certificate(self, model: Model) -> Certificate:
        """The certificate this operator gives, starting from `model`."""
        scope = self.scope or model.config.scope
        children = dict(model.net.named_children())
        params = [p for n in SCOPE_MODULES[scope] for p in children[n].parameters()]
        d, t = sum(p.numel() for p in params), self.noisy_steps()
        frozen = [n for n in children if n not in SCOPE_MODULES[scope]]
        # Frozen blocks saw the coarse labels if the training run updated them.
        trained_scope = model.config.provenance.get("scope")
        saw = (
            None if trained_scope is None else bool(set(SCOPE_MODULES[trained_scope]) & set(frozen))
        )
        return Certificate(
            operator=self.name,
            epsilon=self.epsilon,
            delta=self.delta,
            sigma=self.sigma,
            noisy_steps=t,
            gamma=self.lr,
            lam=self.lam,
            clipping=self.clipping(),
            achieved_delta=self.achieved_delta(),
            accountant=self.accountant,
            scope=scope,
            scoped_parameters=d,
            coverage=scope_coverage(model, scope),
            forgets=FORGETS[self.retain_images],
            frozen=frozen,
            frozen_saw_coarse_labels=saw,
            noise_norm=self.sigma * math.sqrt(d * t),
            noise_norm_per_step=self.sigma * math.sqrt(d),
            parameter_norm=float(global_norm(params)),
            snr_bound=self.snr_bound(),
            target_snr=self.target_snr,
            epsilon_for_target_snr=self.epsilon_for_snr(self.target_snr),
            sigma_for_target_snr=self.sigma_for_snr(self.target_snr),
        )


@dataclass
class GradientClipping(CertifiedOperator):
    """x_0 = Pi_C0(x), then x <- x - gamma (Pi_C1(g) + lam x) + N(0, sigma^2) for T steps."""

    # The paper's published setting (T = ceil(C0 / (gamma C1)) = 10 at (1, 1e-5)).
    # No setting keeps the noise below our scopes' parameter norms (see BENCHMARKS.md), so the
    # short noisy phase is the cheapest; fine-tuning then rebuilds the scope.
    c0: float = 0.1  # radius the starting model is projected into
    c1: float = 10.0  # gradient clipping radius
    lr: float = 1e-3  # gamma

    name = "gradient-clipping"
    accountant = "Renyi divergence by amplification by iteration, minimised over orders"

    def _calibration(self) -> tuple[float, int]:
        return cert.gradient_clipping_sigma(
            self.epsilon, self.delta, self.c0, self.c1, self.lr, self.lam
        )

    def noisy_steps(self) -> int:
        return self._calibration()[1]

    @property
    def sigma(self) -> float:
        return self._calibration()[0]

    def clipping(self) -> dict[str, float]:
        return {"C0": self.c0, "C1": self.c1}

    def _constants(self) -> tuple[float, float, float, float, int]:
        return self.c0, self.c1, self.lr, self.lam, self.noisy_steps()

    def snr_bound(self) -> float:
        return cert.gradient_clipping_snr(self.sigma, *self._constants())

    def epsilon_for_snr(self, snr: float) -> float:
        return cert.gradient_clipping_epsilon_for_snr(snr, self.delta)

    def sigma_for_snr(self, snr: float) -> float:
        # The read-out ratio is inversely proportional to sigma.
        return cert.gradient_clipping_snr(1.0, *self._constants()) / snr

    def prepare(self, model: Model) -> None:
        super().prepare(model)
        project_(model.scoped_parameters(), self.c0)

    def on_gradients(self, model: Model, step: int) -> None:
        if self.phase(step) != "noisy":
            return
        params = model.scoped_parameters()
        project_([p.grad for p in params], self.c1)
        if self.lam:
            for p in params:
                p.grad.add_(p.detach(), alpha=self.lam)

    def after_step(self, model: Model, step: int, rng: torch.Generator) -> None:
        if self.phase(step) == "noisy":
            add_noise_(model.scoped_parameters(), self.sigma, rng)


@dataclass
class ModelClipping(CertifiedOperator):
    """x <- Pi_C2(x - gamma (g + lam x)) + N(0, sigma^2) until the accountant's delta <= delta."""

    # The paper's example: C2 = 0.5, sigma = 0.5 reach delta 1e-5 at eps 1 in 6 noisy steps.
    c2: float = 0.5  # model clipping radius
    noise: float = 0.5  # sigma: chosen here, the accountant sets the number of noisy steps
    lr: float = 1e-2

    name = "model-clipping"
    accountant = "delta contracted per step with the exact Gaussian-mechanism delta, eps fixed"

    def deltas(self) -> tuple[float, ...]:
        return cert.model_clipping_deltas(self.epsilon, self.delta, self.c2, self.noise)

    def noisy_steps(self) -> int:
        return len(self.deltas()) - 1

    @property
    def sigma(self) -> float:
        return self.noise

    def clipping(self) -> dict[str, float]:
        return {"C2": self.c2}

    def achieved_delta(self) -> float:
        return self.deltas()[-1]

    def snr_bound(self) -> float:
        return cert.model_clipping_snr(self.c2, self.noise)

    def epsilon_for_snr(self, snr: float) -> None:
        return None  # eps sets the number of noisy steps, not the ratio

    def sigma_for_snr(self, snr: float) -> float:
        return self.c2 / snr

    def on_gradients(self, model: Model, step: int) -> None:
        if self.phase(step) == "noisy" and self.lam:
            for p in model.scoped_parameters():
                p.grad.add_(p.detach(), alpha=self.lam)

    def after_step(self, model: Model, step: int, rng: torch.Generator) -> None:
        if self.phase(step) == "noisy":
            project_(model.scoped_parameters(), self.c2)
            add_noise_(model.scoped_parameters(), self.sigma, rng)
