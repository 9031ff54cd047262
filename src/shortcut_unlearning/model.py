"""The segmentation model: an smp U-Net with a frozen part and a trainable scope.

The *scope* is what training and unlearning update (docs/method.md, "Unlearning
operators"): "decoder" (decoder and head,
the default), "head", or "all"; the rest is frozen. Everything below the scope is a fixed
function of the image, so its output can be computed once per image and cached
(`frozen_features`), and the scope trained on the cache (`scoped_forward`).

Checkpoints are safetensors weights plus a JSON config beside them; nothing is unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Literal, cast, get_args

import numpy as np
import segmentation_models_pytorch as smp
import torch
from pydantic import AfterValidator, ConfigDict, Field, JsonValue, Strict, with_config
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from typing_extensions import NotRequired, TypedDict

from .files import json_ready, write_files
from .schemas import (
    Count,
    Flag,
    Float,
    InputError,
    Scope,
    Seed,
    Share,
    Text,
    Whole,
    check_header,
    read_json,
    validate,
)

SCOPES: tuple[str, ...] = get_args(Scope)
# The U-Net's top-level blocks that each scope trains.
SCOPE_MODULES = {
    "all": ("encoder", "decoder", "segmentation_head"),
    "decoder": ("decoder", "segmentation_head"),
    "head": ("segmentation_head",),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "shortcut-unlearning-model", 1
# An encoder on its own (pretrain-encoder): safetensors weights and a JSON sidecar whose
# provenance says what the encoder saw.
ENCODER_FORMAT, ENCODER_VERSION = "shortcut-unlearning-encoder", 1
# encoder_weights of a model whose encoder came from an encoder checkpoint (its provenance
# records which one); other values are segmentation_models_pytorch's weight names.
FROM_CHECKPOINT = "checkpoint"
# A few of segmentation_models_pytorch's encoders, named when an unknown one is asked for.
ENCODER_EXAMPLES = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2")
MIN_IMAGE_SIZE = 32  # the U-Net halves the image five times: 32 px leave one pixel
# A working size above this does not fit in memory for a set of images: a 4096 px image is
# 48 MiB as uint8 and 192 MiB as the model's float input, before any activation.
MAX_IMAGE_SIZE = 4096


def frozen_provenance(model: Model, scope: str) -> tuple[list[str], bool | None]:
    """The blocks outside `scope`, and whether they saw the coarse labels: True if the run
    that trained the model updated one of them, None where its provenance does not say."""
    frozen = [name for name, _ in model.net.named_children() if name not in SCOPE_MODULES[scope]]
    trained = model.config.provenance.get("scope")
    saw = None if trained is None else bool(set(SCOPE_MODULES[trained]) & set(frozen))
    return frozen, saw


def _known_encoder(name: str) -> str:
    return check_encoder(name)


def _three_classes(count: int) -> int:
    if count != 3:
        raise ValueError(f"classes is {count}, but the model has 3: background, benign, malignant")
    return count


Channels = Annotated[int, Strict(), Field(gt=0, le=4096)]
Positive = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]


# The records a checkpoint's provenance holds (sidecar schema, checked by read_config). Other
# keys are kept as they are: a provenance may say more than this version reads.
@with_config(ConfigDict(extra="allow"))
class TrainingRecord(TypedDict):
    """What training.train writes into the provenance."""

    epochs: Whole
    epochs_run: Count
    best_epoch: Count
    val_dice: Share | None
    val_class_dice: Share | None
    val_images: Count
    val_source: Text | None
    stopped_early: Flag
    min_val_dice: Share
    converged: Flag | None


@with_config(ConfigDict(extra="allow"))
class EncoderRecord(TypedDict):
    """Where a model's encoder came from (Model.__init__, load_encoder)."""

    weights: NotRequired[Text]
    saw_coarse_labels: NotRequired[Flag | None]
    checkpoint: NotRequired[Text]
    sha256: NotRequired[Text]
    pretraining: NotRequired[dict[str, JsonValue]]


