import numpy as np
import pytest
import torch

from shortcut_unlearning import masks
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.model import Model, ModelConfig

torch.set_num_threads(2)

TINY = ModelConfig(encoder="resnet18", decoder_channels=(16, 16, 8, 8, 8), image_size=48)
GUI_FIXTURES = {"qtbot", "make_napari_viewer"}


def pytest_collection_modifyitems(items):
    """A test that uses a Qt or napari fixture needs a display: it gets the gui marker."""
    for item in items:
        if GUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gui)


@pytest.fixture(scope="session")
def tiny_data():
    """24 synthetic images at 48 px with their coarse masks."""
    data = generate(n=24, size=48, seed=5, test_fraction=0.25)
    return data, masks.coarse_masks(data.masks)


@pytest.fixture
def tiny_model():
    return Model(TINY)


def state(model):
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def refinement(coarse, fine, images):
    """Refine the first `images` masks to their fine masks."""
    return masks.split_pixels(coarse, {i: fine[i] for i in range(images)})


np.set_printoptions(precision=3)
