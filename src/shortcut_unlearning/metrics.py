"""Evaluation metrics: image AUROC by average pixel pooling, Dice, and S_global.

Conventions: ``probs`` are softmax outputs of shape (N, K, H, W) with classes 0 background,
1 benign, 2 malignant; fine masks / label maps are (N, H, W) ints of those classes.

S_global (docs/method.md, "Global Spurious Mutual Information, S_global") measures how much
the model's predicted foreground is explained by the spurious map S beyond the true labels::

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
  Only S=1 pixels enter the null: where S is sparse (artefacts) each permutation gathers the
  partners' S pixels; where it is dense (the band) one matrix product per cell pairs all images
  (memory N**2 * 4 * grid**2 floats) and each permutation is a gather of those sums.

Every sum is computed image by image in small chunks, so no array of all pixels is built:
S_global of 1,000 images of 256 x 256 takes under a second on the 2-core CPU machine
(benchmarks/BENCHMARKS.md, "Time to shortcut removal, and the cost of S_global").
"""

from __future__ import annotations

import numpy as np
from scipy.special import entr
from sklearn.metrics import roc_auc_score

from .data.lesion_set import BENIGN, MALIGNANT

UNIT = "nats per pixel"


# --- Classification by average pixel pooling (docs/method.md, same title) ---


def image_scores(probs, k: int = MALIGNANT) -> np.ndarray:
    """(N,) image scores: the mean over all pixels of the probability of class k."""
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape (N, K, H, W), got {probs.shape}")
    return probs[:, k].mean(axis=(1, 2))


def lesion_probabilities(probs) -> np.ndarray:
    """(N, 2) the benign and malignant probabilities pooled (averaged) over each image's
    predicted lesion (argmax not background); nan for an image with no lesion predicted.
    Column 1 is the per-lesion malignancy score; the larger column is the lesion's class."""
    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape (N, K, H, W), got {probs.shape}")
    lesion = probs.argmax(axis=1) != 0
    pixels = lesion.sum(axis=(1, 2))
    pooled = np.stack(
        [(probs[:, k] * lesion).sum(axis=(1, 2)) for k in (BENIGN, MALIGNANT)], axis=1
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pixels[:, None] > 0, pooled / pixels[:, None], np.nan)


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
    """I(S; Y) when S=1 never meets Y=1: a = P(S=1), b = P(Y=1 | S=0) (the S_global section of
    docs/method.md)."""
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


# --- S_global (docs/method.md, "Global Spurious Mutual Information, S_global") ---


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
    return probs, spurious.astype(bool, copy=False), labels_map


def _bands(size: int, grid: int) -> np.ndarray:
    """(grid, size) float32 indicator of the grid's nearly equal bands (np.array_split)."""
    bands = np.zeros((grid, size), np.float32)
    for i, index in enumerate(np.array_split(np.arange(size), grid)):
        bands[i, index] = 1
    return bands


def _pixel_cells(h: int, w: int, grid: int) -> np.ndarray:
    """(H*W,) each pixel's cell: row band * grid + column band."""
    rows, cols = _bands(h, grid).argmax(axis=0), _bands(w, grid).argmax(axis=0)
    return (rows[:, None] * grid + cols[None, :]).ravel()


# Images are handled a few at a time, about this many pixels, so temporaries stay in cache.
_CHUNK_PIXELS = 2**16


