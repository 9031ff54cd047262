"""Saliency maps, inpainting and the counterfactual artefact test (docs/method.md,
"Saliency")."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from shortcut_unlearning.model import Model, ModelConfig
from shortcut_unlearning.saliency import (
    counterfactual_drop,
    inpaint_background,
    normalise_maps,
    region_logit_sum,
    saliency_maps,
    saliency_share,
)

SKIN = (210, 160, 140)
VIOLET = (140, 40, 200)


@pytest.fixture(scope="module")
def model():
    return Model(ModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), image_size=64))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def skin_with_square(n=1, size=32, square=slice(12, 20)):
    """Uniform skin images with a violet square; returns the images and the square's mask."""
    images = np.empty((n, size, size, 3), np.uint8)
    images[:] = SKIN
    masks = np.zeros((n, size, size), bool)
    masks[:, square, square] = True
    images[masks] = VIOLET
    return images, masks


class FakeModel:
    """Just the Model interface saliency.py uses, around a hand-built net."""

    def __init__(self, net: torch.nn.Module):
        self.net, self.device = net, torch.device("cpu")

    def to_input(self, images):
        return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255

    def autocast(self):
        return nullcontext()

    @torch.no_grad()
    def probabilities(self, images):
        return torch.softmax(self.net(self.to_input(images)), 1).numpy()


class PixelNet(torch.nn.Module):
    """Per-pixel logits: classes 0 and 1 are 0; class 2 is (w . rgb) times a fixed pixel gate."""

    def __init__(self, w, gate):
        super().__init__()
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("gate", torch.as_tensor(gate, dtype=torch.float32))

    def forward(self, x):
        malignant = (x * self.w).sum(1) * self.gate
        zero = torch.zeros_like(malignant)
        return torch.stack([zero, zero, malignant], 1)


# --- saliency_maps -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "gradcam"])
def test_maps_have_image_shape_and_are_finite_non_negative(model, images, method):
    options = {"nt_samples": 2} if method == "smoothgrad" else {}
    maps = saliency_maps(model, images, method=method, batch_size=1, **options)
    assert maps.shape == (2, 32, 32)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert (maps >= 0).all()
    assert maps.max() > 0


def test_unknown_method_is_refused(model, images):
    with pytest.raises(ValueError, match="gradcam"):
        saliency_maps(model, images, method="guided_backprop")


def test_model_flags_are_left_as_they_were(model, images):
    model.train_mode()  # mixed flags: the frozen encoder in eval, the decoder training
    training = {name: m.training for name, m in model.net.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.net.named_parameters()}
    assert len(set(training.values())) == 2 and len(set(requires_grad.values())) == 2
    for method in ("saliency", "gradcam"):
        saliency_maps(model, images[:1], method=method)
    assert {name: m.training for name, m in model.net.named_modules()} == training
    assert {name: p.requires_grad for name, p in model.net.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.net.parameters())
    model.net.eval()


def test_saliency_lies_on_the_pixels_the_logit_depends_on():
    gate = np.zeros((32, 32), np.float32)
    gate[4:10, 20:28] = 1
    fake = FakeModel(PixelNet([1.0, -2.0, 0.5], gate))
    image = np.full((1, 32, 32, 3), 128, np.uint8)
    # The gate is the only place class 2 is predicted, so it is also the default region.
    maps = saliency_maps(fake, image)[0]
    assert (maps[gate == 1] > 0).all()
    assert (maps[gate == 0] == 0).all()
    # Gradients are taken with respect to the model's input: the largest abs colour weight.
    np.testing.assert_allclose(maps[gate == 1], 2.0)


def test_saliency_stays_in_the_given_region():
    fake = FakeModel(PixelNet([1.0, 1.0, 1.0], np.ones((32, 32), np.float32)))
    region = np.zeros((2, 32, 32), bool)
    region[0, :, :16] = True
    region[1, 8:12, 8:12] = True
    images = np.full((2, 32, 32, 3), 100, np.uint8)
    for method, options in [("saliency", {}), ("smoothgrad", {"nt_samples": 3})]:
        maps = saliency_maps(fake, images, method=method, region=region, **options)
        assert (maps[region] > 0).all(), method
        assert (maps[~region] == 0).all(), method


def test_region_logit_sum_sums_class_k_over_the_region():
    fake = FakeModel(PixelNet([1.0, 0.0, 0.0], np.ones((4, 4), np.float32)))
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, :2, :] = True  # 8 pixels
    x = torch.full((1, 3, 4, 4), 0.5)
    assert region_logit_sum(fake.net, region, 2)(x).tolist() == [4.0]
    assert region_logit_sum(fake.net, region, 0)(x).tolist() == [0.0]


def test_normalise_maps_shares_one_scale():
    before = np.array([[[0.0, 2.0], [4.0, 4.0]]])
    scaled, vmax = normalise_maps(before, vmax=4.0)
    np.testing.assert_allclose(scaled, [[[0, 0.5], [1, 1]]])
    after, _ = normalise_maps(before / 2, vmax)
    np.testing.assert_allclose(after, [[[0, 0.25], [0.5, 0.5]]])
    auto, auto_vmax = normalise_maps(before)
    assert 3.9 < auto_vmax <= 4.0 and auto.max() == 1 and auto.min() == 0
    zeros, _ = normalise_maps(np.zeros((1, 2, 2)))
    assert (zeros == 0).all()


# --- inpainting and the counterfactual ---------------------------------------------------------


def test_inpainting_fills_the_artefact_with_skin_and_nothing_else():
    images, masks = skin_with_square(n=2)
    images[1] = SKIN  # no artefact in the second image
    masks[1] = False
    original = images.copy()
    out = inpaint_background(images, masks)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, original)  # input untouched
    np.testing.assert_array_equal(out[~masks], images[~masks])  # unmasked pixels exact
    assert np.abs(out[masks].astype(int) - SKIN).max() <= 2  # violet became skin


def test_removing_a_violet_artefact_lowers_the_score():
    # Class 2 rises with violetness (red + blue - 2 green): the fake model's shortcut.
    fake = FakeModel(PixelNet([4.0, -8.0, 4.0], np.ones((32, 32), np.float32)))
    images, masks = skin_with_square(n=2)
    result = counterfactual_drop(fake, images, masks)
    assert result["drop"].shape == (2,)
    assert (result["drop"] > 0).all()
    np.testing.assert_allclose(result["drop"], result["score"] - result["score_inpainted"])
    assert result["mean_drop"] == pytest.approx(result["drop"].mean())
    assert result["n_images"] == 2


def test_empty_masks_give_no_drop():
    fake = FakeModel(PixelNet([4.0, -8.0, 4.0], np.ones((32, 32), np.float32)))
    images, masks = skin_with_square(n=2)
    result = counterfactual_drop(fake, images, np.zeros_like(masks))
    np.testing.assert_array_equal(result["drop"], 0)
    assert np.isnan(result["mean_drop"])
    assert result["n_images"] == 0


def test_saliency_share_on_hand_cases():
    maps = np.zeros((3, 2, 2))
    maps[0] = [[1, 1], [1, 1]]
    maps[1] = [[3, 0], [0, 1]]
    masks = np.zeros((3, 2, 2), bool)
    masks[:, 0, 0] = True
    np.testing.assert_allclose(saliency_share(maps, masks), [0.25, 0.75, 0.0])
