"""(eps, delta) calibration of the certified operators (Koloskova et al., ICML 2025).

docs/method.md, "Gradient clipping (certified)" to "Model collapse".

Gradient clipping: noisy projected SGD for T = ceil(C0 / (gamma C1)) steps, with sigma found
numerically from a Renyi accountant (privacy amplification by iteration), converted to
(eps, delta) and minimised over Renyi orders. Model clipping: an accountant that contracts
delta at fixed eps, one noisy step at a time, with the exact Gaussian-mechanism delta. Both
also bound the signal-to-noise ratio of any linear read-out of the released scope, which says
before a run how much of the scope survives the noisy phase. A Certificate states what was
guaranteed, for which tensors, and under which assumptions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm

ASSUMPTIONS = (
    "one lesion class per image (single-class)",
    "artefacts do not overlap the lesion (disjoint support; hair crossing a lesion violates it)",
    "the guarantee covers the scope's tensors only; frozen blocks are released as they are, and "
    "if they saw the coarse labels the scope's guarantee is void too (its updates run on their "
    "features)",
    "the retain loss trains on the corrected labels: the refined images' forget pixels count "
    "in it as background, so the guarantee is relative to a model trained on the corrected "
    "labels (the retrain baseline), not on the other pixels alone",
    "the noise is secret (see noise_source): whoever knows the key of its generator can "
    "regenerate and subtract it; the generator (numpy's Philox) is not a cryptographic one",
    "it covers the released weights, not the run's curves: the retain losses and probes taken "
    "during the noisy phase read intermediate iterates, which still depend on the forget set "
    "(the forget loss is not logged in certified runs)",
    "the run stops with an error when a loss is not finite, which reads the noisy phase's "
    "intermediate iterates: at most one bit about the forget set, released by stopping",
    "the collapse gate releases the unlearned model unless its probe Dice falls below an "
    "absolute floor, which does not read the start model; when the gate keeps the start model "
    "(trained with the forget set) nothing certified is released and no certificate is issued",
    "one run is accounted: choosing among certified re-runs after seeing measures taken at the "
    "forget positions (S_global, band reliance on the erased pixels, as the plugin shows them) "
    "is not",
)


class CertificateError(ValueError):
    """An (eps, delta) request or constant outside what the calibration allows."""


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise CertificateError(f"delta must lie in (0, 1), got {delta}; 1e-5 is usual")


# The eps a request may ask for. Below 1e-6 sigma exceeds a million times the clipping radii
# (the scope is noise whatever the eps); above 1000 the likelihood ratio e^eps exceeds 1e434
# and guarantees nothing. Inside, the accountants' arithmetic stays finite in double precision.
EPSILON_RANGE = (1e-6, 1e3)


def _check(epsilon: float, delta: float, **constants: float) -> None:
    _check_delta(delta)
    low, high = EPSILON_RANGE
    if not low <= epsilon <= high:
        raise CertificateError(
            f"epsilon must lie in [{low:g}, {high:g}], got {epsilon}; 1 is usual (below "
            f"{low:g} the noise erases the scope at any eps, above {high:g} nothing is "
            "guaranteed)"
        )
    for name, value in constants.items():
        if not value > 0:
            raise CertificateError(f"{name} must be positive, got {value}")


# -- Renyi accounting -------------------------------------------------------------------------
def renyi_epsilon(rho: float, delta: float) -> float:
    """The eps of (eps, delta)-unlearning from Renyi divergences D_alpha <= alpha * rho:

        eps = min over alpha > 1 of
              alpha rho + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

    (the conversion of Balle et al. 2020, Canonne et al. 2020); never below 0.
    """
    if rho <= 0:
        return 0.0
    log_delta = math.log(delta)

    def eps_at(u: float) -> float:  # u = log(alpha - 1), the terms in a form that stays finite
        a1 = math.exp(u)
        return (1 + a1) * rho + u - math.log1p(a1) - (log_delta + math.log1p(a1)) / a1

    # The minimum lies near alpha - 1 = sqrt(log(1/delta) / rho) (where alpha rho and
    # log(1/delta) / (alpha - 1) balance): a scan of 12 e-folds either side brackets it, a
    # bounded search refines it; should the search miss, the scan's value stands, which
    # overstates eps (the safe side).
    centre = 0.5 * (math.log(-log_delta) - math.log(rho))
    grid = centre + np.linspace(-12, 12, 97)
    values = [eps_at(u) for u in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    refined = minimize_scalar(eps_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    return max(0.0, min(values[best], float(refined.fun)))


@functools.lru_cache(maxsize=256)
def renyi_budget(epsilon: float, delta: float) -> float:
    """The largest rho (D_alpha <= alpha * rho) that renyi_epsilon turns into at most eps."""
    _check(epsilon, delta)

    def excess(log_rho: float) -> float:
        return renyi_epsilon(math.exp(log_rho), delta) - epsilon

    # eps(rho) is increasing, about rho + 2 sqrt(rho log(1/delta)): the root lies between
    # eps^2 / (4 log(1/delta)) and eps, up to a few e-folds; widen a bounded number of times.
    lo = 2 * math.log(epsilon) - math.log(-4 * math.log(delta)) - 2
    hi = math.log(epsilon) + 2
    for _ in range(20):
        if excess(lo) < 0 < excess(hi):
            return math.exp(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-12))
        lo, hi = lo - 2, hi + 2
    raise CertificateError(f"no Renyi budget found for eps {epsilon} at delta {delta}")


# -- gradient clipping ------------------------------------------------------------------------
def _check_gradient_clipping(epsilon, delta, c0, c1, gamma, lam) -> None:
    _check(epsilon, delta, C0=c0, C1=c1, gamma=gamma)
    if lam < 0:
        raise CertificateError(f"lambda (weight decay) must be >= 0, got {lam}")
    if lam > 0 and gamma * lam >= 1:
        raise CertificateError(f"gamma * lambda must be below 1, got {gamma * lam}")


def gradient_clipping_steps(c0: float, c1: float, gamma: float, steps: int | None = None) -> int:
    """T = ceil(C0 / (gamma C1)) unless given: the T that minimises sigma at lam = 0."""
    t = steps if steps is not None else math.ceil(c0 / (gamma * c1) - 1e-12)
    if t < 1:
        raise CertificateError(f"the noisy phase needs at least one step, got {t}")
    return t


def _shift_and_noise(c0: float, c1: float, gamma: float, lam: float, t: int) -> tuple[float, float]:
    """(Z, S): Z bounds the distance between the two runs after T steps (both start in the C0
    ball, each step moves them apart by at most 2 gamma C1, weight decay shrinks the gap by
    1 - gamma lam), S sums the squared decay of the noise. lam = 0: Z = 2 C0 + 2 gamma C1 T,
    S = T."""
    decay = (1 - gamma * lam) ** np.arange(t)  # (1 - gamma lam)^s for s = 0 .. T-1
    z = 2 * c0 * (1 - gamma * lam) ** t + 2 * gamma * c1 * float(decay.sum())
    return z, noise_decay(gamma, lam, t)


def noise_decay(gamma: float, lam: float, t: int) -> float:
    """S = sum_{s<T} (1 - gamma lam)^(2s): the per-coordinate variance, in units of sigma^2,
    that T noisy gradient-clipping steps leave in the last iterate (lam = 0: T)."""
    return float((((1 - gamma * lam) ** np.arange(t)) ** 2).sum())


def gradient_clipping_rho(
    sigma: float, c0: float, c1: float, gamma: float, lam: float, steps: int
) -> float:
    """rho with D_alpha <= alpha rho for T noisy steps (amplification by iteration, the
    authors' bound): rho = Z^2 / (2 sigma^2 S); lam = 0: (2 C0 + 2 gamma C1 T)^2 / (2 sigma^2 T)."""
    z, s = _shift_and_noise(c0, c1, gamma, lam, steps)
    return z**2 / (2 * sigma**2 * s)


def gradient_clipping_epsilon(
    sigma: float,
    delta: float,
    c0: float,
    c1: float,
    gamma: float,
    lam: float = 0.0,
    steps: int | None = None,
) -> float:
    """The eps that sigma buys at delta (the inverse of gradient_clipping_sigma)."""
    t = gradient_clipping_steps(c0, c1, gamma, steps)
    return renyi_epsilon(gradient_clipping_rho(sigma, c0, c1, gamma, lam, t), delta)


@functools.lru_cache(maxsize=256)
def gradient_clipping_sigma(
    epsilon: float,
    delta: float,
    c0: float,
    c1: float,
    gamma: float,
    lam: float = 0.0,
    steps: int | None = None,
) -> tuple[float, int]:
    """(sigma, T) for gradient clipping: the smallest sigma whose Renyi bound converts to the
    requested (eps, delta); T = ceil(C0 / (gamma C1)) unless given. Any eps > 0 is covered."""
    _check_gradient_clipping(epsilon, delta, c0, c1, gamma, lam)
    t = gradient_clipping_steps(c0, c1, gamma, steps)
    z, s = _shift_and_noise(c0, c1, gamma, lam, t)
    # rho = Z^2 / (2 sigma^2 S) falls as sigma grows: solve for rho, then read off sigma.
    return z / math.sqrt(2 * renyi_budget(epsilon, delta) * s), t


def gradient_clipping_sigma_closed_form(
    epsilon: float,
    delta: float,
    c0: float,
    c1: float,
    gamma: float,
    lam: float = 0.0,
    steps: int | None = None,
) -> tuple[float, int]:
    """The closed form of docs/method.md, "Gradient clipping (certified)", kept as a
    cross-check of gradient_clipping_sigma:

        lam = 0:  sigma^2 = 9 log(1/delta) (C0 + gamma C1 T)^2 / (eps^2 T)
        lam > 0:  sigma^2 = 72 gamma lam log(1/delta) (C0 (1 - gamma lam)^T + C1 / lam)^2 / eps^2

    It is stated for eps <= 3 log(1/delta) but is conservative (never below the numerical
    sigma) only over part of that range: at lam = 0 up to eps of about 5 (delta 1e-2), 7.9
    (1e-5) or 11 (1e-10). Above that it adds too little noise (eps 16 asked at delta 1e-5
    is really 18.9, eps 30 is 44), which is why the numerical accountant sets sigma.
    """
    _check_gradient_clipping(epsilon, delta, c0, c1, gamma, lam)
    limit = 3 * math.log(1 / delta)
    if epsilon > limit:
        raise CertificateError(
            f"the closed form is stated for eps <= 3 log(1/delta) = {limit:.3g}; got eps = "
            f"{epsilon}: use gradient_clipping_sigma, which covers any eps"
        )
    t = gradient_clipping_steps(c0, c1, gamma, steps)
    log_term = math.log(1 / delta)
    if lam == 0:
        variance = 9 * log_term * (c0 + gamma * c1 * t) ** 2 / (epsilon**2 * t)
    else:
        variance = (
            72 * gamma * lam * log_term * (c0 * (1 - gamma * lam) ** t + c1 / lam) ** 2 / epsilon**2
        )
    return math.sqrt(variance), t


def gradient_clipping_snr(
    sigma: float, c0: float, c1: float, gamma: float, lam: float, steps: int
) -> float:
    """Bound on the signal-to-noise ratio of any linear read-out of the released scope.

    After T steps the scope is a part of norm at most Z / 2 (what it kept of the start and of
    the clipped gradients) plus Gaussian noise of per-coordinate variance sigma^2 S, so a unit
    read-out sees signal at most Z / 2 against noise sigma sqrt(S): lam = 0 gives
    (C0 + gamma C1 T) / (sigma sqrt T), which the closed form puts at eps / (3 sqrt(log(1/delta))).
    It equals sqrt(rho / 2), so it depends on (eps, delta) alone.
    """
    z, s = _shift_and_noise(c0, c1, gamma, lam, steps)
    return z / (2 * sigma * math.sqrt(s))


def gradient_clipping_epsilon_for_snr(snr: float, delta: float) -> float:
    """The eps at which gradient clipping's read-out bound reaches `snr` (rho = 2 snr^2),
    whatever C0, C1, gamma, lam and T."""
    if not snr > 0:
        raise CertificateError(f"the signal-to-noise ratio must be positive, got {snr}")
    _check_delta(delta)
    return renyi_epsilon(2 * snr**2, delta)


# -- model clipping ---------------------------------------------------------------------------
def gaussian_delta(epsilon: float, r: float) -> float:
    """theta_eps(r) = Q(eps/r - r/2) - e^eps Q(eps/r + r/2): the exact delta of a Gaussian
    mechanism with sensitivity-to-noise ratio r. Written Q(a) (1 - e^(eps + log Q(b) - log Q(a)))
    in log space: e^eps overflows above eps 709 where Q(b) underflows."""
    log_qa = norm.logsf(epsilon / r - r / 2)
    log_ratio = epsilon + norm.logsf(epsilon / r + r / 2) - log_qa  # <= 0 but for rounding
    return max(0.0, float(-math.exp(log_qa) * math.expm1(min(log_ratio, 0.0))))


@functools.lru_cache(maxsize=256)
def model_clipping_deltas(
    epsilon: float, delta: float, c2: float, sigma: float, max_steps: int = 10_000
) -> tuple[float, ...]:
    """delta_t after each noisy model-clipping step until delta_t <= delta (first entry: 1).

    delta_0 = 1, eps_t = log(1 + (e^eps - 1) / delta_t),
    delta_{t+1} = delta_t theta_{eps_t}(2 C2 / sigma).
    """
    _check(epsilon, delta, C2=c2, sigma=sigma)
    deltas, r = [1.0], 2 * c2 / sigma
    log_expm1 = epsilon + math.log(-math.expm1(-epsilon))  # log(e^eps - 1), finite at any eps
    while deltas[-1] > delta:
        if len(deltas) > max_steps:
            raise CertificateError(
                f"delta does not reach {delta} within {max_steps} noisy steps with C2 = {c2} and "
                f"sigma = {sigma}; raise sigma or lower C2"
            )
        eps_t = float(np.logaddexp(0.0, log_expm1 - math.log(deltas[-1])))
        deltas.append(deltas[-1] * gaussian_delta(eps_t, r))
    return tuple(deltas)


def model_clipping_snr(c2: float, sigma: float) -> float:
    """Bound on the signal-to-noise ratio of any linear read-out of the released scope: the
    last step releases a point of the C2 ball plus one noise draw, C2 / sigma. eps does not
    set it (the accountant trades eps for noisy steps); sigma = C2 / ratio keeps a ratio."""
    return c2 / sigma


# -- the certificate --------------------------------------------------------------------------
# How the release covers each tensor of the scope.
NOISED = "projected and noised"
REESTIMATED = "reset before the noisy phase, re-estimated on retain images after it"
# Where the noise came from: numpy's Philox generator, whose key (128 bits) is derived from
# the seed through numpy's SeedSequence, on every device (drawn on the host, then moved).
NOISE_SECRET_BITS = 128
NOISE_FROM_ENTROPY = (
    f"drawn from numpy's Philox generator keyed with {NOISE_SECRET_BITS} bits of fresh OS "
    "entropy, never recorded"
)
# What a certified run that released nothing of its own says in place of its certificate.
NOT_ISSUED = (
    "No certificate was issued: the collapse gate kept the starting model, which was trained "
    "with the forget set, so nothing certified was released."
)


def noise_from_seed(seed: int) -> str:
    return (
        f"drawn from numpy's Philox generator keyed from noise_seed = {seed}, which the run "
        "records: whoever knows it can regenerate and subtract the noise, and against them "
        "the guarantee does not hold"
    )


def expectation(
    snr_bound: float, target_snr: float, epsilon_for_target: float | None, sigma_for_target: float
) -> str:
    """What to expect of the noisy phase, in one line: the read-out signal-to-noise bound and
    the eps (or sigma) that would keep a target ratio."""
    target, sigma = f"{target_snr:g}", f"sigma {sigma_for_target:.3g}"
    if epsilon_for_target is None:
        keep = f"eps does not set it; {sigma} keeps {target} (a smaller eps: more noisy steps)"
    else:
        keep = f"eps {epsilon_for_target:.3g} ({sigma}) would keep {target}"
    return f"signal-to-noise of any linear read-out of the scope <= {snr_bound:.3g}; {keep}"


# The network's parts and scopes in plain words (model.SCOPE_MODULES).
PARTS = {
    "encoder": "encoder",
    "decoder": "decoder",
    "segmentation_head": "last layer",
    "head": "last layer",
    "all": "whole network",
}


def guarantee(
    epsilon: float,
    delta: float,
    scope: str | None,
    frozen: tuple[str, ...] | list[str] = (),
    saw: bool | None = False,
) -> str:
    """What a certified run guarantees, in one plain sentence (the assumptions behind it are
    in the full certificate): `saw` whether the `frozen` parts saw the coarse masks."""
    parts = " and ".join(PARTS.get(name, name) for name in frozen)
    void = {
        True: f"; but the frozen {parts} saw the coarse masks, which voids it",
        None: f"; unless the frozen {parts} saw the coarse masks (not recorded), which voids it",
        False: "",
    }[saw]
    return (
        f"Guaranteed at privacy ε {epsilon:g}, δ {delta:.0e}: the "
        f"{PARTS.get(scope or '', 'updated part')} after the run is nearly indistinguishable "
        f"from one trained on your corrected masks only{void if frozen else ''}."
    )


@dataclass(frozen=True)
class Certificate:
    """What a certified run guarantees, for which tensors, and at what cost in noise."""

    operator: str
    epsilon: float
    delta: float
    sigma: float  # per-coordinate standard deviation of each step's noise
    noisy_steps: int
    gamma: float
    lam: float
    clipping: dict[str, float]
    achieved_delta: float
    accountant: str
    scope: str
    scoped_parameters: int
    coverage: dict[str, str]  # every tensor of the scope (parameters, buffers) -> its treatment
    forgets: str  # which pixels the certificate forgets (the forget set and its retain set)
    noise_source: str  # where the noise came from (a recorded seed voids the guarantee)
    # What the noise-free recovery after the noisy phase does (before a run) or did (after
    # it: Certificate.after_recovery): post-processing on retain data only.
    recovery: str
    frozen: list[str]
    frozen_saw_coarse_labels: bool | None  # None: unknown (e.g. a checkpoint from elsewhere)
    # Expected norm of the noise left in the noisy phase's last iterate (the certified release,
    # before post-processing): gradient clipping sigma sqrt(d S) (lam = 0: sigma sqrt(d T), the
    # sum of the draws), model clipping sigma sqrt(d) (the last draw; the projections leave at
    # most C2 of the earlier ones).
    noise_norm: float
    noise_norm_per_step: float  # expected norm of one step's draw, sigma * sqrt(d)
    parameter_norm: float  # norm of the scoped parameters before unlearning
    # ... and after projection onto the operator's ball (C0 or C2): what the noise meets
    projected_norm: float
    noise_secret_bits: int  # secret bits keying the noise (0: a recorded noise_seed)
    snr_bound: float  # signal-to-noise bound of any linear read-out of the released scope
    target_snr: float  # a ratio the user would keep ...
    epsilon_for_target_snr: float | None  # ... the eps that keeps it (None: eps does not set it)
    sigma_for_target_snr: float  # ... and the per-step sigma that keeps it
    assumptions: tuple[str, ...] = field(default=ASSUMPTIONS)

    @property
    def noise_to_parameters(self) -> float:
        """The noise left in the noisy phase's last iterate against the projected scope."""
        return self.noise_norm / self.projected_norm if self.projected_norm else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "noise_to_parameters": self.noise_to_parameters}

    def expectation(self) -> str:
        """What to expect of the noisy phase, before a run."""
        return expectation(
            self.snr_bound, self.target_snr, self.epsilon_for_target_snr, self.sigma_for_target_snr
        )

    def plain(self) -> str:
        """Two plain sentences: what is guaranteed, what to expect (the numbers: summary)."""
        first = guarantee(
            self.epsilon, self.delta, self.scope, self.frozen, self.frozen_saw_coarse_labels
        )
        part = PARTS.get(self.scope, self.scope)
        # As unlearning.certified.collapse_warning; no smaller scope is suggested: its frozen
        # parts may have seen the coarse masks, which voids the guarantee.
        if self.noise_to_parameters > 1:
            second = (
                f"Expect the noise to wipe out what the {part} learned, and relearning on your "
                "corrected masks to rebuild it; a larger ε adds less noise."
            )
        else:
            second = (
                f"Expect noise about {self.noise_to_parameters:.0%} of the {part}'s size, then "
                "relearning on your corrected masks."
            )
        return f"{first} {second}"

    def summary(self) -> str:
        void = (
            "the guarantee covers neither them nor the scope, whose updates run on their features"
        )
        saw = {
            True: f"saw the coarse labels: {void}",
            False: "never saw the coarse labels",
            None: f"provenance unknown: should they have seen the coarse labels, {void}",
        }
        treated = {h: sum(v == h for v in self.coverage.values()) for h in (NOISED, REESTIMATED)}
        buffers = (
            f", {treated[REESTIMATED]} batch-norm buffers reset and re-estimated on retain images"
            if treated[REESTIMATED]
            else ""
        )
        return (
            f"({self.epsilon:g}, {self.delta:.1e})-certified by {self.operator} over the "
            f"{self.scope} scope ({self.scoped_parameters:,} parameters in {treated[NOISED]} "
            f"tensors projected and noised{buffers}; frozen: "
            f"{', '.join(self.frozen) or 'none'}, {saw[self.frozen_saw_coarse_labels]}); "
            f"sigma {self.sigma:.3g} per step over {self.noisy_steps} noisy steps; noise left "
            f"in the noisy phase's last iterate {self.noise_norm:.3g} against the scope's norm "
            f"projected to {self.projected_norm:.3g} (x{self.noise_to_parameters:.2g}; "
            f"{self.parameter_norm:.3g} before projection); {self.expectation()}. It forgets "
            f"{self.forgets}. Noise {self.noise_source}. Recovery: {self.recovery}."
        )

    def after_recovery(self, stopping: dict | None) -> Certificate:
        """This certificate, saying what the recovery did (the run's `stopping` record)."""
        if not stopping:
            return self
        return replace(self, recovery=f"{self.recovery}; {recovery_done(stopping)}")


def recovery_done(stopping: dict) -> str:
    """What a run's recovery did, from its `stopping` record, in one clause."""
    done, most = stopping["recovery_steps"], stopping["max_recovery_steps"]
    if not most:
        return "this run had none: the noisy phase's last iterate was released"
    held = stopping["validation_images"]
    loss = stopping["validation_loss"]
    best = stopping["best_step"] - stopping["noisy_steps"]
    measured = (
        f"; the released weights are those of recovery step {best}, whose retain loss on the "
        f"{held} held-out retain images was {loss:.3g} (the lowest measured)"
        if held and loss is not None
        else "; no retain image was held out, so the last weights were released"
    )
    return f"this run took {done} of at most {most} recovery steps ({stopping['reason']}){measured}"
