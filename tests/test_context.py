"""The context term (unlearning/context.py): counterfactuals of the refined images, and the
terms every operator can add with them."""

import numpy as np
import pytest
import torch
from conftest import TINY, refinement, same_state, state

from shortcut_unlearning import metrics
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.training import TrainConfig, train
from shortcut_unlearning.unlearning import CERTIFIED, OPERATORS, UnlearnData, make_operator
from shortcut_unlearning.unlearning.context import consistency_loss, counterfactuals

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning"),
    pytest.mark.filterwarnings("ignore:training did not converge:UserWarning"),
]
REFINED = 6


@pytest.fixture(scope="module")
def data(tiny_data):
    images, coarse = tiny_data[0].images, tiny_data[1]
    return UnlearnData(images, coarse, refinement(coarse, tiny_data[0].masks, REFINED))


@pytest.fixture(scope="module")
def coarse_model(data):
    model = Model(TINY)
    drive(train(model, data.images, data.coarse, TrainConfig(epochs=8, batch_size=8)), quiet=True)
    return model


def test_counterfactuals_paint_only_the_forget_pixels_with_skin(tiny_data, data):
    fine = tiny_data[0].masks[:REFINED]
    forget, images = data.split.forget[:REFINED], data.images[:REFINED]
    out = counterfactuals(images, forget, data.split.targets[:REFINED])
    assert forget.any()
    np.testing.assert_array_equal(out[~forget], images[~forget])  # lesion and skin untouched
    assert not np.array_equal(out[forget], images[forget])
    # The fill comes from the skin: closer to the skin's colour than to the lesion's.
    skin = images[(fine == 0) & ~forget].reshape(-1, 3).mean(0)
    lesion = images[fine != 0].reshape(-1, 3).mean(0)
    filled = out[forget].reshape(-1, 3).astype(float).mean(0)
    assert np.linalg.norm(filled - skin) < np.linalg.norm(filled - lesion)


def test_consistency_is_a_kl_divergence_towards_the_fixed_counterfactual():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert consistency_loss(a, a.detach().clone()).item() == pytest.approx(0, abs=1e-6)
    loss = consistency_loss(a, b)
    p, q = b.softmax(1), a.softmax(1)
    by_hand = (p * (p.log() - q.log())).sum(1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad is None  # the counterfactual is the fixed target


@pytest.mark.parametrize("name", sorted(set(OPERATORS) - set(CERTIFIED)))
def test_every_uncertified_operator_takes_the_context_term(name, data):
    start = Model(TINY)
    before = state(start)
    op = make_operator(name, steps=3, batch_size=4, context="blind+consistent")
    result = drive(op.run(start, data), quiet=True)
    assert same_state(before, state(start))
    assert all("context" in e.losses and np.isfinite(e.losses["context"]) for e in result.history)
    assert not same_state(before, state(result.model))


def test_a_context_setting_outside_the_list_is_refused():
    with pytest.raises(ValueError, match="context must be one of"):
        make_operator("neggrad-seg", context="inpaint")
    with pytest.raises(ValueError, match="context_weight at least 0"):
        make_operator("finetune", context="blind", context_weight=-1)


def test_run_takes_the_context_term_from_the_command_line():
    from shortcut_unlearning.cli import UsageError, _run_config, build_parser
    from shortcut_unlearning.experiment import build_operator

    parser = build_parser()
    for argv, expected in ((["run"], "off"), (["run", "--context", "blind"], "blind")):
        config = _run_config(parser.parse_args(argv))
        assert build_operator(config).context == expected
    with pytest.raises(UsageError, match="invalid choice: 'inpaint'"):
        parser.parse_args(["run", "--context", "inpaint"])
    # It inpaints at the forget positions, so a certified operator refuses it.
    for method in CERTIFIED:
        config = _run_config(parser.parse_args(["run", "--method", method, "--context", "blind"]))
        with pytest.raises(ValueError, match="reads the forget set"):
            build_operator(config)


def _counterfactual_gap(model, data) -> float:
    """Mean |malignancy score change| of the refined images when their forget pixels are
    inpainted: band reliance on the images unlearning saw."""
    index = np.arange(REFINED)
    images = data.images[index]
    twins = counterfactuals(images, data.split.forget[index], data.split.targets[index])
    before = metrics.image_scores(model.probabilities(images))
    after = metrics.image_scores(model.probabilities(twins))
    return float(np.abs(after - before).mean())


def test_the_consistency_term_shrinks_what_the_forget_pixels_do_to_the_score(coarse_model, data):
    gaps = {}
    for context in ("off", "consistent"):
        op = make_operator(
            "neggrad-seg", steps=30, lr=1e-3, seed=0, context=context, context_weight=10
        )
        unlearned = drive(op.run(coarse_model, data), quiet=True).model
        gaps[context] = _counterfactual_gap(unlearned, data)
    assert gaps["consistent"] < 0.5 * gaps["off"], gaps