def _chunks(n: int, h: int, w: int, scale: int = 1):
    step = max(1, scale * _CHUNK_PIXELS // (h * w))
    return (slice(start, min(start + step, n)) for start in range(0, n, step))


def _weight_planes(probs, labels_map, ks, hard, out=None) -> np.ndarray:
    """(c, 2, strata, H, W) float32 pixel weights [p_k, p_k Y_k] of a few images."""
    c, _, h, w = probs.shape
    planes = np.empty((c, 2, len(ks), h, w), np.float32) if out is None else out
    pred = probs.argmax(axis=1) if hard else None
    for j, k in enumerate(ks):
        planes[:, 0, j] = pred == k if hard else probs[:, k]
    np.multiply(planes[:, 0], labels_map[:, None] == ks[:, None, None], out=planes[:, 1])
    return planes


def _image_sums(probs, spurious, labels_map, ks, hard, grid) -> tuple[np.ndarray, np.ndarray]:
    """Each image's (N, 2, strata, C) float64 sums of the pixel weights [p_k, p_k Y_k] per
    cell, over all its pixels (totals) and over its pixels where S=1 (s_sums). A chunk's
    bands are summed with two small matrix products."""
    n, _, h, w = probs.shape
    rows, cols = _bands(h, grid), _bands(w, grid).T
    sums = np.empty((2, n, 2, len(ks), grid * grid))
    buffer = None
    for part in _chunks(n, h, w):
        if buffer is None or len(buffer[0]) != part.stop - part.start:
            buffer = np.empty((2, part.stop - part.start, 2, len(ks), h, w), np.float32)
        _weight_planes(probs[part], labels_map[part], ks, hard, out=buffer[0])
        np.multiply(buffer[0], spurious[part][:, None, None], out=buffer[1])
        cells = rows @ buffer @ cols  # (2, c, 2, strata, grid, grid)
        sums[:, part] = cells.reshape(*cells.shape[:-2], -1)
    return sums[0], sums[1]


def _tables(totals: np.ndarray, s_sums: np.ndarray) -> np.ndarray:
    """(..., strata, C, 2, 2) tables over (S, Y_k) from (..., 2, strata, C) sums of the pixel
    weights [p_k, p_k Y_k] over all pixels (totals) and over the pixels where S=1 (s_sums)."""
    totals = np.broadcast_to(totals, np.broadcast_shapes(totals.shape, s_sums.shape))
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
    """The checked inputs, the strata as an array, each image's (N, 2, strata, C) weight
    totals and its (N, strata, C, 2, 2) tables."""
    probs, spurious, labels_map = _checked(probs, spurious, labels_map, k_classes, grid)
    ks = np.asarray(k_classes)
    totals, s_sums = _image_sums(probs, spurious, labels_map, ks, hard, grid)
    return probs, spurious, labels_map, ks, totals, _tables(totals, s_sums)


def _null_s_sums(probs, spurious, labels_map, ks, hard, grid, pairing) -> np.ndarray:
    """(P, 2, strata, C) sums of the pixel weights [p_k, p_k Y_k] over S=1 per cell when, in
    each of P pairings, image j's predictions and labels meet the S of image pairing[p, j].

    Two ways to the same sums, the cheaper one taken: gathering each image's partners' S
    pixels costs about P times the S pixels; one matrix product per cell over all image
    pairs costs N**2 times the pixels, at a far higher rate (costs measured on a 2-core CPU).
    """
    n, _, h, w = probs.shape
    gather_cost = 600 * len(pairing) * np.count_nonzero(spurious)
    if gather_cost < n * n * h * w * len(ks):
        return _null_by_gathering(probs, spurious, labels_map, ks, hard, grid, pairing)
    return _null_by_products(probs, spurious, labels_map, ks, hard, grid, pairing)


def _null_by_gathering(probs, spurious, labels_map, ks, hard, grid, pairing) -> np.ndarray:
    """_null_s_sums for sparse S: image j's weights gathered at its partners' S pixels."""
    n, k_all, h, w = probs.shape
    cells = grid * grid
    cell_of = _pixel_cells(h, w, grid)
    by_cell = np.argsort(cell_of, kind="stable")
    # each image's S pixels in cell order, and how many of them each cell holds
    s_pixels = [by_cell[np.flatnonzero(s[by_cell])] for s in spurious.reshape(n, -1)]
    counts = np.array([np.bincount(cell_of[p], minlength=cells) for p in s_pixels])
    out = np.zeros((len(pairing), cells, 2 * len(ks)))
    for j in range(n):
        partners = pairing[:, j]
        at = np.concatenate([s_pixels[m] for m in partners])
        if not len(at):
            continue
        plane = probs[j].reshape(k_all, -1)
        gathered = np.empty((2, len(ks), len(at)))  # image j's [p_k, p_k Y_k] at those pixels
        if hard:
            gathered[0] = np.take(plane.argmax(axis=0), at) == ks[:, None]
        else:  # rounded to float32 like the per-image sums, summed in float64
            gathered[0] = np.stack([np.take(plane[k], at) for k in ks]).astype(np.float32)
        np.multiply(gathered[0], np.take(labels_map[j], at) == ks[:, None], out=gathered[1])
        # one run of gathered pixels per (pairing, cell); empty runs sum to zero
        lengths = counts[partners].ravel()
        full = np.flatnonzero(lengths)
        starts = (np.cumsum(lengths) - lengths)[full]
        sums = np.add.reduceat(gathered.reshape(-1, len(at)), starts, axis=1)
        out.reshape(-1, out.shape[-1])[full] += sums.T
    return out.reshape(len(pairing), cells, 2, len(ks)).transpose(0, 2, 3, 1)


def _null_by_products(probs, spurious, labels_map, ks, hard, grid, pairing) -> np.ndarray:
    """_null_s_sums for dense S: every image's S against every image's weights, one matrix
    product per cell (memory N**2 * 2 * strata * grid**2 floats), then a gather per pairing."""
    n, _, h, w = probs.shape
    cell_of = _pixel_cells(h, w, grid)
    order = np.argsort(cell_of, kind="stable")  # makes each cell's pixels contiguous
    stops = np.cumsum(np.bincount(cell_of, minlength=grid * grid))
    cells = list(zip([0, *stops[:-1]], stops, strict=True))
    s = spurious.reshape(n, -1)[:, order].astype(np.float32)
    cross = np.empty((n, n, 2, len(ks), len(cells)), np.float32)
    for part in _chunks(n, h, w, scale=16):
        planes = _weight_planes(probs[part], labels_map[part], ks, hard)
        flat = planes.reshape(-1, h * w)[:, order]
        for c, (a, b) in enumerate(cells):
            cross[:, part, ..., c] = (s[:, a:b] @ flat[:, a:b].T).reshape(n, *planes.shape[:3])
    images = np.arange(n)
    return np.stack([cross[p, images].sum(axis=0, dtype=float) for p in pairing]).reshape(
        len(pairing), 2, len(ks), len(cells)
    )


def s_global(
    probs, spurious, labels_map, *, k_classes=(1, 2), hard: bool = False, grid: int = 1
) -> float:
    """S_global in nats per pixel (see the module docstring for the estimator).

    probs (N, K, H, W) softmax; spurious (N, H, W) bool; labels_map (N, H, W) fine masks.
    """
    *_, tables = _prepared(probs, spurious, labels_map, k_classes, hard, grid)
    return float(_per_class(tables.sum(axis=0), spurious.size).max())


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
    probs, spurious, labels_map, ks, totals, tables = _prepared(
        probs, spurious, labels_map, k_classes, hard, grid
    )
    n, n_pixels = len(spurious), spurious.size
    per_class = _per_class(tables.sum(axis=0), n_pixels)
    value = float(per_class.max())
    rng = np.random.default_rng(seed)

    # A resample of images is the per-image tables summed with their draw counts as weights.
    draws = rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(float)
    boot = _per_class(np.tensordot(draws, tables, axes=1), n_pixels).max(axis=-1)
    ci_low, ci_high = np.percentile(boot, [2.5, 97.5]) if n_boot else (np.nan, np.nan)

    # Giving each image another image's S keeps S's layout and the model's behaviour but breaks
    # their link within images: what S_global reads from chance and estimator bias alone.
    # Permutation i gives image j the S of image pairing[i, j].
    pairing = np.array([rng.permutation(n) for _ in range(n_perm)], int).reshape(n_perm, n)
    null = np.empty(n_perm)
    if n_perm:
        s_sums = _null_s_sums(probs, spurious, labels_map, ks, hard, grid, pairing)
        null = _per_class(_tables(totals.sum(axis=0), s_sums), n_pixels).max(axis=-1)
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
