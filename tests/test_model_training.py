import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, same_state

from shortcut_unlearning.model import FrozenInputs, Model, resolve_device
from shortcut_unlearning.progress import Cancel, Cancelled, drive
from shortcut_unlearning.training import TrainConfig, train


def test_scope_freezes_everything_else():
    model = Model(TINY)
    grads = {n.split(".")[0]: p.requires_grad for n, p in model.net.named_parameters()}
    assert grads == {"encoder": False, "decoder": True, "segmentation_head": True}
    model.set_scope("head")
    assert all(n.startswith("segmentation_head") for n in model.scoped_named_parameters())
    model.set_scope("all")
    assert len(model.scoped_parameters()) == len(list(model.net.parameters()))
    with pytest.raises(ValueError, match="scope must be one of"):
        Model(TINY.__class__(scope="encoder"))


@pytest.mark.parametrize("scope", ["decoder", "head", "all"])
def test_scoped_forward_of_frozen_features_equals_the_full_forward(tiny_data, scope):
    data, _ = tiny_data
    model = Model(TINY)
    model.set_scope(scope)
    model.net.eval()
    x = model.to_input(data.images[:3])
    with torch.no_grad():
        np.testing.assert_allclose(
            model.scoped_forward(model.frozen_features(x)).numpy(),
            model.net(x).numpy(),
            rtol=1e-5,
            atol=1e-5,
        )


def test_cached_and_plain_training_take_the_same_steps(tiny_data):
    data, coarse = tiny_data
    losses = []
    for cache in (True, False):
        model = Model(TINY)
        config = TrainConfig(epochs=1, batch_size=6, seed=1, cache_features=cache)
        losses.append(
            [e.losses["loss"] for e in _events(train(model, data.images, coarse, config))]
        )
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def _events(job):
    events = []
    try:
        while True:
            events.append(next(job))
    except StopIteration:
        return events


def test_training_lowers_the_loss_and_leaves_the_frozen_encoder(tiny_data):
    data, coarse = tiny_data
    model = Model(TINY)
    encoder_before = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    events = _events(train(model, data.images, coarse, TrainConfig(epochs=6, batch_size=8)))
    first, last = np.mean([e.losses["loss"] for e in events[:3]]), events[-1].losses["loss"]
    assert last < 0.8 * first
    assert events[-1].step == events[-1].total == 18
    assert same_state(encoder_before, model.net.encoder.state_dict())


def test_cancel_and_nan_stop_training(tiny_data, monkeypatch):
    data, coarse = tiny_data
    cancel = Cancel()
    cancel.set()
    with pytest.raises(Cancelled):
        drive(train(Model(TINY), data.images, coarse, cancel=cancel), quiet=True)
    model = Model(TINY)
    forward = model.scoped_forward
    monkeypatch.setattr(model, "scoped_forward", lambda f: forward(f) * np.nan)
    with pytest.raises(FloatingPointError, match="became nan at step 1; lower the learning rate"):
        drive(train(model, data.images[:6], coarse[:6], TrainConfig(val_fraction=0)), quiet=True)
    with pytest.raises(ValueError, match="do not match"):
        drive(train(model, data.images, coarse[:3]), quiet=True)


def test_checkpoint_round_trip_without_pickle(tiny_data, tmp_path):
    data, _ = tiny_data
    model = Model(TINY)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = model.save(tmp_path / "m")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded = Model.load(tmp_path / "m")
    assert loaded.config == model.config
    np.testing.assert_allclose(
        loaded.probabilities(data.images[:2]), model.probabilities(data.images[:2]), atol=1e-6
    )
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["encoder"] == "resnet18" and info["scope"] == "decoder"


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    Model(TINY).save(tmp_path / "m")
    (tmp_path / "m.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged"):
        Model.load(tmp_path / "m")
    (tmp_path / "m.json").unlink()
    with pytest.raises(FileNotFoundError, match="json config beside it"):
        Model.load(tmp_path / "m")


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_frozen_inputs_cache_matches_computation(tiny_data):
    data, _ = tiny_data
    model = Model(TINY)
    cached, plain = (
        FrozenInputs(model, data.images[:5]),
        FrozenInputs(model, data.images[:5], False),
    )
    index = np.array([4, 0, 2])
    for a, b in zip(cached[index], plain[index], strict=True):
        torch.testing.assert_close(a, b)


