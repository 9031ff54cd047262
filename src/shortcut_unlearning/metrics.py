"""Evaluation metrics: image AUROC by average pixel pooling, Dice, and S_global.

Conventions: ``probs`` are softmax outputs of shape (N, K, H, W) with classes 0 background,
1 benign, 2 malignant; fine masks / label maps are (N, H, W) ints of those classes.

S_global (METHOD.md section 4) measures how much the model's predicted foreground is explained
by the spurious map S beyond the true labels::

    S_global = max over k of  sum over cells c of  w_ck * I_ck(S ; Y_k)

Our estimator:

- S is the spurious map (N, H, W) bool; Y_k = (labels_map == k), the fine mask binarised for
  the stratum of predicted class k (strata ``k_classes``, default benign 1 and malignant 2).
- Soft counts: each pixel adds its probability p_k (with ``hard=True``, the one-hot argmax) to
  stratum k's 2x2 table over (S, Y_k).
- Spatial pooling: H and W are cut into ``grid`` nearly equal bands (np.array_split), giving
  grid**2 cells; a cell's table pools all images and all its pixels. Per-pixel tables would
  carry an upward bias of about H*W/(2N) nats that swamps the signal. A grid also conditions on
  location: dependence that only comes from S and lesions living in different cells (say,
  artefacts always in the corners, lesions in the centre) counts at grid=1 but not at grid=4.
- I_ck is the mutual information in nats of the cell's table normalised to a joint distribution
  (0 for an empty table); w_ck is the cell's summed p_k divided by N*H*W, i.e. its share of all
  pixels predicted k. The value is therefore in nats per pixel.
- ``s_global_report`` adds a 95% percentile bootstrap over images and a permutation null that
  pairs each image's S with another image's predictions and labels; ``excess`` (value minus the
  null mean) is what remains once estimator bias and the layout of S alone are accounted for.
  The null costs one matrix product per cell over all image pairs (memory N**2 * 4 * grid**2
  floats), then each permutation is a gather.
"""

from __future__ import annotations

import numpy as np
from scipy.special import entr
from sklearn.metrics import roc_auc_score

from .data.lesion_set import BENIGN, MALIGNANT

UNIT = "nats per pixel"


# --- Classification by average pixel pooling (METHOD.md section 3) ---


def image_scores(probs, k: int = MALIGNANT) -> np.ndarray:
    """(N,) image scores: the mean over all pixels of the probability of class k."""
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape (N, K, H, W), got {probs.shape}")
    return probs[:, k].mean(axis=(1, 2))


def _auroc(scores: np.ndarray, labels: np.ndarray, min_per_class: int = 1) -> float:
    """AUROC, or nan when either class has fewer than min_per_class images (undefined or noise)."""
    labels = np.asarray(labels).astype(bool)
    if min(labels.sum(), (~labels).sum()) < max(min_per_class, 1):
        return float("nan")
    return float(roc_auc_score(labels, scores))


def pooled_auroc(probs, labels) -> float:
    """AUROC of the malignant image scores against 0/1 labels; nan if only one class is present."""
    return _auroc(image_scores(probs), labels)


def auroc_by_group(probs, labels, groups: dict, min_per_class: int = 3) -> dict[str, float]:
    """AUROC inside each group (name -> (N,) bool); nan where a class has < min_per_class images."""
    scores, labels = image_scores(probs), np.asarray(labels)
    return {
        name: _auroc(scores[np.asarray(sel, bool)], labels[np.asarray(sel, bool)], min_per_class)
        for name, sel in groups.items()
    }


def worst_group_auroc(by_group: dict[str, float]) -> float:
    """The lowest defined group AUROC; nan if no group has one."""
    values = [v for v in by_group.values() if not np.isnan(v)]
    return float(min(values)) if values else float("nan")


