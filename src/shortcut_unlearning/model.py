"""The segmentation model: an smp U-Net with a frozen part and a trainable scope.

The *scope* is what training and unlearning update (METHOD 5): "decoder" (decoder and head,
the default), "head", or "all"; the rest is frozen. Everything below the scope is a fixed
function of the image, so its output can be computed once per image and cached
(`frozen_features`), and the scope trained on the cache (`scoped_forward`).

Checkpoints are safetensors weights plus a JSON config beside them; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file, save_file

SCOPES = ("decoder", "head", "all")
# The U-Net's top-level blocks that each scope trains.
SCOPE_MODULES = {
    "all": ("encoder", "decoder", "segmentation_head"),
    "decoder": ("decoder", "segmentation_head"),
    "head": ("segmentation_head",),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "shortcut-unlearning-model", 1
# A few of segmentation_models_pytorch's encoders, named when an unknown one is asked for.
ENCODER_EXAMPLES = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2")
MIN_IMAGE_SIZE = 32  # the U-Net halves the image five times: 32 px leave one pixel


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved beside its weights."""

    encoder: str = "resnet18"
    encoder_weights: str | None = None  # "imagenet" needs the network; never in tests or CI
    decoder_channels: tuple[int, ...] = (64, 32, 16, 16, 8)  # small: trains on a CPU
    classes: int = 3
    scope: str = "decoder"
    image_size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int = 0  # initialises the weights (the frozen encoder too, when not pretrained)
    provenance: dict = field(default_factory=dict, compare=False)  # data, masks, training

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if len(self.decoder_channels) != 5:
            raise ValueError("decoder_channels needs 5 entries, one per U-Net decoder block")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; a named device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but it is not available; use 'auto' or 'cpu'")
    return device


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`. On CUDA the copy goes through pinned memory and
    does not block, so a step that moves its batch indices never waits for the GPU."""
    tensor = torch.as_tensor(np.asarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether data of `nbytes` may stay on a CUDA device: at most a quarter of its free
    memory. Elsewhere the data already lives where the model runs."""
    return device.type == "cuda" and nbytes <= torch.cuda.mem_get_info(device)[0] // 4


class Model:
    """An smp U-Net, its config, and the device it runs on.

    On CUDA it runs in bf16 autocast with channels-last memory (`fast_paths`); turning them
    off gives the plain fp32 loop that benchmarks compare against.
    """

    def __init__(self, config: ModelConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or ModelConfig()
        torch.manual_seed(self.config.seed)
        self.net = smp.Unet(
            self.config.encoder,
            encoder_weights=self.config.encoder_weights,
            classes=self.config.classes,
            decoder_channels=self.config.decoder_channels,
        )
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.fast_paths = True
        self.to(self.device)
        self.set_scope(self.config.scope)

    def use_fast_paths(self, enabled: bool) -> None:
        """bf16 autocast and channels-last memory on CUDA (on by default); no effect elsewhere."""
        self.fast_paths = enabled
        self.to(self.device)

    @property
    def _fast(self) -> bool:
        return self.fast_paths and self.device.type == "cuda"

    # -- scope ------------------------------------------------------------------------------
    def set_scope(self, scope: str) -> None:
        """Make `scope` trainable and freeze the rest."""
        self.config = replace(self.config, scope=scope)
        trainable = SCOPE_MODULES[scope]
        for name, module in self.net.named_children():
            module.requires_grad_(name in trainable)

    def scoped_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def scoped_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def train_mode(self, batch_statistics: bool = True) -> None:
        """Train mode for the scope only: frozen blocks keep their batch-norm statistics, and
        so does the scope with batch_statistics=False."""
        self.net.eval()
        for name in SCOPE_MODULES[self.config.scope]:
            getattr(self.net, name).train()
        if not batch_statistics:
            for module in self.net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    # -- forward ----------------------------------------------------------------------------
    def to_input(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) images (an array, or a tensor on the model's device) ->
        normalised float (N, 3, H, W) on the model's device."""
        if not isinstance(images, torch.Tensor):
            images = to_device(np.ascontiguousarray(images), self.device)
        x = images.permute(0, 3, 1, 2).float() / 255
        mean = to_device(np.array(self.config.mean, np.float32), self.device).view(1, 3, 1, 1)
        std = to_device(np.array(self.config.std, np.float32), self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self._fast:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        """bf16 autocast on CUDA (unless fast paths are off); a no-op elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._fast)

    def frozen_features(self, x: torch.Tensor):
        """Output of the frozen part for normalised input x: what the scope takes in."""
        scope = self.config.scope
        if scope == "all":
            return x
        features = self.net.encoder(x)
        if scope == "decoder":
            return features
        return self.net.decoder(features)

    def scoped_forward(self, frozen) -> torch.Tensor:
        """Logits from the frozen part's output (see frozen_features)."""
        scope = self.config.scope
        if scope == "all":
            return self.net(frozen)
        decoded = self.net.decoder(frozen) if scope == "decoder" else frozen
        return self.net.segmentation_head(decoded)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities (N, K, H, W) float32 for uint8 (N, H, W, 3) images."""
        self.net.eval()
        out = []
        for start in range(0, len(images), batch_size):
            with self.autocast():
                logits = self.net(self.to_input(images[start : start + batch_size]))
            out.append(torch.softmax(logits.float(), 1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.classes, 1, 1), "f4")

    # -- copies and files -------------------------------------------------------------------
    def copy(self) -> Model:
        """An independent copy (weights, config, device)."""
        twin = copy.copy(self)
        twin.net = copy.deepcopy(self.net)
        return twin

    def to(self, device: str | torch.device) -> Model:
        self.device = resolve_device(device) if isinstance(device, str) else device
        layout = torch.channels_last if self._fast else torch.contiguous_format
        self.net.to(self.device, memory_format=layout)
        return self

    def parameter_norm(self) -> float:
        """L2 norm of the scoped parameters, all concatenated."""
        with torch.no_grad():
            return float(torch.sqrt(sum((p.float() ** 2).sum() for p in self.scoped_parameters())))

    def save(self, path: str | Path) -> Path:
        """Write PATH.safetensors and PATH.json; returns the weights path."""
        weights, sidecar = checkpoint_paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, weights)
        info = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **asdict(self.config)}
        sidecar.write_text(json.dumps(info, indent=2) + "\n")
        return weights

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Model:
        """Read a checkpoint written by save (safetensors + JSON; never a pickle).

        Every failure is a ValueError (or FileNotFoundError) that names the checkpoint.
        """
        config = read_config(path)
        weights, _ = checkpoint_paths(path)
        # Pretrained weights come from the checkpoint itself, never from a hub.
        model = cls(replace(config, encoder_weights=None), device)
        model.config = config
        try:
            state = load_file(weights, device=str(model.device))
        except Exception as err:  # safetensors raises its own error types for broken files
            raise ValueError(f"cannot read weights {weights} ({err}); the file is damaged") from err
        broken = [
            name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()
        ]
        if broken:
            raise ValueError(
                f"checkpoint {weights} holds NaN or infinite weights ({broken[0]}"
                f"{' and others' if len(broken) > 1 else ''}); the training that wrote it "
                "diverged: retrain it or use another checkpoint"
            )
        try:
            model.net.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ValueError(
                f"the weights in {weights} do not fit the {config.encoder} U-Net its config "
                f"describes ({first[:200]}); the two files belong to different models"
            ) from err
        return model


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) of the checkpoint PATH: PATH.safetensors and PATH.json.

    A trailing .safetensors or .json is the checkpoint's own; any other suffix is part of the
    name, so "model.v2" gives model.v2.safetensors and model.v2.json.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"


def check_encoder(name) -> str:
    """`name` if segmentation_models_pytorch knows the encoder, else ValueError naming a few."""
    names = smp.encoders.get_encoder_names()
    if not isinstance(name, str) or not (name in names or name.startswith("tu-")):
        examples = ", ".join(e for e in ENCODER_EXAMPLES if e in names)
        raise ValueError(
            f"unknown encoder {name!r}; choose one of segmentation_models_pytorch's "
            f"{len(names)} encoders, e.g. {examples}"
        )
    return name


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig in a checkpoint's JSON sidecar, checked key by key.

    A sidecar that is not an object, misses or adds keys, names an unknown encoder or holds a
    normalisation that cannot be used raises ValueError naming the file.
    """
    weights, sidecar = checkpoint_paths(path)
    for needed in (weights, sidecar):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} is missing; a checkpoint is a .safetensors file with its .json "
                "config beside it, as written by Model.save"
            )
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar} is not valid JSON ({err}); restore it from the model") from err
    if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{sidecar} is not a shortcut-unlearning model config (it should be a JSON object "
            f"with format {CHECKPOINT_FORMAT!r}); pass a checkpoint written by this tool"
        )
    version = info.pop("version", None)
    if version != CHECKPOINT_VERSION:
        raise ValueError(
            f"{sidecar} has version {version!r}, but this tool reads version "
            f"{CHECKPOINT_VERSION}; "
            + ("update shortcut-unlearning" if isinstance(version, int) else "re-save the model")
        )
    info.pop("format")
    expected = {f.name for f in fields(ModelConfig)}
    missing, extra = sorted(expected - set(info)), sorted(set(info) - expected)
    if missing or extra:
        raise ValueError(
            f"{sidecar} "
            + " and ".join(
                part
                for part in (
                    missing and f"lacks the keys {missing}",
                    extra and f"has the unknown keys {extra}",
                )
                if part
            )
            + "; it describes another model or architecture: use a checkpoint written by this tool"
        )
    try:
        config = ModelConfig(
            **{**info, **{k: tuple(info[k]) for k in ("decoder_channels", "mean", "std")}}
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{sidecar} holds an unusable config ({err}); re-save the model") from err
    check_encoder(config.encoder)
    numbers = (*config.mean, *config.std, *config.decoder_channels, config.image_size)
    usable = (
        all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
        and len(config.mean) == len(config.std) == 3
        and min(config.std) > 0
        and config.classes == 3
        and isinstance(config.image_size, int)
        and config.image_size >= MIN_IMAGE_SIZE
        and all(isinstance(c, int) and c > 0 for c in config.decoder_channels)
        and isinstance(config.seed, int)
        and isinstance(config.provenance, dict)
        and isinstance(config.encoder_weights, (str, type(None)))
    )
    if not usable:
        raise ValueError(
            f"checkpoint {sidecar} holds an unusable config (mean {list(config.mean)}, std "
            f"{list(config.std)}, classes {config.classes}, image size {config.image_size}, "
            f"decoder {list(config.decoder_channels)}, seed {config.seed!r}): the std must be "
            "positive, every number finite; restore the file or re-save the model"
        )
    return config


class FrozenInputs:
    """What the scope takes in, for a set of images: cached once, or computed per batch.

    With a frozen encoder the cache turns every training step into a decoder-only step.
    Uncached images stay on a CUDA device when they fit, so a step copies nothing to it.
    Indexing with an array of image indices gives that batch's input to scoped_forward.
    """

    def __init__(self, model: Model, images: np.ndarray, cache: bool = True, batch_size: int = 32):
        self.model, self.images, self.cache = model, images, None
        if cache:
            parts = [
                self._compute(np.arange(s, min(s + batch_size, len(images))))
                for s in range(0, len(images), batch_size)
            ]
            self.cache = _concat(parts)
        elif fits_on_device(images.nbytes, model.device):
            self.images = torch.as_tensor(images).to(model.device)

    @torch.no_grad()
    def _compute(self, index: np.ndarray):
        if isinstance(self.images, torch.Tensor):
            batch = self.images[to_device(index, self.model.device)]
        else:
            batch = self.images[index]
        self.model.train_mode()  # the frozen part runs in eval mode, as during training
        with self.model.autocast():
            return self.model.frozen_features(self.model.to_input(batch))

    def __getitem__(self, index: np.ndarray):
        if self.cache is None:
            return self._compute(index)
        at = to_device(index, self.model.device)
        if isinstance(self.cache, torch.Tensor):
            return self.cache[at]
        return [f[at] for f in self.cache]


def _concat(parts):
    """Concatenate batches of frozen outputs (tensors, or lists of tensors per level)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [torch.cat(level) for level in zip(*parts, strict=True)]
