import itertools
import math

import numpy as np
import pytest
import torch
from conftest import TINY, refinement, state

from shortcut_unlearning import certificate as cert
from shortcut_unlearning.masks import split_pixels
from shortcut_unlearning.model import FrozenInputs, Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.retain import RETAIN_SETS, band_width
from shortcut_unlearning.training import TrainConfig, train
from shortcut_unlearning.unlearning import (
    GradientClipping,
    ModelClipping,
    UnlearnData,
    certified,
    make_operator,
)
from shortcut_unlearning.unlearning.certified import (
    add_noise_,
    estimate_batch_statistics,
    global_norm,
    noise_rng,
    project_,
    scope_batch_norms,
)

# The certified runs here warn that their noise dwarfs the tiny scopes: expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")
L5 = math.log(1e5)


# -- an independent accountant: the authors' formulas, a brute-force grid, bisection ---------
def authors_rho(sigma, c0, c1, gamma, lam, steps):
    """D_alpha / alpha after T steps, written as the authors' `unlearn_sigma_t` solves it for
    sigma (geometric sums in closed form): sigma^2 = Z^2 gamma lam (2 - gamma lam) /
    (2 rho (1 - c^2)) with c = (1 - gamma lam)^T, Z = 2 C0 c + (2 C1 / lam)(1 - c); lam = 0 is
    its limit Z = 2 C0 + 2 gamma C1 T, sigma^2 = Z^2 / (2 rho T)."""
    if lam == 0:
        return (2 * c0 + 2 * gamma * c1 * steps) ** 2 / (2 * sigma**2 * steps)
    c = (1 - gamma * lam) ** steps
    z = 2 * c0 * c + (2 * c1 / lam) * (1 - c)
    return z**2 * gamma * lam * (2 - gamma * lam) / (2 * sigma**2 * (1 - c**2))


ORDERS = 1 + np.geomspace(1e-7, 1e9, 400_001)


def grid_epsilon(rho, delta):
    """min over a dense grid of orders of the Renyi-to-(eps, delta) conversion."""
    a = ORDERS
    return float(
        np.min(a * rho + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)).clip(0)
    )