def auroc_ci(
    scores, labels, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, min_per_class=1
) -> dict:
    """AUROC of image scores against 0/1 labels with a percentile bootstrap interval.

    Images are resampled with replacement within each class (a stratified bootstrap), so every
    draw keeps both classes and its class counts. AUROC is the Mann-Whitney statistic (ties
    count 1/2), equal to sklearn's roc_auc_score. Keys: value, ci_low, ci_high, n_malignant,
    n_benign; value and interval are nan when a class has fewer than min_per_class images,
    the interval also when n_boot is 0.
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must match")
    pos, neg = scores[labels], scores[~labels]
    record = {
        "value": float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "n_malignant": len(pos),
        "n_benign": len(neg),
    }
    if min(len(pos), len(neg)) < max(min_per_class, 1):
        return record
    # kernel[i, j]: malignant image i outranks benign image j (1/2 for a tie)
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    record["value"] = float(kernel.mean())
    if n_boot:
        rng = np.random.default_rng(seed)
        # A resample is a count per image; its AUROC weighs each pair by both counts.
        w_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=n_boot)
        w_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=n_boot)
        boot = ((w_pos @ kernel) * w_neg).sum(axis=1) / (len(pos) * len(neg))
        tail = 100 * (1 - level) / 2
        record["ci_low"], record["ci_high"] = (
            float(v) for v in np.percentile(boot, [tail, 100 - tail])
        )
    return record


def auroc_by_group_ci(scores, labels, groups: dict, min_per_class: int = 3, **bootstrap) -> dict:
    """`auroc_ci` inside each group (name -> (N,) bool); options go to auroc_ci."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    return {
        name: auroc_ci(
            scores[np.asarray(sel, bool)],
            labels[np.asarray(sel, bool)],
            min_per_class=min_per_class,
            **bootstrap,
        )
        for name, sel in groups.items()
    }


