"""An encoder that sees the lesion and never saw coarse labels (`pretrain-encoder`).

A U-Net is trained whole (scope "all") on the *fine* masks of a synthetic set whose artefacts
are independent of the label (p = 0.5: no shortcut to learn, no coarse mask anywhere), and its
encoder is written on its own (model.save_encoder) with its provenance: the generator's
settings, the masks it learnt, that it saw no coarse labels, and its training record.
`--encoder-checkpoint PATH` starts `train` and `run` from it, frozen, so a certificate over the
decoder can say truthfully that the frozen part never saw the coarse labels.

The pretraining set's seed is offset (SEED_OFFSET) so it never equals a run's synthetic data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .data.synthetic import SynthConfig, generate
from .model import Model, ModelConfig, check_encoder, save_encoder
from .progress import drive
from .training import TrainConfig, train

SEED_OFFSET = 100_000


@dataclass(frozen=True)
class PretrainConfig:
    encoder: str = "mobilenet_v2"  # about 9 MB in float32, half that stored in float16
    n: int = 600  # synthetic images, all used for training (validation held out of them)
    image_size: int = 96
    epochs: int = 30  # at most; early stopping on held-out fine masks
    seed: int = 0
    p: float = 0.5  # P(spurious artefact | malignant): 0.5 is no shortcut
    half: bool = True  # store float16

    def __post_init__(self):
        check_encoder(self.encoder)
        if not 0 <= self.p <= 1 or self.n < 8 or self.epochs < 1:
            raise ValueError("need p in [0, 1], n >= 8 images and epochs >= 1")


def pretrain_encoder(config: PretrainConfig, device="cpu", quiet: bool = False) -> Model:
    """The whole U-Net trained on fine masks of a shortcut-free synthetic set; its provenance
    carries the encoder's (see save)."""
    synth = SynthConfig(
        n=config.n,
        size=config.image_size,
        seed=SEED_OFFSET + config.seed,
        p=config.p,
        test_fraction=0.0,
    )
    data = generate(synth)
    provenance = {
        "data": "synthetic",
        "generator": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(synth).items()},
        "masks": "fine",
        "labels": "benign and malignant lesion classes of the fine masks",
        "saw_coarse_labels": False,
        "images": len(data),
        "scope": "all",
    }
    model_config = ModelConfig(
        encoder=config.encoder,
        image_size=config.image_size,
        seed=config.seed,
        scope="all",
        provenance=provenance,
    )
    model = Model(model_config, device)
    job = train(model, data.images, data.masks, TrainConfig(epochs=config.epochs, seed=config.seed))
    drive(job, desc="pretrain encoder on fine masks", quiet=quiet)
    return model


def save(model: Model, path: str | Path, half: bool = True) -> Path:
    """Write the pretrained model's encoder with its provenance (training record included)."""
    provenance = dict(model.config.provenance)
    provenance["initial_weights"] = provenance.pop("encoder", {}).get("weights", "random")
    return save_encoder(model, path, provenance, half=half)