def bisect_sigma(epsilon, delta, c0, c1, gamma, lam, steps):
    lo, hi = 1e-8, 1e4  # eps falls as sigma grows
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        if grid_epsilon(authors_rho(mid, c0, c1, gamma, lam, steps), delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


SETTINGS = [  # (eps, delta, C0, C1, gamma, lambda)
    (1.0, 1e-5, 0.1, 10.0, 1e-3, 0.0),  # the paper's published setting
    (0.3, 1e-6, 0.5, 1.0, 0.1, 0.0),
    (3.0, 1e-3, 1.0, 2.0, 0.05, 0.0),
    (16.0, 1e-5, 0.1, 10.0, 1e-3, 0.0),
    (30.0, 1e-5, 0.1, 10.0, 1e-3, 0.0),
    (1.0, 1e-5, 0.1, 10.0, 1e-3, 0.5),
    (16.0, 1e-5, 1.0, 1.0, 0.01, 5.0),
    (30.0, 1e-8, 0.5, 1.0, 0.1, 0.1),
    (1e-6, 1e-5, 0.1, 10.0, 1e-3, 0.0),  # the ends of the range the accountant accepts
    (1e3, 1e-5, 0.1, 10.0, 1e-3, 0.0),
]


@pytest.mark.parametrize(("epsilon", "delta", "c0", "c1", "gamma", "lam"), SETTINGS)
def test_accountant_matches_an_independent_search(epsilon, delta, c0, c1, gamma, lam):
    sigma, steps = cert.gradient_clipping_sigma(epsilon, delta, c0, c1, gamma, lam)
    assert steps == math.ceil(c0 / (gamma * c1) - 1e-12)
    expected = bisect_sigma(epsilon, delta, c0, c1, gamma, lam, steps)
    assert sigma == pytest.approx(expected, rel=1e-4)
    # The sigma is tight: it spends the whole budget.
    assert grid_epsilon(authors_rho(sigma, c0, c1, gamma, lam, steps), delta) == pytest.approx(
        epsilon, rel=1e-4
    )
    assert cert.gradient_clipping_epsilon(sigma, delta, c0, c1, gamma, lam) == pytest.approx(
        epsilon, rel=1e-6
    )


@pytest.mark.parametrize(
    ("epsilon", "delta"),
    [(1e-12, 1e-30), (1e-300, 1e-300), (1e308, 1e-5), (math.inf, 1e-5), (math.nan, 1e-5)],
)
def test_requests_outside_the_accountants_range_are_refused_at_once(epsilon, delta):
    for calibrate in (
        lambda: cert.gradient_clipping_sigma(epsilon, delta, 0.1, 10, 1e-3),
        lambda: cert.model_clipping_deltas(epsilon, delta, 0.5, 0.5),
        lambda: make_operator("gradient-clipping", epsilon=epsilon, delta=delta),
        lambda: make_operator("model-clipping", epsilon=epsilon, delta=delta),
    ):
        with pytest.raises(cert.CertificateError, match=r"epsilon must lie in \[1e-06, 1000\]"):
            calibrate()


@pytest.mark.parametrize("epsilon", cert.EPSILON_RANGE)
@pytest.mark.parametrize("delta", [1e-5, 1e-300])
def test_the_accountants_are_finite_at_the_ends_of_their_range(epsilon, delta):
    sigma, steps = cert.gradient_clipping_sigma(epsilon, delta, 0.1, 10, 1e-3)
    assert math.isfinite(sigma) and sigma > 0 and steps == 10
    assert cert.gradient_clipping_epsilon(sigma, delta, 0.1, 10, 1e-3) == pytest.approx(
        epsilon, rel=1e-6
    )
    deltas = cert.model_clipping_deltas(epsilon, delta, 0.5, 0.5)
    assert deltas[-1] <= delta < deltas[-2] and all(b < a for a, b in itertools.pairwise(deltas))
    # e^1000 overflows a double: the log-space delta agrees with the plain formula where
    # that one is finite, and stays a probability where it is not.
    for eps in (0.5, 30.0):
        plain = norm_sf(eps / 2 - 1) - math.exp(eps) * norm_sf(eps / 2 + 1)
        assert cert.gaussian_delta(eps, 2.0) == pytest.approx(plain, rel=1e-9, abs=1e-300)
    assert 0 <= cert.gaussian_delta(1e3, 2.0) < 1e-100


def norm_sf(x):
    return 0.5 * math.erfc(x / math.sqrt(2))


def test_renyi_conversion_by_hand():
    # rho = 1, delta = 1e-5: alpha = 5 gives 5 + log(4/5) - (log 1e-5 + log 5) / 4 = 7.2527,
    # alpha = 4.2 gives 4.2 + log(3.2/4.2) - (log 1e-5 + log 4.2) / 3.2 = 7.0774, near the minimum.
    def at(alpha):
        return (
            alpha + math.log((alpha - 1) / alpha) - (math.log(1e-5) + math.log(alpha)) / (alpha - 1)
        )

    assert at(5) == pytest.approx(7.2527, abs=1e-4)
    assert at(4.2) == pytest.approx(7.0774, abs=1e-4)
    assert 7.07 < cert.renyi_epsilon(1.0, 1e-5) <= at(4.2)
    assert cert.renyi_epsilon(1.0, 1e-5) == pytest.approx(grid_epsilon(1.0, 1e-5), rel=1e-7)
    assert cert.renyi_epsilon(0.0, 1e-5) == 0  # no divergence, no loss


def test_closed_form_by_hand():
    sigma, steps = cert.gradient_clipping_sigma_closed_form(1.0, 1e-5, c0=0.1, c1=10, gamma=1e-3)
    assert steps == 10  # ceil(0.1 / (1e-3 * 10))
    # sigma^2 = 9 ln(1e5) (0.1 + 1e-3 * 10 * 10)^2 / (1 * 10) = 9 * 11.5129 * 0.04 / 10
    assert sigma == pytest.approx(math.sqrt(0.414465), rel=1e-5)
    sigma, _ = cert.gradient_clipping_sigma_closed_form(1.0, 1e-5, 0.1, 10, 1e-3, lam=0.5)
    expected = 72 * 1e-3 * 0.5 * L5 * (0.1 * (1 - 5e-4) ** 10 + 10 / 0.5) ** 2
    assert sigma == pytest.approx(math.sqrt(expected), rel=1e-9)


def test_closed_form_is_conservative_only_below_about_eps_8():
    def ratio(epsilon, delta, lam=0.0, c0=0.1, c1=10.0, gamma=1e-3):
        closed = cert.gradient_clipping_sigma_closed_form(epsilon, delta, c0, c1, gamma, lam)[0]
        return closed / cert.gradient_clipping_sigma(epsilon, delta, c0, c1, gamma, lam)[0]

    # lam = 0: conservative up to eps 5.2 (delta 1e-2), 7.9 (1e-5), 10 (1e-8); not beyond.
    for delta, top in ((1e-2, 5.2), (1e-5, 7.85), (1e-8, 10.0)):
        assert all(ratio(e, delta) >= 1 for e in np.linspace(0.05, top, 12))
        assert ratio(top + 0.5, delta) < 1
    # What the closed form would certify, asked for eps 16 and 30 at 1e-5: 18.9 and 44.1.
    for asked, really in ((16, 18.9), (30, 44.1)):
        closed = cert.gradient_clipping_sigma_closed_form(asked, 1e-5, 0.1, 10, 1e-3)[0]
        assert cert.gradient_clipping_epsilon(closed, 1e-5, 0.1, 10, 1e-3) == pytest.approx(
            really, abs=0.1
        )
    # lam > 0: far above the numerical sigma at every setting checked within its range.
    for lam, (c0, c1, gamma), epsilon in itertools.product(
        (1e-3, 0.5, 5.0), ((0.1, 10.0, 1e-3), (1.0, 1.0, 0.01)), (0.5, 8.0, 30.0)
    ):
        assert ratio(epsilon, 1e-5, lam, c0, c1, gamma) > 1.5


def test_large_epsilon_is_accounted_not_refused():
    sigma, _ = cert.gradient_clipping_sigma(40.0, 1e-5, 0.1, 10, 1e-3)
    assert 0 < sigma < cert.gradient_clipping_sigma(30.0, 1e-5, 0.1, 10, 1e-3)[0]
    assert cert.gradient_clipping_epsilon(sigma, 1e-5, 0.1, 10, 1e-3) == pytest.approx(40)
    with pytest.raises(cert.CertificateError, match="use gradient_clipping_sigma"):
        cert.gradient_clipping_sigma_closed_form(40.0, 1e-5, 0.1, 10, 1e-3)


# -- what to expect: the read-out bound --------------------------------------------------------
def test_read_out_bound_of_gradient_clipping():
    # Under the closed form the bound is eps / (3 sqrt(log(1/delta))): 0.098 at (1, 1e-5).
    closed, steps = cert.gradient_clipping_sigma_closed_form(1.0, 1e-5, 0.1, 10, 1e-3)
    snr = cert.gradient_clipping_snr(closed, 0.1, 10, 1e-3, 0.0, steps)
    assert snr == pytest.approx(1 / (3 * math.sqrt(L5)), rel=1e-9)
    assert snr == pytest.approx((0.1 + 1e-3 * 10 * 10) / (closed * math.sqrt(10)), rel=1e-9)
    for epsilon, delta, c0, c1, gamma, lam in SETTINGS:
        sigma, steps = cert.gradient_clipping_sigma(epsilon, delta, c0, c1, gamma, lam)
        snr = cert.gradient_clipping_snr(sigma, c0, c1, gamma, lam, steps)
        # sqrt(rho / 2), so (eps, delta) alone fix it; inverting it gives the eps back.
        assert snr == pytest.approx(math.sqrt(authors_rho(sigma, c0, c1, gamma, lam, steps) / 2))
        assert cert.gradient_clipping_epsilon_for_snr(snr, delta) == pytest.approx(epsilon, 1e-6)
    # A ratio of 1 at 1e-5 needs rho = 2: eps 10.7.
    assert cert.gradient_clipping_epsilon_for_snr(1.0, 1e-5) == pytest.approx(
        grid_epsilon(2.0, 1e-5), rel=1e-7
    )
    assert cert.model_clipping_snr(0.5, 0.25) == 2


# -- model clipping ----------------------------------------------------------------------------
def test_model_clipping_accountant_reaches_delta_in_six_steps():
    deltas = cert.model_clipping_deltas(1.0, 1e-5, c2=0.5, sigma=0.5)
    assert len(deltas) - 1 == 6
    assert deltas[0] == 1 and deltas[-1] <= 1e-5 < deltas[-2]
    assert all(b < a for a, b in itertools.pairwise(deltas))
    # First step by hand: eps_0 = 1, r = 2 * 0.5 / 0.5 = 2: Q(-0.5) - e Q(1.5).
    assert deltas[1] == pytest.approx(0.691462 - math.e * 0.0668072, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 1.0, "delta": 1.5}, "delta must lie in"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta must lie in"),
        ({"epsilon": 0.0, "delta": 1e-5}, "epsilon must lie in"),
        ({"epsilon": 1.0, "delta": 1e-5, "c0": -1}, "C0 must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "c1": 0}, "C1 must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "gamma": 0}, "gamma must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "lam": -0.1}, "lambda"),
        ({"epsilon": 1.0, "delta": 1e-5, "lam": 2000}, "gamma \\* lambda"),
    ],
)
def test_invalid_requests_say_what_is_allowed(kwargs, message):
    args = {"c0": 0.1, "c1": 10, "gamma": 1e-3, **kwargs}
    with pytest.raises(cert.CertificateError, match=message):
        cert.gradient_clipping_sigma(**args)


