"""Saliency maps and the counterfactual artefact test (docs/method.md, "Saliency").

A segmentation net gives a map, not one number, so attribution needs a scalar per image: the sum
of class-k logits over a fixed region R (by default the model's predicted foreground, computed
once before attribution so that the region itself does not move with the input). Beside a
picture, two numbers: the share of attribution on artefact pixels (`saliency_share`), and the
drop of the image score when those pixels are replaced by surrounding skin
(`counterfactual_drop`), the stronger evidence of a shortcut.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel, Saliency

from .inpaint import inpaint_background
from .metrics import MALIGNANT, image_scores

METHODS = ("saliency", "smoothgrad", "gradcam")


class RegionLogitSum(torch.nn.Module):
    """Per image, the sum of class-k logits over a fixed boolean region (B, H, W)."""

    def __init__(self, net: torch.nn.Module, region: torch.Tensor, k: int):
        super().__init__()
        self.net, self.region, self.k = net, region, k

    def forward(self, x: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        # captum hands the region back as an extra argument, expanded to match the noisy copies
        # NoiseTunnel makes of each image; called directly, the stored region is used.
        region = self.region if region is None else region
        logits = self.net(x)[:, self.k].float()
        return (logits * region.to(logits.dtype)).sum(dim=(1, 2))


def region_logit_sum(net: torch.nn.Module, region: torch.Tensor, k: int) -> RegionLogitSum:
    """Wrap `net` so that it gives one scalar per image, as captum needs."""
    return RegionLogitSum(net, torch.as_tensor(region, dtype=torch.bool), k)


def saliency_maps(
    model,
    images: np.ndarray,
    k: int = MALIGNANT,
    method: str = "saliency",
    region: np.ndarray | None = None,
    batch_size: int = 8,
    **options,
) -> np.ndarray:
    """Attribution maps (N, H, W) float32, non-negative, for uint8 (N, H, W, 3) images.

    method: "saliency" (vanilla gradient), "smoothgrad" (NoiseTunnel over it; options
    nt_samples=8, stdevs=0.1 in normalised input units) or "gradcam" (on the last decoder block,
    upsampled to the image). Other options go to captum's `attribute`. region: boolean
    (N, H, W) pixels whose class-k logits are summed; None means the predicted foreground
    (argmax != 0), or the whole image where that is empty.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    images = np.asarray(images)
    if region is not None:
        region = np.asarray(region, dtype=bool)
        if region.shape != images.shape[:3]:
            raise ValueError(f"region must have shape {images.shape[:3]}, got {region.shape}")
    out = []
    with _attribution_mode(model.net):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            part = None if region is None else region[start : start + batch_size]
            out.append(_attribute(model, batch, k, method, part, options))
    if not out:
        return np.zeros((0, *images.shape[1:3]), np.float32)
    return np.concatenate(out).astype(np.float32)


def _attribute(model, images, k, method, region, options) -> np.ndarray:
    """Maps for one batch; the net is already in eval mode with frozen parameters."""
    if region is None:
        region = _foreground(model, images)
    region = torch.as_tensor(region, device=model.device)
    wrapper = region_logit_sum(model.net, region, k)
    x = model.to_input(images).requires_grad_()  # set here so captum does not warn
    args = {"additional_forward_args": (region,)}
    if method == "gradcam":
        cam = LayerGradCam(wrapper, _late_decoder_block(model.net))
        maps = cam.attribute(x, **{"relu_attributions": True, **args, **options})
        maps = LayerAttribution.interpolate(maps, tuple(x.shape[2:]), "bilinear")
        maps = maps.clamp(min=0)[:, 0]
    else:
        if method == "smoothgrad":
            explainer = NoiseTunnel(Saliency(wrapper))
            defaults = {"nt_type": "smoothgrad", "nt_samples": 8, "stdevs": 0.1}
        else:
            explainer, defaults = Saliency(wrapper), {}
        maps = explainer.attribute(x, **{"abs": True, **defaults, **args, **options})
        maps = maps.abs().amax(dim=1)  # a pixel is as salient as its most salient colour
    return maps.detach().float().cpu().numpy()


def _foreground(model, images: np.ndarray) -> np.ndarray:
    """Predicted lesion pixels per image; the whole image where none is predicted."""
    fg = model.probabilities(images).argmax(axis=1) != 0
    fg[~fg.any(axis=(1, 2))] = True
    return fg


def _late_decoder_block(net: torch.nn.Module) -> torch.nn.Module:
    """The last decoder block holding conv layers (smp's UnetDecoder keeps them in .blocks)."""
    decoder = net.decoder
    blocks = list(getattr(decoder, "blocks", decoder.children()))
    for block in reversed(blocks):
        if any(isinstance(m, torch.nn.Conv2d) for m in block.modules()):
            return block
    raise ValueError("the decoder has no block with conv layers for Grad-CAM")


@contextmanager
def _attribution_mode(net: torch.nn.Module):
    """Eval mode and frozen parameters while attributing; every flag restored afterwards.

    Only input gradients are needed, so parameter gradients would waste time and memory. The
    train flags are kept per module because Model.train_mode trains only part of the net.
    """
    training = {m: m.training for m in net.modules()}
    requires_grad = {p: p.requires_grad for p in net.parameters()}
    net.eval()
    net.requires_grad_(False)
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def normalise_maps(maps, vmax: float | None = None) -> tuple[np.ndarray, float]:
    """Maps scaled to [0, 1] by one shared vmax (the 99th percentile of all maps when None).

    Pass the vmax of the "before" maps when scaling the "after" maps, so both share a scale.
    """
    maps = np.asarray(maps, dtype=np.float32)
    if vmax is None:
        vmax = float(np.percentile(maps, 99)) if maps.size else 0.0
    if vmax <= 0:  # all-zero maps: nothing to scale
        return np.zeros_like(maps), float(vmax)
    return np.clip(maps / vmax, 0, 1), float(vmax)


def counterfactual_drop(model, images: np.ndarray, artefact_masks: np.ndarray, k: int = MALIGNANT):
    """Image scores (docs/method.md, "Classification by average pixel pooling") before and
    after the artefact pixels are inpainted away.

    A clear positive drop means the score leaned on the artefact. mean_drop and n_images count
    only images that have artefact pixels (mean_drop is nan when none has).
    """
    masks = np.asarray(artefact_masks, dtype=bool)
    score = image_scores(model.probabilities(images), k).astype(np.float64)
    inpainted = inpaint_background(images, masks)
    score_inpainted = image_scores(model.probabilities(inpainted), k).astype(np.float64)
    drop = score - score_inpainted
    has_artefact = masks.any(axis=(1, 2))
    n = int(has_artefact.sum())
    return {
        "score": score,
        "score_inpainted": score_inpainted,
        "drop": drop,
        "mean_drop": float(drop[has_artefact].mean()) if n else float("nan"),
        "n_images": n,
    }


def saliency_share(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) share of each non-negative map's total that falls on its mask; 0 for an all-zero map."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    total = maps.sum(axis=(1, 2))
    on_mask = (maps * masks).sum(axis=(1, 2))
    return np.divide(on_mask, total, out=np.zeros_like(total), where=total > 0)