@with_config(ConfigDict(extra="allow"))
class Provenance(TypedDict, total=False):
    """What a model saw: its data, masks, training record and encoder."""

    scope: Scope  # the scope training updated
    seed: Seed
    images: Count
    encoder: EncoderRecord
    training: TrainingRecord
    unlearned: dict[str, JsonValue]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved beside its weights (the sidecar), whose
    schema the field types give (read_config)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    encoder: Annotated[str, Strict(), AfterValidator(_known_encoder)] = "resnet18"
    # None (random), an smp weights name ("imagenet" downloads them: never in tests or CI), or
    # FROM_CHECKPOINT (an encoder checkpoint's weights; provenance["encoder"] names it).
    encoder_weights: Text | None = None
    # small: trains on a CPU
    decoder_channels: tuple[Channels, Channels, Channels, Channels, Channels] = (64, 32, 16, 16, 8)
    classes: Annotated[int, Strict(), AfterValidator(_three_classes)] = 3
    scope: Scope = "decoder"
    image_size: Annotated[int, Strict(), Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)] = 128
    mean: tuple[Float, Float, Float] = IMAGENET_MEAN
    std: tuple[Positive, Positive, Positive] = IMAGENET_STD
    seed: Seed = 0  # initialises the weights (the frozen encoder too, when not pretrained)
    provenance: Provenance = field(
        default_factory=Provenance, compare=False
    )  # data, masks, training

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if len(self.decoder_channels) != 5:
            raise ValueError("decoder_channels needs 5 entries, one per U-Net decoder block")


def encoder_origin(config: ModelConfig) -> str:
    """One line on the model's encoder: where its weights came from and whether they ever
    saw the coarse labels (from the provenance its checkpoint carries)."""
    if config.scope == "all":
        return f"Encoder: {config.encoder}, trained with the rest on this model's masks"
    record = config.provenance.get("encoder") or {}
    weights = record.get("weights") or config.encoder_weights or "random"
    source = {"random": "random weights", FROM_CHECKPOINT: "pretrained"}.get(
        weights, f"{weights} weights"
    )
    seen_labels: dict[bool | None, str] = {
        True: "saw the coarse labels",
        False: "never saw the coarse labels",
    }
    seen = seen_labels.get(
        record.get("saw_coarse_labels"), "not known whether it saw the coarse labels"
    )
    return f"Encoder: {config.encoder} (frozen), {source}; {seen}"


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

    The encoder starts random, from smp's pretrained weights (config.encoder_weights, e.g.
    "imagenet": downloaded), or from an encoder checkpoint (`encoder_checkpoint`, see
    save_encoder). Provenance["encoder"] records which, and whether it saw coarse labels.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        encoder_checkpoint: str | Path | None = None,
    ):
        self.config = config or ModelConfig()
        weights = self.config.encoder_weights
        if weights == FROM_CHECKPOINT and encoder_checkpoint is None:
            raise ValueError(
                "encoder_weights 'checkpoint' needs the encoder checkpoint: pass "
                "encoder_checkpoint (--encoder-checkpoint PATH)"
            )
        torch.manual_seed(self.config.seed)
        self.net = smp.Unet(
            self.config.encoder,
            encoder_weights=None if weights == FROM_CHECKPOINT else weights,
            classes=self.config.classes,
            decoder_channels=self.config.decoder_channels,
        )
        record: EncoderRecord
        if encoder_checkpoint is not None:
            record = load_encoder(self.net.encoder, encoder_checkpoint, self.config.encoder)
            weights = FROM_CHECKPOINT
        else:  # random or smp's weights: neither saw this project's coarse labels
            record = {"weights": weights or "random", "saw_coarse_labels": False}
        provenance = self.config.provenance
        if "encoder" not in provenance:
            provenance = {**provenance, "encoder": record}
        self.config = replace(self.config, encoder_weights=weights, provenance=provenance)
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
    def set_scope(self, scope: Scope) -> None:
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
            norms = [torch.linalg.vector_norm(p.float()) for p in self.scoped_parameters()]
            return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def save(self, path: str | Path) -> Path:
        """Write PATH.safetensors and PATH.json; returns the weights path."""
        weights, sidecar = checkpoint_paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        info = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **asdict(self.config)}
        _write_checkpoint(weights, sidecar, state, info)
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