def test_invalid_model_clipping_requests():
    with pytest.raises(cert.CertificateError, match="sigma must be positive"):
        cert.model_clipping_deltas(1.0, 1e-5, c2=0.5, sigma=0)
    with pytest.raises(cert.CertificateError, match="does not reach"):
        cert.model_clipping_deltas(1.0, 1e-5, c2=50, sigma=0.01, max_steps=20)


def test_projection_is_global_not_per_tensor():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])  # norms 5 and 12, together 13
    project_([a, b], 6.5)
    torch.testing.assert_close(a, torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(b, torch.tensor([0.0, 6.0]))
    assert math.isclose(float(torch.sqrt((a**2).sum() + (b**2).sum())), 6.5, rel_tol=1e-6)
    # Per-tensor clipping at 6.5 would have left `a` untouched: a different answer.
    small = [torch.tensor([0.3, 0.4])]
    project_(small, 6.5)  # inside the ball: unchanged
    torch.testing.assert_close(small[0], torch.tensor([0.3, 0.4]))


def test_noise_has_the_calibrated_variance():
    tensors = [torch.zeros(60_000), torch.zeros(40_000)]
    add_noise_(tensors, 0.3, noise_rng(0))
    sample = torch.cat(tensors)
    # Sample variance of 1e5 normals: relative standard error sqrt(2 / n) = 0.45 %.
    assert float(sample.var()) == pytest.approx(0.09, rel=0.02)
    assert abs(float(sample.mean())) < 4 * 0.3 / math.sqrt(1e5)


# -- certified runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setting(tiny_data):
    data, coarse = tiny_data
    return Model(TINY), UnlearnData(data.images, coarse, refinement(coarse, data.masks, 6))


@pytest.fixture(scope="module")
def coarse_model(tiny_data):
    """A decoder-scope model trained on the coarse masks: its batch-norm statistics too."""
    data, coarse = tiny_data
    model = Model(TINY)
    drive(train(model, data.images, coarse, TrainConfig(epochs=2, batch_size=8)), quiet=True)
    return model


@pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")
def test_gradient_clipping_runs_two_phases_and_certifies(setting):
    model, data = setting
    before = state(model)
    op = GradientClipping(c0=0.5, c1=1.0, lr=0.1, finetune_steps=3, scope="head")
    assert op.noisy_steps() == 5 and op.steps == 8
    result = drive(op.run(model, data), quiet=True)
    assert [e.phase for e in result.history] == ["noisy"] * 5 + ["fine-tune"] * 3
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    c = op.certificate(model)
    assert c.scope == "head" and c.frozen == ["encoder", "decoder"]
    assert c.scoped_parameters == sum(p.numel() for p in model.net.segmentation_head.parameters())
    d = c.scoped_parameters
    assert c.noise_norm == pytest.approx(c.sigma * math.sqrt(d * 5))
    assert c.noise_norm_per_step == pytest.approx(c.sigma * math.sqrt(d))
    assert c.frozen_saw_coarse_labels is None  # this model has no training provenance
    assert c.snr_bound == pytest.approx(cert.gradient_clipping_snr(c.sigma, 0.5, 1.0, 0.1, 0, 5))
    assert c.epsilon_for_target_snr == pytest.approx(
        cert.gradient_clipping_epsilon_for_snr(1.0, 1e-5)
    )
    # The sigma that keeps the ratio is the one the accountant gives at that eps.
    at = cert.gradient_clipping_sigma(c.epsilon_for_target_snr, 1e-5, 0.5, 1.0, 0.1)[0]
    assert c.sigma_for_target_snr == pytest.approx(at, rel=1e-6)
    summary = c.summary()
    for words in ("certified by gradient-clipping", "signal-to-noise", "would keep 1"):
        assert words in summary
    assert {
        "epsilon",
        "delta",
        "sigma",
        "noisy_steps",
        "assumptions",
        "coverage",
        "snr_bound",
        "epsilon_for_target_snr",
        "noise_norm_per_step",
    } <= set(c.to_dict())
    assert any("corrected labels" in a for a in c.assumptions)


def test_model_clipping_projects_onto_the_c2_ball(setting):
    model, data = setting
    # r = 2 C2 / sigma = 2: six noisy steps; one noise draw has norm about 1e-3 sqrt(219) = 0.015.
    op = ModelClipping(c2=1e-3, noise=1e-3, finetune_steps=0, scope="head", lr=0.01)
    assert op.noisy_steps() == 6
    assert model.net.segmentation_head[0].weight.norm() > 0.5  # far outside the ball
    result = drive(op.run(model, data), quiet=True)
    head = [p for p in result.model.net.segmentation_head.parameters()]
    assert float(torch.sqrt(sum((p.detach() ** 2).sum() for p in head))) < 1e-3 + 0.05
    c = op.certificate(model)
    assert c.achieved_delta <= 1e-5
    assert c.snr_bound == 1 and c.epsilon_for_target_snr is None
    assert c.sigma_for_target_snr == 1e-3  # C2 / 1
    assert "eps does not set it" in c.summary()


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_reported_noise_is_the_noise_left_by_gradient_clipping(setting, lam):
    """After T noisy steps with a negligible signal the scope is the noise left: each draw
    shrunk by (1 - gamma lam) per later step, sigma sqrt(d S); lam = 0: the sum of the T
    draws, sqrt(T) times one draw."""
    model, data = setting
    # Signal at most C0 + gamma C1 T = 2e-3; the noise is some 0.12 sqrt(d) times larger.
    op = GradientClipping(c0=1e-3, c1=1e-4, lr=1.0, lam=lam, finetune_steps=0, scope="decoder")
    assert op.noisy_steps() == 10
    result = drive(op.run(model, data), quiet=True)
    c = op.certificate(model)
    released = float(global_norm(result.model.scoped_parameters()))
    assert released == pytest.approx(c.noise_norm, rel=0.02)
    s = sum((1 - lam) ** (2 * k) for k in range(10))  # 10, or 4/3 at gamma lam = 0.5
    assert c.noise_norm == pytest.approx(math.sqrt(s) * c.noise_norm_per_step)
    # against the start projected onto the C0 ball, not the start's own norm
    assert c.projected_norm == 1e-3 < c.parameter_norm
    assert c.noise_to_parameters == pytest.approx(c.noise_norm / 1e-3)
    assert f"projected to {1e-3:.3g} (x{c.noise_to_parameters:.2g}" in c.summary()


def test_reported_noise_is_the_noise_left_by_model_clipping(setting):
    """Model clipping projects before every draw: the last iterate is a point of the C2 ball
    plus one draw, so what is left is sigma sqrt(d), not sigma sqrt(d T)."""
    model, data = setting
    op = ModelClipping(c2=0.5, noise=0.5, finetune_steps=0, scope="decoder", lr=0.01)
    assert op.noisy_steps() == 6
    result = drive(op.run(model, data), quiet=True)
    c = op.certificate(model)
    released = float(global_norm(result.model.scoped_parameters()))
    assert (
        c.noise_norm == pytest.approx(c.noise_norm_per_step) == 0.5 * math.sqrt(c.scoped_parameters)
    )
    assert released == pytest.approx(c.noise_norm, rel=0.02)
    assert c.projected_norm == min(c.parameter_norm, 0.5)


def test_noise_seeds_differing_above_bit_32_give_different_noise_on_the_cpu(setting, monkeypatch):
    model, data = setting
    assert model.device.type == "cpu"

    def released(**options):
        op = GradientClipping(c0=0.2, c1=1.0, lr=0.1, finetune_steps=0, scope="head", **options)
        out = drive(op.run(model, data), quiet=True).model
        return torch.cat([p.detach().flatten() for p in out.scoped_parameters()])

    seed = 12345
    first = released(noise_seed=seed)
    assert torch.equal(first, released(noise_seed=seed))
    for high in (2**32, 2**40, 2**63, 2**100):
        assert not torch.equal(first, released(noise_seed=seed + high)), high
    # A fresh key has NOISE_SECRET_BITS bits, and bits above 64 change the noise.
    asked, keys = [], [seed, seed + 2**100]
    monkeypatch.setattr(certified.secrets, "randbits", lambda k: asked.append(k) or keys.pop())
    assert not torch.equal(released(), released())
    assert asked == [cert.NOISE_SECRET_BITS] * 2 and cert.NOISE_SECRET_BITS >= 64
    c = GradientClipping().certificate(model)
    assert c.noise_secret_bits == 128 and "128 bits of fresh OS entropy" in c.summary()
    assert GradientClipping(noise_seed=2**70).certificate(model).noise_secret_bits == 0
    with pytest.raises(ValueError, match="noise_seed must be a non-negative integer"):
        GradientClipping(noise_seed=-1)


def nested_worlds(tiny_data):
    """Two refinements of the same six images with the same corrected labels: world B's
    coarse masks held fewer wrong pixels, so its forget set is a strict subset of world A's
    (image 5 has none left in B)."""
    data, coarse = tiny_data
    fine = {i: data.masks[i] for i in range(6)}
    split_a = split_pixels(coarse, fine)
    left = np.zeros(coarse.shape[1:], bool)
    left[:, : coarse.shape[2] // 2] = True
    coarse_b = coarse.copy()
    for i in fine:
        coarse_b[i][split_a.forget[i] & (~left if i < 5 else True)] = 0
    split_b = split_pixels(coarse_b, fine)
    assert (split_b.forget <= split_a.forget).all() and not split_b.forget[5].any()
    assert split_b.forget.sum() < split_a.forget.sum() / 2
    assert np.array_equal(split_a.targets, split_b.targets)
    # the retain sets are the same too: "refined+certain" reads the band width off the forget
    # pixels' depth, which these two worlds share
    assert band_width(coarse, split_a) == band_width(coarse_b, split_b)
    return (
        UnlearnData(data.images, coarse, split_a),
        UnlearnData(data.images, coarse_b, split_b),
    )


# Every option the certified operators accept that changes what they do, several at a time.
FAST_CERTIFIED = {
    GradientClipping: {"c0": 0.2, "c1": 1.0, "lr": 0.1},
    ModelClipping: {"c2": 0.1},
}
OPTIONS = [
    {},  # the default retain set, rescale, soft Dice and validation probe
    {"retain_images": RETAIN_SETS[1], "scope": "head", "lam": 0.05, "batch_statistics": True},
    {"retain_images": RETAIN_SETS[2], "rescale": False, "finetune_dice_weight": 0.0},
    {"validation_share": 0.0, "finetune_steps": 0},
]


@pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("operator", [GradientClipping, ModelClipping])
def test_nested_forget_sets_with_the_same_corrected_labels_release_the_same_scope(
    tiny_data, setting, operator, options
):
    world_a, world_b = nested_worlds(tiny_data)
    start = setting[0]
    settings = {
        **FAST_CERTIFIED[operator],
        "finetune_steps": 3,
        "validate_every": 2,
        "batch_size": 4,
        "noise_seed": 2**40 + 7,
        **options,
    }

    def released(world):
        result = drive(operator(**settings).run(start, world), quiet=True)
        assert not result.collapsed
        scope = ("segmentation_head",) if "scope" in options else ("decoder", "segmentation_head")
        return {k: v for k, v in state(result.model).items() if k.split(".")[0] in scope}

    a, b = released(world_a), released(world_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The context term inpaints at the forget positions: refused, in every mode.
    for mode in ("blind", "consistent", "blind+consistent"):
        with pytest.raises(ValueError, match="cannot use the context term"):
            operator(**settings, context=mode)
        with pytest.raises(ValueError, match="cannot use the context term"):
            make_operator(operator.name, context=mode)


@pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")
@pytest.mark.parametrize(
    "op",
    [
        GradientClipping(finetune_steps=2),
        GradientClipping(finetune_steps=0),
        ModelClipping(finetune_steps=2),
        ModelClipping(finetune_steps=0),
    ],
    ids=["gradient-clipping", "gradient-clipping-noisy-only", "model-clipping", "mc-noisy-only"],
)
def test_no_released_tensor_of_the_scope_is_the_coarse_models(coarse_model, setting, op):
    _, data = setting
    coarse = state(coarse_model)
    released = state(drive(op.run(coarse_model, data), quiet=True).model)
    c = op.certificate(coarse_model)
    scope = [k for k in coarse if k.split(".")[0] in ("decoder", "segmentation_head")]
    assert sorted(c.coverage) == sorted(scope)  # every tensor of the scope, buffers included
    assert any(how == cert.REESTIMATED for how in c.coverage.values())
    assert "running_mean" in "".join(k for k, v in c.coverage.items() if v == cert.REESTIMATED)
    # num_batches_tracked counts batches and holds nothing learned; it equals the coarse
    # model's whenever re-estimation sees as many batches as training did.
    learned = [k for k in scope if not k.endswith("num_batches_tracked")]
    same = [k for k in learned if torch.equal(coarse[k], released[k])]
    assert not same, f"released unchanged from the coarse model: {same}"
    assert all(torch.equal(coarse[k], released[k]) for k in coarse if k not in scope)


def test_statistics_are_re_estimated_on_retain_images_from_the_last_noisy_iterate(
    coarse_model, setting
):
    _, data = setting
    op = GradientClipping(finetune_steps=0)
    with pytest.warns(UserWarning):
        released = drive(op.run(coarse_model, data), quiet=True).model
    # Re-estimate from the released weights and the retain images (the default retain set
    # holds every image: the refined ones and the others' certain pixels): the same.
    again = released.copy()
    for m in scope_batch_norms(again):
        m.running_mean.fill_(7.0)
    retain = np.arange(len(data.images))
    inputs = FrozenInputs(again, data.images[retain])
    estimate_batch_statistics(again, inputs, np.arange(len(retain)), op.batch_size)
    for a, b in zip(state(released).values(), state(again).values(), strict=True):
        torch.testing.assert_close(a, b)


def test_an_uncovered_buffer_in_the_scope_is_refused(setting):
    model = setting[0].copy()
    model.net.decoder.register_buffer("leak", torch.ones(3))
    with pytest.raises(cert.CertificateError, match=r"decoder\.leak"):
        GradientClipping().certificate(model)


def test_noise_that_dwarfs_the_parameters_warns_and_names_the_remedy(setting):
    model, data = setting
    op = GradientClipping(c0=0.1, c1=10, lr=1e-3, finetune_steps=0)  # sigma 0.51 on the decoder
    with pytest.warns(UserWarning, match="larger epsilon or delta"):
        drive(op.run(model, data), quiet=True)
