"""Pictures for reports and documentation (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # not pyplot: no backend, no global state
from matplotlib.patches import Patch

from . import masks as masklib
from .data.lesion_set import ARTEFACTS, CLASS_NAMES, LesionSet
from .files import write_figure

ARTEFACT_COLOURS = {
    "dark_corner": "#555555",
    "hair": "#8c564b",
    "gel_border": "#17becf",
    "gel_bubble": "#bcbd22",
    "ruler": "#7f7f7f",
    "ink": "#9467bd",
    "patches": "#ff7f0e",
}
CLASS_COLOURS = ["#00000000", "#2ca02c", "#d62728"]  # background clear, benign, malignant


def _overlay(ax, image, labels, colours, title=None):
    ax.imshow(image)
    ax.imshow(
        labels,
        cmap=ListedColormap(colours),
        vmin=0,
        vmax=len(colours) - 1,
        alpha=0.55,
        interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=7)


def _row_titles(axes, names) -> None:
    """A rotated title left of each row of a grid of pictures."""
    for row, name in enumerate(names):
        axes[row, 0].text(
            -0.08,
            0.5,
            name,
            transform=axes[row, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )


def _save(fig: Figure, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_figure(fig, out)


def synthetic_grid(
    data: LesionSet,
    out: Path | str,
    n: int = 8,
    coarse_method: str = masklib.DEFAULT_COARSE_METHOD,
    coarse_margin: float = masklib.DEFAULT_COARSE_MARGIN,
) -> Path:
    """Images with fine masks, coarse masks (spurious artefacts highlighted) and artefact masks.

    Picks train images with and without the spurious artefacts from both classes, so the
    reader sees the shortcut: the coarse mask's band swallows the artefacts.
    """
    train = np.flatnonzero(data.splits == "train")
    spurious = data.artefact_mask().any(axis=(1, 2))
    picks = []
    for label in (1, 0):  # half malignant, half benign; with and without the artefacts
        same = [i for i in train if data.labels[i] == label]
        with_art = [i for i in same if spurious[i]]
        without = [i for i in same if not spurious[i]]
        chosen = with_art[: n // 4] + without[: n // 4]
        chosen += [i for i in with_art + without if i not in chosen][: n // 2 - len(chosen)]
        picks += chosen
    coarse = masklib.coarse_masks(data.masks[picks], coarse_method, coarse_margin)
    fig = Figure(figsize=(1.7 * len(picks), 7.4))
    axes = fig.subplots(4, len(picks), squeeze=False)
    rows = (
        "image",
        "fine mask",
        f"coarse mask ({coarse_method} {coarse_margin:g})",
        "artefact masks",
    )
    for col, i in enumerate(picks):
        present = [a for a in ARTEFACTS if data.flags[a][i]]
        axes[0, col].imshow(data.images[i])
        axes[0, col].set_axis_off()
        axes[0, col].set_title(
            f"{CLASS_NAMES[1 + data.labels[i]]}\n" + ", ".join(present), fontsize=6
        )
        _overlay(axes[1, col], data.images[i], data.masks[i], CLASS_COLOURS)
        # Coarse mask, with the spurious pixels it wrongly calls lesion shown in black.
        shortcut = data.artefact_mask()[i] & (coarse[col] != 0)
        _overlay(
            axes[2, col],
            data.images[i],
            np.where(shortcut, 3, coarse[col]),
            [*CLASS_COLOURS, "#000000"],
        )
        # Artefact masks: the last artefact in catalogue order wins where they overlap.
        index = np.zeros(data.image_size, int)
        for k in range(len(ARTEFACTS)):
            index[(data.artefacts[i] >> k) & 1 == 1] = k + 1
        _overlay(
            axes[3, col],
            data.images[i] // 3 + 170,
            index,
            ["#00000000", *ARTEFACT_COLOURS.values()],
        )
    _row_titles(axes, rows)
    handles = [Patch(color=c, label=CLASS_NAMES[k]) for k, c in enumerate(CLASS_COLOURS) if k]
    handles.append(Patch(color="black", label="spurious artefact inside coarse mask"))
    handles += [Patch(color=c, label=a) for a, c in ARTEFACT_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.suptitle(
        f"Synthetic dermoscopy: spurious artefacts {', '.join(data.spurious)} lie in the coarse "
        "mask's band and follow the label in train (reversed in test)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0.02, 0.07, 1, 0.96))
    return _save(fig, out)


def saliency_grid(
    images: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    captions: list[str],
    out: Path | str,
    artefacts: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Images and their saliency before and after unlearning, on one shared colour scale."""
    from .saliency import normalise_maps

    before, vmax = normalise_maps(before)
    after, _ = normalise_maps(after, vmax)
    n = len(images)
    fig = Figure(figsize=(2.0 * n, 6.6))
    axes = fig.subplots(3, n, squeeze=False)
    for col in range(n):
        axes[0, col].imshow(images[col])
        if artefacts is not None:
            axes[0, col].contour(artefacts[col], levels=[0.5], colors="cyan", linewidths=0.6)
        axes[0, col].set_title(captions[col], fontsize=7)
        for row, maps in ((1, before), (2, after)):
            axes[row, col].imshow(images[col])
            axes[row, col].imshow(maps[col], cmap="inferno", vmin=0, vmax=1, alpha=0.7)
        for ax in axes[:, col]:
            ax.set_axis_off()
    _row_titles(axes, ("image (artefacts outlined)", "saliency before", "after"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0.03, 0, 1, 0.95))
    return _save(fig, out)


def trajectory_plot(runs: dict[str, list[dict]], out: Path | str, title: str = "") -> Path:
    """Probe metrics over unlearning steps, one line per run, noisy phases shaded.

    `runs` maps a label to trajectory rows ({"step", "phase", and the probe's "dice",
    "auroc", "s_global" where probed}), as stored in metrics.json.
    """
    keys = ("dice", "auroc", "s_global")
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, len(keys))
    for (label, rows), colour in zip(runs.items(), _colours(len(runs)), strict=True):
        probed = [r for r in rows if "dice" in r]
        noisy = [r["step"] for r in rows if r["phase"] == "noisy"]
        for ax, key in zip(axes, keys, strict=True):
            ax.plot(
                [r["step"] for r in probed],
                [r[key] for r in probed],
                "o-",
                color=colour,
                label=label,
                markersize=3,
            )
            if noisy:
                ax.axvspan(0, max(noisy), color=colour, alpha=0.08)
    for ax, key in zip(axes, keys, strict=True):
        ax.set_xlabel("unlearning step")
        ax.set_title(
            {
                "dice": "Dice (probe)",
                "auroc": "AUROC (probe)",
                "s_global": "S_global (probe, nats/px)",
            }[key],
            fontsize=9,
        )
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Utility over unlearning steps (shaded: noisy phase)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]
