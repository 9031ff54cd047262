import itertools
import math

import numpy as np
import pytest
import torch
from conftest import TINY, refinement, same_state, state

from shortcut_unlearning import certificate as cert
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.unlearning import GradientClipping, ModelClipping, UnlearnData
from shortcut_unlearning.unlearning.certified import add_noise_, project_


def test_gradient_clipping_calibration_by_hand():
    sigma, steps = cert.gradient_clipping_sigma(1.0, 1e-5, c0=0.1, c1=10, gamma=1e-3)
    assert steps == 10  # ceil(0.1 / (1e-3 * 10))
    # sigma^2 = 9 ln(1e5) (0.1 + 1e-3 * 10 * 10)^2 / (1 * 10) = 9 * 11.5129 * 0.04 / 10
    assert sigma == pytest.approx(math.sqrt(0.414465), rel=1e-5)
    assert sigma == pytest.approx(0.64379, abs=1e-5)


def test_gradient_clipping_with_weight_decay_by_hand():
    sigma, steps = cert.gradient_clipping_sigma(1.0, 1e-5, c0=0.1, c1=10, gamma=1e-3, lam=0.5)
    expected = 72 * 1e-3 * 0.5 * math.log(1e5) * (0.1 * (1 - 5e-4) ** 10 + 10 / 0.5) ** 2
    assert steps == 10 and sigma == pytest.approx(math.sqrt(expected), rel=1e-9)


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
        ({"epsilon": 40.0, "delta": 1e-5}, "eps <= 3 log"),
        ({"epsilon": 1.0, "delta": 1.5}, "delta must lie in"),
        ({"epsilon": 1.0, "delta": 0.0}, "delta must lie in"),
        ({"epsilon": 0.0, "delta": 1e-5}, "epsilon must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "c0": -1}, "C0 must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "c1": 0}, "C1 must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "gamma": 0}, "gamma must be positive"),
        ({"epsilon": 1.0, "delta": 1e-5, "lam": -0.1}, "lambda"),
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
    add_noise_(tensors, 0.3, torch.Generator().manual_seed(0))
    sample = torch.cat(tensors)
    # Sample variance of 1e5 normals: relative standard error sqrt(2 / n) = 0.45 %.
    assert float(sample.var()) == pytest.approx(0.09, rel=0.02)
    assert abs(float(sample.mean())) < 4 * 0.3 / math.sqrt(1e5)


@pytest.fixture(scope="module")
def setting(tiny_data):
    data, coarse = tiny_data
    return Model(TINY), UnlearnData(data.images, coarse, refinement(coarse, data.masks, 6))


def test_gradient_clipping_runs_two_phases_and_certifies(setting):
    model, data = setting
    before = state(model)
    op = GradientClipping(c0=0.5, c1=1.0, lr=0.1, finetune_steps=3, scope="head")
    assert op.noisy_steps() == 5 and op.steps == 8
    result = drive(op.run(model, data), quiet=True)
    assert [e.phase for e in result.history] == ["noisy"] * 5 + ["fine-tune"] * 3
    assert same_state(before, state(model))
    c = op.certificate(model)
    assert c.scope == "head" and c.frozen == ["encoder", "decoder"]
    assert c.scoped_parameters == sum(p.numel() for p in model.net.segmentation_head.parameters())
    assert c.noise_norm == pytest.approx(c.sigma * math.sqrt(c.scoped_parameters))
    assert c.frozen_saw_coarse_labels is None  # this model has no training provenance
    assert "certified by gradient-clipping" in c.summary()
    assert {"epsilon", "delta", "sigma", "noisy_steps", "assumptions"} <= set(c.to_dict())


def test_model_clipping_projects_onto_the_c2_ball(setting):
    model, data = setting
    # r = 2 C2 / sigma = 2: six noisy steps; one noise draw has norm about 1e-3 sqrt(219) = 0.015.
    op = ModelClipping(c2=1e-3, noise=1e-3, finetune_steps=0, scope="head", lr=0.01)
    assert op.noisy_steps() == 6
    assert model.net.segmentation_head[0].weight.norm() > 0.5  # far outside the ball
    result = drive(op.run(model, data), quiet=True)
    head = [p for p in result.model.net.segmentation_head.parameters()]
    assert float(torch.sqrt(sum((p.detach() ** 2).sum() for p in head))) < 1e-3 + 0.05
    assert op.certificate(model).achieved_delta <= 1e-5


def test_noise_that_dwarfs_the_parameters_warns_and_names_the_remedy(setting):
    model, data = setting
    op = GradientClipping(c0=0.1, c1=10, lr=1e-3, finetune_steps=0)  # sigma 0.64 on the decoder
    with pytest.warns(UserWarning, match="scope='head'"):
        drive(op.run(model, data), quiet=True)


def test_a_collapsed_model_never_replaces_the_start(setting):
    model, data = setting
    dice = iter([0.9, 0.1, 0.1])
    probe = UnlearnData(data.images, data.coarse, data.split, probe=lambda m: {"dice": next(dice)})
    op = GradientClipping(c0=0.5, c1=1.0, lr=0.1, finetune_steps=0, scope="head")
    result = drive(op.run(model, probe), quiet=True)
    assert result.collapsed and result.model is model and result.rejected is not None
    dice = iter([0.9, 0.1, 0.1])
    op.accept_collapse = True
    result = drive(op.run(model, probe), quiet=True)
    assert result.collapsed and result.model is not model
    np.testing.assert_array_equal(result.start_metrics["dice"], 0.9)