def test_uncached_inputs_leave_the_scopes_mode_alone(tiny_data):
    """Computing the frozen part per batch puts that part in eval mode and nothing else: an
    evaluation's scope stays in eval mode (no batch statistics, no running-statistics update),
    a loop's frozen batch norms stay frozen."""
    data, _ = tiny_data
    model = Model(TINY)
    plain = FrozenInputs(model, data.images[:5], False)
    scope_norms = [m for m in model.net.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert scope_norms
    before = [m.running_mean.clone() for m in scope_norms]
    model.net.train()  # the encoder too: the uncached inputs must put it in eval mode
    model.net.decoder.eval()
    model.net.segmentation_head.eval()
    plain[np.array([0, 1])]
    assert not model.net.encoder.training and not model.net.decoder.training
    model.train_mode(batch_statistics=False)
    with torch.no_grad():
        model.scoped_forward(plain[np.array([2, 3])])
    assert model.net.decoder.training and not any(m.training for m in scope_norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(scope_norms, before, strict=True))


def test_training_stops_on_a_validation_plateau_and_says_it_did_not_converge(
    tiny_data, monkeypatch
):
    from shortcut_unlearning import training

    data, coarse = tiny_data
    curve = iter([0.30, 0.40, 0.35, 0.20, 0.40, 0.10, 0.90, 0.90])  # best at epoch 2
    monkeypatch.setattr(
        training,
        "validation_scores",
        lambda *_: dict.fromkeys(("val_dice", "val_class_dice"), next(curve)),
    )
    model = Model(TINY)
    config = TrainConfig(epochs=20, batch_size=8, patience=3)
    with pytest.warns(UserWarning, match="did not converge"):
        events = _events(train(model, data.images, coarse, config))
    record = model.config.provenance["training"]
    assert record["best_epoch"] == 2 and record["epochs_run"] == 5  # 2 + patience
    assert record["stopped_early"] and record["converged"] is False
    assert record["val_dice"] == 0.40 and record["val_images"] == round(0.15 * len(data))
    validated = [e.metrics["val_dice"] for e in events if e.metrics]
    assert validated == [0.30, 0.40, 0.35, 0.20, 0.40]


def test_training_keeps_the_best_epoch_on_its_held_out_images(tiny_data):
    from shortcut_unlearning import metrics
    from shortcut_unlearning.training import validation_split

    data, coarse = tiny_data
    model = Model(TINY)
    config = TrainConfig(epochs=6, batch_size=8, lr=3e-3, seed=4, min_val_dice=0.0)
    events = _events(train(model, data.images, coarse, config))
    record = model.config.provenance["training"]
    assert record["converged"] is True and record["val_source"].startswith("held out")
    # The best epoch is the one with the best class-aware Dice.
    curve = [e.metrics for e in events if e.metrics]
    best = int(np.argmax([m["val_class_dice"] for m in curve]))
    assert record["best_epoch"] == 1 + best
    assert record["val_class_dice"] == curve[best]["val_class_dice"]
    assert record["val_dice"] == curve[best]["val_dice"]
    _, held = validation_split(len(data), config.val_fraction, config.seed)
    dice = metrics.dice(model.probabilities(data.images[held]), coarse[held])
    assert dice == pytest.approx(record["val_dice"], abs=1e-3)  # the best weights came back


def test_training_takes_a_given_validation_set_and_all_training_images(tiny_data):
    data, coarse = tiny_data
    model = Model(TINY)
    config = TrainConfig(epochs=2, batch_size=8, min_val_dice=0.0)
    events = _events(
        train(model, data.images[:16], coarse[:16], config, val=(data.images[16:], coarse[16:]))
    )
    assert events[-1].total == 2 * 2  # 16 training images in batches of 8, for 2 epochs
    record = model.config.provenance["training"]
    assert record["val_source"] == "validation split" and record["val_images"] == 8
    unchecked = Model(TINY)
    _events(train(unchecked, data.images, coarse, TrainConfig(epochs=1, val_fraction=0)))
    assert unchecked.config.provenance["training"]["converged"] is None
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_cached_and_plain_training_validate_alike(tiny_data):
    data, coarse = tiny_data
    curves = []
    for cache in (True, False):
        model = Model(TINY)
        config = TrainConfig(epochs=2, batch_size=6, seed=1, cache_features=cache)
        events = _events(train(model, data.images, coarse, config))
        curves.append(
            [[e.metrics["val_dice"], e.metrics["val_class_dice"]] for e in events if e.metrics]
        )
    np.testing.assert_allclose(curves[0], curves[1], atol=1e-3)


def test_soft_dice_loss():
    from shortcut_unlearning.training import IGNORE, soft_dice_loss

    targets = torch.zeros(2, 8, 8, dtype=torch.long)
    targets[0, :4, :4] = 2
    perfect = 50.0 * F.one_hot(targets, 3).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, targets).item() == pytest.approx(0, abs=1e-3)
    # Every lesion pixel called benign: the malignant class (the only one present) scores 0.
    flipped = 50.0 * F.one_hot(torch.where(targets == 2, 1, 0), 3).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(flipped, targets).item() == pytest.approx(1, abs=0.1)
    # Ignored pixels do not count, and a batch without lesions gives 0.
    ignored = torch.where(targets == 2, IGNORE, targets)
    assert soft_dice_loss(flipped, ignored).item() == 0