def save_encoder(model: Model, path: str | Path, provenance: dict, half: bool = True) -> Path:
    """Write the model's encoder as PATH.safetensors (float16 storage with `half`; loading
    casts back) and PATH.json (format, encoder name, provenance); returns the weights path.

    `provenance` must say whether the encoder saw coarse labels ("saw_coarse_labels")."""
    if not isinstance(provenance.get("saw_coarse_labels"), bool):
        raise ValueError("an encoder's provenance must say whether it saw coarse labels")
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.net.encoder.state_dict().items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[name] = tensor.contiguous()
    info = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_VERSION,
        "encoder": model.config.encoder,
        "storage": "float16" if half else "float32",
        "provenance": provenance,
    }
    _write_checkpoint(weights, sidecar, state, info)
    return weights


def _write_checkpoint(weights: Path, sidecar: Path, state: dict, info: dict) -> None:
    """Both files written beside their targets and renamed into place (files.write_files):
    never through a link, never a half-written pair."""
    config = json.dumps(json_ready(info), indent=2, allow_nan=False) + "\n"
    write_files({weights: safetensors_bytes(state), sidecar: config.encode()}, replace=True)


def _sidecar(path: str | Path, what: str, restore: str) -> tuple[Path, object]:
    """A checkpoint's JSON sidecar and its parsed content, once both files are there;
    FileNotFoundError says `what` a checkpoint is, InputError how to `restore` it."""
    weights, sidecar = checkpoint_paths(path)
    for needed in (weights, sidecar):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing; {what}")
    return sidecar, read_json(sidecar, restore)


@with_config(ConfigDict(extra="allow"))
class EncoderProvenance(TypedDict):
    """What a pretrained encoder saw (pretrain.save writes it)."""

    saw_coarse_labels: Flag  # without it no certificate can say what the frozen part saw
    scope: NotRequired[Scope]
    training: NotRequired[TrainingRecord]


