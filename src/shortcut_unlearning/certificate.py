"""(eps, delta) calibration of the certified operators (Koloskova et al., ICML 2025).

METHOD.md sections 5.2-5.4.

Gradient clipping: noisy projected SGD for T = ceil(C0 / (gamma C1)) steps with a closed-form
sigma. Model clipping: an accountant that contracts delta at fixed eps, one noisy step at a
time, with the exact Gaussian-mechanism delta. A Certificate states what was guaranteed, for
which parameters, and under which assumptions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from scipy.stats import norm

ASSUMPTIONS = (
    "one lesion class per image (single-class)",
    "artefacts do not overlap the lesion (disjoint support; hair crossing a lesion violates it)",
    "the guarantee covers the scoped parameters only; frozen parameters are released as they are",
)


class CertificateError(ValueError):
    """An (eps, delta) request or constant outside what the calibration allows."""


def _check(epsilon: float, delta: float, **constants: float) -> None:
    if not 0 < delta < 1:
        raise CertificateError(f"delta must lie in (0, 1), got {delta}; 1e-5 is usual")
    if not epsilon > 0:
        raise CertificateError(f"epsilon must be positive, got {epsilon}; 1 is usual")
    for name, value in constants.items():
        if not value > 0:
            raise CertificateError(f"{name} must be positive, got {value}")


def gradient_clipping_sigma(
    epsilon: float,
    delta: float,
    c0: float,
    c1: float,
    gamma: float,
    lam: float = 0.0,
    steps: int | None = None,
) -> tuple[float, int]:
    """(sigma, T) for gradient clipping. With lam = 0, T = ceil(C0 / (gamma C1)):

        sigma^2 = 9 log(1/delta) (C0 + gamma C1 T)^2 / (eps^2 T)

    with lam > 0 (T defaults to the same count):

        sigma^2 = 72 gamma lam log(1/delta) (C0 (1 - gamma lam)^T + C1 / lam)^2 / eps^2

    Valid only for eps <= 3 log(1/delta).
    """
    _check(epsilon, delta, C0=c0, C1=c1, gamma=gamma)
    if lam < 0:
        raise CertificateError(f"lambda (weight decay) must be >= 0, got {lam}")
    if lam > 0 and gamma * lam >= 1:
        raise CertificateError(f"gamma * lambda must be below 1, got {gamma * lam}")
    limit = 3 * math.log(1 / delta)
    if epsilon > limit:
        raise CertificateError(
            f"the gradient-clipping calibration holds for eps <= 3 log(1/delta) = {limit:.3g}; "
            f"got eps = {epsilon}: ask for a smaller eps or a smaller delta"
        )
    t = steps if steps is not None else math.ceil(c0 / (gamma * c1) - 1e-12)
    if t < 1:
        raise CertificateError(f"the noisy phase needs at least one step, got {t}")
    log_term = math.log(1 / delta)
    if lam == 0:
        variance = 9 * log_term * (c0 + gamma * c1 * t) ** 2 / (epsilon**2 * t)
    else:
        variance = (
            72 * gamma * lam * log_term * (c0 * (1 - gamma * lam) ** t + c1 / lam) ** 2 / epsilon**2
        )
    return math.sqrt(variance), t


def gaussian_delta(epsilon: float, r: float) -> float:
    """theta_eps(r) = Q(eps/r - r/2) - e^eps Q(eps/r + r/2): the exact delta of a Gaussian
    mechanism with sensitivity-to-noise ratio r."""
    return float(norm.sf(epsilon / r - r / 2) - math.exp(epsilon) * norm.sf(epsilon / r + r / 2))


def model_clipping_deltas(
    epsilon: float, delta: float, c2: float, sigma: float, max_steps: int = 10_000
) -> list[float]:
    """delta_t after each noisy model-clipping step until delta_t <= delta (first entry: 1).

    delta_0 = 1, eps_t = log(1 + (e^eps - 1) / delta_t),
    delta_{t+1} = delta_t theta_{eps_t}(2 C2 / sigma).
    """
    _check(epsilon, delta, C2=c2, sigma=sigma)
    deltas, r = [1.0], 2 * c2 / sigma
    while deltas[-1] > delta:
        if len(deltas) > max_steps:
            raise CertificateError(
                f"delta does not reach {delta} within {max_steps} noisy steps with C2 = {c2} and "
                f"sigma = {sigma}; raise sigma or lower C2"
            )
        eps_t = math.log1p(math.expm1(epsilon) / deltas[-1])
        deltas.append(deltas[-1] * gaussian_delta(eps_t, r))
    return deltas


@dataclass(frozen=True)
class Certificate:
    """What a certified run guarantees, for which parameters, and at what cost in noise."""

    operator: str
    epsilon: float
    delta: float
    sigma: float
    noisy_steps: int
    gamma: float
    lam: float
    clipping: dict[str, float]
    achieved_delta: float
    scope: str
    scoped_parameters: int
    frozen: list[str]
    frozen_saw_coarse_labels: bool | None  # None: unknown (e.g. a checkpoint from elsewhere)
    noise_norm: float  # expected norm of one noise draw, sigma * sqrt(d)
    parameter_norm: float  # norm of the scoped parameters before unlearning
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)

    @property
    def noise_to_parameters(self) -> float:
        return self.noise_norm / self.parameter_norm if self.parameter_norm else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_to_parameters": self.noise_to_parameters}

    def summary(self) -> str:
        saw = {
            True: "saw the coarse labels: the guarantee does not cover them",
            False: "never saw the coarse labels",
            None: "provenance unknown",
        }
        return (
            f"({self.epsilon:g}, {self.delta:.1e})-certified by {self.operator} over the "
            f"{self.scope} scope ({self.scoped_parameters:,} parameters; frozen: "
            f"{', '.join(self.frozen) or 'none'}, {saw[self.frozen_saw_coarse_labels]}); "
            f"sigma {self.sigma:.3g} over {self.noisy_steps} noisy steps; noise norm "
            f"{self.noise_norm:.3g} against parameter norm {self.parameter_norm:.3g} "
            f"(x{self.noise_to_parameters:.2g})"
        )