def mean_ci(values, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of per-image values with a percentile bootstrap interval over images.

    Keys value, ci_low, ci_high, n_images; nan when there are no values.
    """
    values = np.asarray(values, float)
    record = {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    record["n_images"] = len(values)
    if len(values) == 0:
        return record
    record["value"] = float(values.mean())
    if n_boot:
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(len(values), np.full(len(values), 1 / len(values)), size=n_boot)
        boot = draws @ values / len(values)
        tail = 100 * (1 - level) / 2
        record["ci_low"], record["ci_high"] = (
            float(v) for v in np.percentile(boot, [tail, 100 - tail])
        )
    return record


def shortcut_groups(flags: dict, labels, names, direction: dict | None = None) -> dict:
    """Per artefact, the images that agree with the training shortcut and those that oppose it.

    "<name>:aligned" holds malignant images with the artefact and benign ones without (for an
    artefact that went with malignancy in training, direction +1; -1 flips it), and
    "<name>:conflicting" the rest. Inside a group of images that all carry the artefact, the
    shortcut shifts every score alike and AUROC cannot see it; across aligned and conflicting
    images it reorders the scores, so the conflicting group's AUROC is where it shows. With
    several names, "any:..." does the same for the union (direction of the first name).
    """
    names = [names] if isinstance(names, str) else list(names)
    missing = [n for n in names if n not in flags]
    if missing:
        raise ValueError(f"no flags for {missing}; flags are known for {sorted(flags)}")
    direction = direction or {}
    malignant = np.asarray(labels) == 1
    members = {n: np.asarray(flags[n], bool) for n in names}
    if len(names) > 1:
        members["any"] = np.any(list(members.values()), axis=0)
    groups = {}
    for name, has in members.items():
        sign = direction.get(names[0] if name == "any" else name, 1)
        aligned = (has == malignant) if sign > 0 else (has != malignant)
        groups[f"{name}:aligned"], groups[f"{name}:conflicting"] = aligned, ~aligned
    return groups


# --- Segmentation ---


def _predicted(probs_or_pred, truth_shape) -> np.ndarray:
    """A predicted label map (N, H, W) from probabilities (argmax) or a label map."""
    pred = np.asarray(probs_or_pred)
    if pred.ndim == 4:
        pred = pred.argmax(axis=1)
    if pred.shape != tuple(truth_shape):
        raise ValueError(f"prediction has shape {pred.shape} but the masks have {truth_shape}")
    return pred


def _dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) Dice of boolean (N, H, W) maps; an image where both are empty counts as 1."""
    overlap = (pred & truth).sum(axis=(1, 2))
    sizes = pred.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
    return np.where(sizes == 0, 1.0, 2 * overlap / np.maximum(sizes, 1))


def dice(probs_or_pred, fine_masks) -> float:
    """Mean foreground Dice over images (lesion = any nonzero class); both empty counts as 1.

    Takes probabilities (N, K, H, W), reduced by argmax, or a predicted label map (N, H, W).
    """
    truth = np.asarray(fine_masks)
    pred = _predicted(probs_or_pred, truth.shape)
    return float(_dice_per_image(pred != 0, truth != 0).mean())


def dice_by_class(probs_or_pred, masks, classes=(BENIGN, MALIGNANT)) -> dict[int, float]:
    """Per lesion class k, the mean Dice of (prediction == k) against (truth == k) over the
    images whose truth holds class k; nan where no image does.

    Unlike `dice`, a lesion found in the right place but called the wrong class scores 0, so
    a model that calls every lesion malignant keeps its malignant Dice and loses its benign.
    """
    truth = np.asarray(masks)
    pred = _predicted(probs_or_pred, truth.shape)
    out = {}
    for k in classes:
        has_k = (truth == k).any(axis=(1, 2))
        per_image = _dice_per_image(pred[has_k] == k, truth[has_k] == k)
        out[int(k)] = float(per_image.mean()) if has_k.any() else float("nan")
    return out


def malignant_share(probs_or_pred) -> float:
    """Share of the predicted lesion pixels (argmax not background), pooled over images, that
    are malignant; nan when no lesion pixel is predicted. Takes probabilities or a label map."""
    pred = np.asarray(probs_or_pred)
    if pred.ndim == 4:
        pred = pred.argmax(axis=1)
    lesion = int((pred != 0).sum())
    return float((pred == MALIGNANT).sum() / lesion) if lesion else float("nan")


# --- Information measures ---


def binary_entropy(p):
    """h(p) in nats, with 0 log 0 = 0; a float for a scalar p, else an array."""
    h = entr(np.asarray(p, float)) + entr(1 - np.asarray(p, float))
    return float(h) if np.ndim(h) == 0 else h


def disjoint_support_mi(a, b):
    """I(S; Y) when S=1 never meets Y=1: a = P(S=1), b = P(Y=1 | S=0) (METHOD.md section 4)."""
    return binary_entropy((1 - a) * b) - (1 - a) * binary_entropy(b)


def _mi(tables: np.ndarray) -> np.ndarray:
    """Mutual information in nats of each table over the last two axes; 0 for an empty table."""
    tables = np.asarray(tables, float)
    total = tables.sum(axis=(-2, -1), keepdims=True)
    joint = tables / np.where(total > 0, total, 1)
    marginals = joint.sum(axis=-1, keepdims=True) * joint.sum(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = joint * np.log(joint / marginals)
    mi = np.where(joint > 0, terms, 0.0).sum(axis=(-2, -1))
    return np.maximum(mi, 0.0)  # rounding can dip a hair below zero


def mutual_information(table) -> float:
    """Mutual information in nats of a 2D table of counts or probabilities."""
    table = np.asarray(table, float)
    if table.ndim != 2:
        raise ValueError(f"table must be 2D, got shape {table.shape}")
    return float(_mi(table))


# --- S_global (METHOD.md section 4) ---


def _checked(probs, spurious, labels_map, k_classes, grid):
    probs, spurious, labels_map = np.asarray(probs), np.asarray(spurious), np.asarray(labels_map)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape (N, K, H, W), got {probs.shape}")
    expected = (probs.shape[0], *probs.shape[2:])
    for name, arr in (("spurious", spurious), ("labels_map", labels_map)):
        if arr.shape != expected:
            raise ValueError(
                f"{name} has shape {arr.shape} but probs has shape {probs.shape}; "
                f"expected {expected}"
            )
    if not k_classes or probs.shape[1] <= max(k_classes):
        raise ValueError(f"k_classes {k_classes} need classes that probs {probs.shape} lacks")
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    return probs, spurious.astype(bool), labels_map


def _cell_layout(h: int, w: int, grid: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A pixel order that makes each grid cell contiguous, and each cell's (start, stop) in it."""

    def bands(size: int) -> np.ndarray:
        band = np.empty(size, int)
        for i, index in enumerate(np.array_split(np.arange(size), grid)):
            band[index] = i
        return band

    cell = (bands(h)[:, None] * grid + bands(w)[None, :]).ravel()
    stops = np.cumsum(np.bincount(cell, minlength=grid * grid))
    starts = np.concatenate([[0], stops[:-1]])
    return np.argsort(cell, kind="stable"), list(zip(starts.tolist(), stops.tolist(), strict=True))


def _pixel_weights(probs, labels_map, k_classes, hard, order) -> np.ndarray:
    """(N, 2, strata, H*W) float32: weights p_k, then p_k * Y_k, pixels in cell order."""
    n, _, h, w = probs.shape
    ks = np.asarray(k_classes)
    weights = probs.argmax(axis=1)[:, None] == ks[:, None, None] if hard else probs[:, ks]
    # float32 halves the memory traffic; counts stay exact up to 2**24 pixels per sum
    weights = weights.astype(np.float32).reshape(n, len(ks), h * w)[..., order]
    is_k = labels_map.reshape(n, 1, h * w)[..., order] == ks[None, :, None]
    # C order keeps the pixel axis contiguous for the cell sums and matrix products
    return np.ascontiguousarray(np.stack([weights, weights * is_k], axis=1))


def _cell_sums(x: np.ndarray, cells) -> np.ndarray:
    """Sum the cell-ordered pixel axis (last) into one value per cell, as float64."""
    return np.stack([x[..., a:b].sum(axis=-1) for a, b in cells], axis=-1).astype(float)


def _tables(totals: np.ndarray, s_sums: np.ndarray) -> np.ndarray:
    """(..., strata, C, 2, 2) tables over (S, Y_k) from (..., 2, strata, C) sums of the pixel
    weights [p_k, p_k Y_k] over all pixels (totals) and over the pixels where S=1 (s_sums)."""
    total, total_y = totals[..., 0, :, :], totals[..., 1, :, :]
    s1, s1_y = s_sums[..., 0, :, :], s_sums[..., 1, :, :]
    table = np.stack([total - total_y - s1 + s1_y, total_y - s1_y, s1 - s1_y, s1_y], axis=-1)
    # float32 sums can leave tiny negative remainders; counts never are
    return np.clip(table, 0, None).reshape(*total.shape, 2, 2)


def _per_class(pooled: np.ndarray, n_pixels: int) -> np.ndarray:
    """sum_c w_ck I_ck for each stratum, from pooled (..., strata, C, 2, 2) tables."""
    weight = pooled.sum(axis=(-2, -1)) / n_pixels
    return (weight * _mi(pooled)).sum(axis=-1)


def _prepared(probs, spurious, labels_map, k_classes, hard, grid):
    """Cell-ordered pixel weights and (N, H*W) S map, the cells, each image's (N, 2, strata, C)
    weight totals and its (N, strata, C, 2, 2) tables."""
    probs, spurious, labels_map = _checked(probs, spurious, labels_map, k_classes, grid)
    n, _, h, w = probs.shape
    order, cells = _cell_layout(h, w, grid)
    pixels = _pixel_weights(probs, labels_map, k_classes, hard, order)
    s = spurious.reshape(n, h * w)[:, order]
    totals = _cell_sums(pixels, cells)
    tables = _tables(totals, _cell_sums(pixels * s[:, None, None, :], cells))
    return pixels, s, cells, totals, tables


def _cross_sums(pixels: np.ndarray, s: np.ndarray, cells) -> np.ndarray:
    """(N, N, 2, strata, C): [m, n] sums image n's pixel weights over image m's S=1 pixels.

    One matrix product per cell gives every pairing at once, so each permutation of the null is
    a cheap gather; memory grows as N**2 * strata * grid**2.
    """
    n = len(pixels)
    flat = pixels.reshape(n * pixels.shape[1] * pixels.shape[2], -1)
    s = s.astype(np.float32)
    cross = [s[:, a:b] @ flat[:, a:b].T for a, b in cells]
    return np.stack(cross, axis=-1).reshape(n, *pixels.shape[:3], len(cells))


def s_global(
    probs, spurious, labels_map, *, k_classes=(1, 2), hard: bool = False, grid: int = 1
) -> float:
    """S_global in nats per pixel (see the module docstring for the estimator).

    probs (N, K, H, W) softmax; spurious (N, H, W) bool; labels_map (N, H, W) fine masks.
    """
    _, s, _, _, tables = _prepared(probs, spurious, labels_map, k_classes, hard, grid)
    return float(_per_class(tables.sum(axis=0), s.size).max())


def s_global_report(
    probs,
    spurious,
    labels_map,
    *,
    k_classes=(1, 2),
    hard: bool = False,
    grid: int = 1,
    n_boot: int = 200,
    n_perm: int = 100,
    seed: int = 0,
) -> dict:
    """S_global with its worst class, a bootstrap CI over images and a permutation null.

    Keys: value, class, per_class, ci_low, ci_high, null_mean, null_sd, null_p95, excess, unit,
    grid, hard, n_images. Numbers are plain Python floats/ints (JSON-able); nan where
    n_boot or n_perm is 0.
    """
    pixels, s, cells, totals, tables = _prepared(probs, spurious, labels_map, k_classes, hard, grid)
    n, n_pixels = len(s), s.size
    per_class = _per_class(tables.sum(axis=0), n_pixels)
    value = float(per_class.max())
    rng = np.random.default_rng(seed)

    # A resample of images is the per-image tables summed with their draw counts as weights.
    draws = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    boot = _per_class(np.tensordot(draws, tables, axes=1), n_pixels).max(axis=-1)
    ci_low, ci_high = np.percentile(boot, [2.5, 97.5]) if n_boot else (np.nan, np.nan)

    # Giving each image another image's S keeps S's layout and the model's behaviour but breaks
    # their link within images: what S_global reads from chance and estimator bias alone.
    null = np.empty(n_perm)
    if n_perm:
        cross = _cross_sums(pixels, s, cells)
        pooled_totals = totals.sum(axis=0)
        for i in range(n_perm):
            s_sums = cross[rng.permutation(n), np.arange(n)].sum(axis=0, dtype=float)
            null[i] = _per_class(_tables(pooled_totals, s_sums), n_pixels).max()
    null_mean = float(null.mean()) if n_perm else float("nan")
    return {
        "value": value,
        "class": int(k_classes[int(per_class.argmax())]),
        "per_class": {int(k): float(v) for k, v in zip(k_classes, per_class, strict=True)},
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "null_mean": null_mean,
        "null_sd": float(null.std()) if n_perm else float("nan"),
        "null_p95": float(np.percentile(null, 95)) if n_perm else float("nan"),
        "excess": value - null_mean,
        "unit": UNIT,
        "grid": int(grid),
        "hard": bool(hard),
        "n_images": int(n),
    }