@dataclass(frozen=True)
class EncoderInfo:
    """An encoder checkpoint's sidecar: save_encoder writes it, read_encoder_info checks it."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    format: Literal["shortcut-unlearning-encoder"]  # ENCODER_FORMAT
    version: Literal[1]  # ENCODER_VERSION
    encoder: Annotated[str, Strict(), AfterValidator(_known_encoder)]
    storage: Literal["float16", "float32"]
    provenance: EncoderProvenance


ENCODER_FIX = (
    "write the encoder again with `shortcut-unlearning pretrain-encoder` (its sidecar says "
    "whether it saw coarse labels)"
)


def read_encoder_info(path: str | Path) -> EncoderInfo:
    """The JSON sidecar of an encoder checkpoint, checked against EncoderInfo: format,
    version, a known encoder and a provenance that says whether it saw coarse labels.
    InputError names the file and each field that is wrong."""
    sidecar, info = _sidecar(
        path,
        "an encoder checkpoint is a .safetensors file with its .json beside it, as written by "
        "`shortcut-unlearning pretrain-encoder`",
        ENCODER_FIX,
    )
    whole = isinstance(info, dict) and info.get("format") == CHECKPOINT_FORMAT
    what = "an encoder checkpoint" + (" but a whole model: pass it with --model" if whole else "")
    check_header(info, sidecar, ENCODER_FORMAT, ENCODER_VERSION, what, ENCODER_FIX)
    return validate(EncoderInfo, info, sidecar, ENCODER_FIX)


def load_encoder(encoder: torch.nn.Module, path: str | Path, name: str) -> EncoderRecord:
    """Load an encoder checkpoint into `encoder` (an smp encoder named `name`), cast to its
    dtypes; returns the provenance record the model keeps (file, SHA-256, what it saw)."""
    info = read_encoder_info(path)
    weights, _ = checkpoint_paths(path)
    if info.encoder != name:
        raise ValueError(
            f"{weights} holds a {info.encoder} encoder but the model is a {name} U-Net; "
            f"pass --encoder {info.encoder}"
        )
    try:
        state = load_file(weights)
    except Exception as err:  # safetensors raises its own error types for broken files
        raise ValueError(f"cannot read weights {weights} ({err}); the file is damaged") from err
    own = encoder.state_dict()
    wrong = sorted(set(own) ^ set(state)) + [
        k for k in set(own) & set(state) if own[k].shape != state[k].shape
    ]
    if wrong:
        raise ValueError(
            f"the weights in {weights} do not fit a {name} encoder ({wrong[0]}"
            f"{' and others' if len(wrong) > 1 else ''}); the files belong to another encoder"
        )
    if any(t.is_floating_point() and not t.isfinite().all() for t in state.values()):
        raise ValueError(f"{weights} holds NaN or infinite weights; write the encoder again")
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {
        "weights": FROM_CHECKPOINT,
        "checkpoint": weights.name,
        "sha256": digest,
        "saw_coarse_labels": info.provenance["saw_coarse_labels"],
        "pretraining": cast(dict[str, JsonValue], info.provenance),
    }


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) of the checkpoint PATH: PATH.safetensors and PATH.json.

    A trailing .safetensors or .json is the checkpoint's own; any other suffix is part of the
    name, so "model.v2" gives model.v2.safetensors and model.v2.json.
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"


def check_encoder(name) -> str:
    """`name` if segmentation_models_pytorch knows the encoder (a "tu-" name: if timm has the
    model and can build it as an encoder), else ValueError naming a few."""
    names = smp.encoders.get_encoder_names()
    if isinstance(name, str) and (name in names or (name.startswith("tu-") and _timm_has(name))):
        return name
    examples = ", ".join(e for e in ENCODER_EXAMPLES if e in names)
    raise ValueError(
        f"unknown encoder {name!r}; choose one of segmentation_models_pytorch's "
        f"{len(names)} encoders, e.g. {examples}, or tu-<name> with a timm model that "
        "builds as an encoder"
    )


def _timm_has(name: str) -> bool:
    """Whether timm builds the model of a "tu-" encoder name with features (on the meta
    device: nothing is allocated or downloaded)."""
    import timm

    if not timm.is_model(name[3:]):
        return False
    try:
        with torch.device("meta"):
            timm.create_model(name[3:], pretrained=False, features_only=True)
    except Exception:  # timm raises RuntimeError or others for models without features
        return False
    return True


def check_encoder_weights(encoder: str, weights: str | None) -> str | None:
    """`weights` if segmentation_models_pytorch has them for `encoder` (None: random), else
    ValueError naming the ones it has. FROM_CHECKPOINT is not a name: pass the checkpoint."""
    if weights is None:
        return None
    check_encoder(encoder)
    known = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if weights not in known:
        raise ValueError(
            f"segmentation_models_pytorch has no {weights!r} weights for {encoder}"
            + (f"; it has {', '.join(sorted(known))}" if known else "")
            + " (an encoder of your own: --encoder-checkpoint PATH)"
        )
    return weights


MODEL_FIX = "restore the file, or save the model again with this tool"


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig in a checkpoint's JSON sidecar, checked against ModelConfig's schema:
    every key present, none unknown, each value of its type and in its range (the encoder
    known, the std positive, numbers finite, the provenance's records well formed).
    InputError names the file and each field that is wrong."""
    sidecar, info = _sidecar(
        path,
        "a checkpoint is a .safetensors file with its .json config beside it, as written by "
        "Model.save",
        MODEL_FIX,
    )
    what = "a shortcut-unlearning model config"
    info = dict(check_header(info, sidecar, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, what, MODEL_FIX))
    del info["format"], info["version"]
    missing = sorted({f.name for f in fields(ModelConfig)} - set(info))
    if missing:
        raise InputError(
            f"{sidecar} lacks the keys {missing}; it describes another model or architecture: "
            "use a checkpoint written by this tool"
        )
    return validate(ModelConfig, info, f"checkpoint {sidecar}", MODEL_FIX)


class FrozenInputs:
    """What the scope takes in, for a set of images: cached once, or computed per batch.

    With a frozen encoder the cache turns every training step into a decoder-only step.
    Uncached images stay on a CUDA device when they fit, so a step copies nothing to it.
    Indexing with an array of image indices gives that batch's input to scoped_forward.
    """

    def __init__(self, model: Model, images: np.ndarray, cache: bool = True, batch_size: int = 32):
        self.model, self.cache = model, None
        self.images: np.ndarray | torch.Tensor = images
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
        # The frozen part runs in eval mode, as during training; the scope keeps the mode its
        # caller set (an evaluation's eval mode, a loop's frozen batch statistics).
        for name, block in self.model.net.named_children():
            if name not in SCOPE_MODULES[self.model.config.scope]:
                block.eval()
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
