"""Encoders that never saw coarse labels: smp's ImageNet weights (download monkeypatched:
nothing downloads here) and pretrain-encoder's checkpoints, with the provenance they carry."""

import json

import pytest
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import save_file

from shortcut_unlearning.cli import main
from shortcut_unlearning.model import Model, ModelConfig, read_encoder_info
from shortcut_unlearning.pretrain import PretrainConfig, pretrain_encoder, save
from shortcut_unlearning.unlearning import make_operator

pytestmark = pytest.mark.filterwarnings("ignore:training did not converge:UserWarning")
SMALL = {"decoder_channels": (16, 16, 8, 8, 8), "image_size": 48}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A mobilenet_v2 encoder pretrained for one epoch on 16 images, stored float16."""
    path = tmp_path_factory.mktemp("enc") / "encoder"
    model = pretrain_encoder(PretrainConfig(n=16, image_size=48, epochs=1), quiet=True)
    save(model, path)
    return path, model


def test_pretrain_encoder_writes_a_small_checkpoint_that_says_what_it_saw(encoder_file):
    path, _ = encoder_file
    info = read_encoder_info(path)
    assert info.encoder == "mobilenet_v2" and info.storage == "float16"
    seen = info.provenance
    assert seen["saw_coarse_labels"] is False and seen["masks"] == "fine"
    assert seen["generator"]["p"] == 0.5 and seen["scope"] == "all"
    assert seen["training"]["epochs_run"] == 1
    # float16 storage: half the float32 encoder (mobilenet_v2: about 2.2 M parameters).
    size = path.with_suffix(".safetensors").stat().st_size
    assert size < 5_000_000


def test_a_model_starts_from_the_checkpoint_cast_back_to_float32(encoder_file):
    path, pretrained = encoder_file
    model = Model(ModelConfig(encoder="mobilenet_v2", seed=3, **SMALL), encoder_checkpoint=path)
    mine, theirs = model.net.encoder.state_dict(), pretrained.net.encoder.state_dict()
    for name, tensor in mine.items():
        assert tensor.dtype == theirs[name].dtype
        torch.testing.assert_close(tensor, theirs[name], rtol=2e-3, atol=2e-3)
    record = model.config.provenance["encoder"]
    assert model.config.encoder_weights == "checkpoint"
    assert record["saw_coarse_labels"] is False and len(record["sha256"]) == 64
    assert record["pretraining"]["masks"] == "fine"
    # A random start says so too.
    plain = Model(ModelConfig(encoder="mobilenet_v2", **SMALL))
    assert plain.config.provenance["encoder"] == {"weights": "random", "saw_coarse_labels": False}


def test_bad_encoder_checkpoints_say_what_to_do(encoder_file, tmp_path):
    path, pretrained = encoder_file
    with pytest.raises(ValueError, match=r"holds a mobilenet_v2 encoder.*--encoder mobilenet_v2"):
        Model(ModelConfig(encoder="resnet18", **SMALL), encoder_checkpoint=path)
    with pytest.raises(FileNotFoundError, match="pretrain-encoder"):
        Model(ModelConfig(encoder="mobilenet_v2", **SMALL), encoder_checkpoint=tmp_path / "none")
    with pytest.raises(ValueError, match="needs the encoder checkpoint"):
        Model(ModelConfig(encoder="mobilenet_v2", encoder_weights="checkpoint", **SMALL))
    whole = tmp_path / "whole"
    pretrained.save(whole)
    with pytest.raises(ValueError, match="whole model: pass it with --model"):
        read_encoder_info(whole)
    info = json.loads(path.with_suffix(".json").read_text())
    silent = tmp_path / "silent"
    save_file(pretrained.net.encoder.state_dict(), silent.with_suffix(".safetensors"))
    del info["provenance"]["saw_coarse_labels"]
    silent.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="saw coarse labels"):
        read_encoder_info(silent)
    broken = tmp_path / "broken"
    state = {k: v.clone() for k, v in pretrained.net.encoder.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][...] = float("nan")
    save_file(state, broken.with_suffix(".safetensors"))
    info["provenance"]["saw_coarse_labels"] = False
    broken.with_suffix(".json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="NaN or infinite"):
        Model(ModelConfig(encoder="mobilenet_v2", **SMALL), encoder_checkpoint=broken)
    del state[first]
    save_file(state, broken.with_suffix(".safetensors"))
    with pytest.raises(ValueError, match="do not fit a mobilenet_v2 encoder"):
        Model(ModelConfig(encoder="mobilenet_v2", **SMALL), encoder_checkpoint=broken)


def test_train_from_the_checkpoint_keeps_it_frozen_and_certifies_it_saw_no_coarse_labels(
    encoder_file, tmp_path, capsys
):
    path, _ = encoder_file
    out = tmp_path / "model"
    flags = ["--data", "synthetic", "--synth-n", "16", "--image-size", "48", "--epochs", "1"]
    assert (
        main(
            [
                "train",
                *flags,
                "--encoder",
                "mobilenet_v2",
                "--encoder-checkpoint",
                str(path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = Model.load(out)  # the whole model: no encoder file needed to load it
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["encoder_weights"] == "checkpoint"
    assert saved["provenance"]["encoder"]["saw_coarse_labels"] is False
    assert saved["provenance"]["scope"] == "decoder"
    torch.testing.assert_close(  # training left the encoder as the checkpoint had it
        model.net.encoder.state_dict(),
        Model(model.config, encoder_checkpoint=path).net.encoder.state_dict(),
    )
    certificate = make_operator("gradient-clipping").certificate(model)
    assert certificate.frozen_saw_coarse_labels is False
    assert (
        main(["train", *flags, "--encoder-checkpoint", str(path), "--out", str(tmp_path / "m2")])
        == 2
    )
    assert "--encoder mobilenet_v2" in capsys.readouterr().err


def test_imagenet_weights_come_from_smp_whose_download_is_replaced_here(monkeypatch, tmp_path):
    reference = smp.encoders.get_encoder("resnet18", weights=None)
    for tensor in reference.state_dict().values():
        if tensor.is_floating_point():
            tensor.uniform_(-0.1, 0.1)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
    (tmp_path / "config.json").write_text("{}")
    asked = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(smp.encoders, "hf_hub_download", fake_download)
    model = Model(ModelConfig(encoder="resnet18", encoder_weights="imagenet", **SMALL))
    assert asked and all("resnet18" in repo for repo, _ in asked)
    mine = model.net.encoder.state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(mine[name], tensor)
    assert model.config.provenance["encoder"] == {"weights": "imagenet", "saw_coarse_labels": False}


def test_imagenet_on_the_command_line_and_names_smp_does_not_have(monkeypatch, tmp_path, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("tests never download")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_network)
    flags = ["--data", "synthetic", "--synth-n", "16", "--image-size", "48", "--epochs", "1"]
    assert (
        main(["train", *flags, "--encoder-weights", "imagenet-21k", "--out", str(tmp_path / "m")])
        == 2
    )
    err = capsys.readouterr().err
    assert "no 'imagenet-21k' weights for resnet18" in err and "imagenet" in err
    assert (
        main(
            [
                "run",
                *flags,
                "--encoder-weights",
                "imagenet",
                "--encoder-checkpoint",
                "x",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "exclude each other" in capsys.readouterr().err

    class Reached(Exception):
        pass

    def train_model(images, targets, config, *args, **kwargs):
        raise Reached(config.encoder_weights)

    monkeypatch.setattr("shortcut_unlearning.experiment.train_model", train_model)
    # The flag reaches training (where the stand-in raises: an unexpected error, exit 1).
    args = ["run", *flags, "--encoder-weights", "imagenet", "--out", str(tmp_path / "r2")]
    assert main(args) == 1
    assert "unexpected Reached: imagenet" in capsys.readouterr().err


def test_the_encoder_line_says_where_the_weights_came_from(encoder_file, tmp_path):
    from shortcut_unlearning.model import encoder_origin

    path, _ = encoder_file
    pretrained = Model(ModelConfig(encoder="mobilenet_v2", **SMALL), encoder_checkpoint=path)
    line = encoder_origin(pretrained.config)
    assert line.startswith("Encoder: mobilenet_v2 (frozen), pretrained; never saw")
    assert line.endswith("never saw the coarse labels")
    assert "random weights; never saw" in encoder_origin(Model(ModelConfig(**SMALL)).config)
    whole = Model(ModelConfig(scope="all", **SMALL)).config
    assert encoder_origin(whole) == "Encoder: resnet18, trained with the rest on this model's masks"
    unknown = ModelConfig(**SMALL)  # a checkpoint from elsewhere: no provenance
    assert encoder_origin(unknown).endswith("not known whether it saw the coarse labels")


def test_the_plugin_preview_names_the_sample_models_pretrained_encoder():
    from shortcut_unlearning.settings import OperatorSettings
    from shortcut_unlearning.workbench import Workbench

    bench = Workbench(parameters=OperatorSettings(device="cpu"))  # the shipped sample model
    bench.current_model()
    assert "mobilenet_v2 (frozen), pretrained; never saw the coarse labels" in bench.preview().plain
