"""Synthetic dermoscopy with planted shortcuts.

Each image holds one lesion (benign or malignant) on shaded skin, and artefacts from the ISIC
catalogue (docs/method.md, "Data"), each with its exact pixel mask. The *spurious* artefacts are
painted inside the default coarse mask's dilation band (so a coarse mask labels them lesion;
`placement` puts them elsewhere, see PLACEMENTS) and follow the label: P(artefact | malignant)
= p and P(artefact | benign) = 1 - p in the train split, reversed in the test split, and
independent of it (1/2) in the optional "test_balanced" split (`balanced_test` images), whose
groups are large enough for a powered robustness measure. The others are nuisances at ISIC
prevalence, independent of the label.

Difficulty, fixed once from first principles rather than tuned to a result: each lesion has a
latent severity s ~ N(0.5 -/+ signal/2, 0.2) (benign/malignant) that drives border
irregularity, colour variegation and blue-grey areas. With the default signal 0.5 the
Bayes-optimal AUROC from s is Phi(0.5 / (0.2 sqrt 2)) = 0.96: the class signal is real but
noisy, while the planted artefact is a cleaner, easier cue (AUROC 0.9 on its own in train).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.stats import norm
from skimage.draw import bezier_curve, circle_perimeter, disk, polygon, polygon2mask

from .. import masks as masklib
from .lesion_set import ARTEFACTS, BENIGN, LesionSet, artefact_bit

# Share of ISIC 2018 images with each artefact (Bissoto et al. 2020); used for nuisances.
ISIC_PREVALENCE = {
    "dark_corner": 0.37,
    "hair": 0.58,
    "gel_border": 0.26,
    "gel_bubble": 0.49,
    "ruler": 0.50,
    "ink": 0.17,
    "patches": 0.07,
}
# Artefacts that can be painted inside the dilation band, hence serve as spurious.
BAND_ARTEFACTS = ("ink", "patches", "gel_bubble")
BAND_ZONES = ("any", "outer")
# Where the spurious artefacts go. "band": in the coarse mask's band (coarse_method), where the
# forget set of an exact refinement holds them all; the others do not flatter the method:
# "corner": in a corner of the lesion's box (the bbox coarse mask) outside the dilation band,
# so box masks call them lesion and dilated masks do not; "crossing": a strip across the
# lesion and past it (a ruler's edge or a hair over it), so the fine mask itself calls part of
# it lesion; "outside": near the lesion but outside every coarse mask kind, never labelled.
PLACEMENTS = ("band", "corner", "crossing", "outside")


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generator; the defaults are the benchmark's."""

    n: int = 600
    size: int = 128
    seed: int = 0
    p: float = 0.9  # P(spurious artefact | malignant) in train; reversed in test
    spurious: tuple[str, ...] = ("ink", "patches")
    class_signal: float = 0.5  # distance between the class means of the latent severity
    malignant_fraction: float = 0.5
    test_fraction: float = 0.3
    # Extra images, beyond n, in a "test_balanced" split where every spurious artefact is
    # independent of the label (present with probability 1/2): each artefact's aligned and
    # conflicting groups then hold about balanced_test / 2 images, against about (1 - p) of
    # the reversed test split in its aligned group.
    balanced_test: int = 0
    coarse_method: str = masklib.DEFAULT_COARSE_METHOD
    coarse_margin: float = masklib.DEFAULT_COARSE_MARGIN
    # The spurious artefacts' look: size against the defaults' (patch radius, ink dot and
    # stroke, bubble radius), how many are painted per image that carries one, and where in
    # the band: "any", or "outer" (farther from the lesion than half the band's width, where
    # a coarse mask's wrong pixels see less of the lesion). The defaults are the benchmark's.
    artefact_scale: float = 1.0
    artefact_count: int = 1
    band_zone: str = "any"
    placement: str = "band"  # one of PLACEMENTS
    # Lesion radius against the default's (12-20 % of the image side). Smaller lesions leave
    # the coarse mask's band a larger share of what it calls lesion.
    lesion_scale: float = 1.0

    def __post_init__(self):
        bad = [a for a in self.spurious if a not in BAND_ARTEFACTS]
        if bad:
            raise ValueError(
                f"spurious artefacts {bad} cannot be placed in the dilation band; "
                f"choose from {BAND_ARTEFACTS}"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.band_zone not in BAND_ZONES:
            raise ValueError(f"band_zone must be one of {BAND_ZONES}, got {self.band_zone!r}")
        if self.artefact_scale <= 0 or self.artefact_count < 1 or self.lesion_scale <= 0:
            raise ValueError(
                f"artefact_scale and lesion_scale must be positive and artefact_count at least "
                f"1, got {self.artefact_scale}, {self.lesion_scale} and {self.artefact_count}"
            )
        if self.balanced_test < 0:
            raise ValueError(f"balanced_test must be 0 or more, got {self.balanced_test}")
        if self.n < 1 or self.size < 32:
            raise ValueError(f"need n >= 1 and size >= 32 pixels, got n={self.n}, size={self.size}")
        for name in ("p", "malignant_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    @property
    def bayes_auroc(self) -> float:
        """AUROC of the ideal classifier that sees the latent severity."""
        return float(norm.cdf(self.class_signal / (SEVERITY_SD * np.sqrt(2))))


SEVERITY_SD = 0.2


def generate(config: SynthConfig | None = None, **overrides) -> LesionSet:
    """A synthetic LesionSet; deterministic in the config (seed included)."""
    cfg = SynthConfig(**{**(asdict(config) if config else {}), **overrides})
    rng = np.random.default_rng(cfg.seed)
    labels = (rng.random(cfg.n) < cfg.malignant_fraction).astype(np.int64)
    splits = np.full(cfg.n, "train", dtype=object)
    splits[rng.permutation(cfg.n)[: round(cfg.n * cfg.test_fraction)]] = "test"
    # The shortcut: spurious artefacts follow the label in train and oppose it in test.
    follows = (labels == 1) == (splits == "train")
    p_spurious = np.where(follows, cfg.p, 1 - cfg.p)
    present = {
        a: rng.random(cfg.n) < (p_spurious if a in cfg.spurious else ISIC_PREVALENCE[a])
        for a in ARTEFACTS
    }
    if cfg.balanced_test:  # drawn after the rest, so the first n images stay as they were
        extra = cfg.balanced_test
        labels = np.concatenate([labels, rng.random(extra) < cfg.malignant_fraction])
        labels = labels.astype(np.int64)
        splits = np.concatenate([splits, np.full(extra, "test_balanced", dtype=object)])
        for a in ARTEFACTS:
            chance = 0.5 if a in cfg.spurious else ISIC_PREVALENCE[a]
            present[a] = np.concatenate([present[a], rng.random(extra) < chance])
    total = cfg.n + cfg.balanced_test
    images, fine, artefacts = [], [], []
    for i in range(total):
        wanted = [a for a in ARTEFACTS if present[a][i]]
        img, mask, art = _render(cfg, int(labels[i]), wanted, np.random.default_rng([cfg.seed, i]))
        images.append(img)
        fine.append(mask)
        artefacts.append(art)
    artefacts = np.stack(artefacts)
    return LesionSet(
        ids=[f"synth_{cfg.seed}_{i:05d}" for i in range(total)],
        images=np.stack(images),
        masks=np.stack(fine),
        labels=labels,
        splits=splits.astype(str),
        # Flags record what is visible in the pixels (a band artefact can find no room).
        flags={a: (artefacts & artefact_bit(a)).any(axis=(1, 2)) for a in ARTEFACTS},
        artefacts=artefacts,
        source="synthetic",
        spurious=tuple(cfg.spurious),
    )


def _render(cfg: SynthConfig, label: int, wanted: list[str], rng: np.random.Generator):
    s = cfg.size
    img = _skin(s, rng)
    fine, severity = _lesion(cfg, label, rng)
    _paint_lesion(img, fine, severity, rng)
    mask = (fine * (BENIGN + label)).astype(np.uint8)
    coarse = masklib.coarse_mask(mask, cfg.coarse_method, cfg.coarse_margin)
    band = (coarse != 0) & ~fine
    zone = _spurious_zone(cfg, mask, band)
    art = np.zeros((s, s), np.uint8)
    for name in wanted:
        if name == "dark_corner":
            continue  # optical: applied last, over everything
        spurious = name in cfg.spurious
        for _ in range(cfg.artefact_count if spurious else 1):
            if spurious:  # the shortcut lives where the coarse mask wrongly says lesion
                shape, colour, opacity = PAINTERS[name](s, fine, zone, rng, cfg.artefact_scale)
                if cfg.placement == "crossing":  # the artefact's colour on a strip
                    shape = _crossing(fine, cfg.coarse_margin, rng, cfg.artefact_scale)
                shape &= zone
            else:
                shape, colour, opacity = PAINTERS[name](s, fine, band, rng)
            img[shape] = (1 - opacity) * img[shape] + opacity * np.asarray(colour)
            art[shape] |= artefact_bit(name)
    if "dark_corner" in wanted:
        factor = _vignette(s, rng)
        img *= factor[..., None]
        art[factor <= 0.9] |= artefact_bit("dark_corner")  # darkened by 10% or more
    img += rng.normal(0, 0.012, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask, art


def _spurious_zone(cfg: SynthConfig, mask: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Where the spurious artefacts of one image may be painted (see PLACEMENTS)."""
    if cfg.placement == "band":
        return _outer_band(mask != 0, band) if cfg.band_zone == "outer" else band
    if cfg.placement == "crossing":
        return np.ones(mask.shape, bool)
    coarse = {
        m: masklib.coarse_mask(mask, m, cfg.coarse_margin) != 0 for m in masklib.COARSE_METHODS
    }
    if cfg.placement == "corner":
        return coarse["bbox"] & ~coarse["dilate"]
    # "outside": off every coarse mask kind, within two margins of the nearest one
    anywhere = np.any(list(coarse.values()), axis=0)
    reach = 2 * max(masklib.radius_pixels(mask.shape, cfg.coarse_margin), 2)
    return ~anywhere & (distance_transform_edt(~anywhere) <= reach)


def _crossing(lesion: np.ndarray, margin: float, rng, scale: float = 1.0) -> np.ndarray:
    """A straight strip across the lesion, near its centre, reaching two margins past its far
    edge on both sides: a ruler's edge or a hair over the lesion."""
    s = lesion.shape[0]
    points = np.argwhere(lesion)
    centre = points.mean(0)
    reach = np.hypot(*(points - centre).T).max() + 2 * masklib.radius_pixels(lesion.shape, margin)
    angle = rng.uniform(0, np.pi)
    along = np.array([np.sin(angle), np.cos(angle)])
    across = np.array([-along[1], along[0]])
    middle = centre + across * rng.uniform(-0.3, 0.3) * reach  # not always through the centre
    half = max(0.75, s / 80) * scale
    corners = [middle + i * reach * along + j * half * across for i, j in RECTANGLE]
    rows, cols = np.array(corners).T
    shape = np.zeros(lesion.shape, bool)
    shape[polygon(rows, cols, shape=lesion.shape)] = True
    return shape


RECTANGLE = ((-1, -1), (1, -1), (1, 1), (-1, 1))  # corners in order around it


def _outer_band(lesion: np.ndarray, band: np.ndarray) -> np.ndarray:
    """The band's pixels farther from the lesion than half the band's width (the whole band
    where that leaves nothing)."""
    dist = distance_transform_edt(~lesion)
    outer = band & (dist > dist[band].max() / 2) if band.any() else band
    return outer if outer.any() else band


def smooth_field(shape: int | tuple[int, int], sigma: float, rng) -> np.ndarray:
    """Low-frequency noise scaled to [-1, 1], of an (s, s) or (h, w) shape."""
    shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
    field = gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return field / (np.abs(field).max() + 1e-12)


def _skin(s: int, rng) -> np.ndarray:
    tone = np.array([0.86, 0.66, 0.58]) + rng.normal(0, 0.03, 3)
    shading = 1 + 0.07 * smooth_field(s, s / 5, rng)
    texture = 0.02 * smooth_field(s, 1.5, rng)
    return np.clip(tone * shading[..., None] + texture[..., None], 0, 1)


def _lesion(cfg: SynthConfig, label: int, rng):
    """Lesion mask (bool) and latent severity; irregular border grows with severity."""
    s = cfg.size
    mean = 0.5 + (cfg.class_signal / 2) * (1 if label else -1)
    severity = float(np.clip(rng.normal(mean, SEVERITY_SD), 0, 1))
    radius = rng.uniform(0.12, 0.2) * s * cfg.lesion_scale
    band = masklib.radius_pixels((s, s), cfg.coarse_margin)
    # Random position, band inside the image: a centred lesion would be a shortcut of its own.
    lo, hi = radius * 1.3 + band + 1, s - radius * 1.3 - band - 1
    cy, cx = rng.uniform(lo, hi, 2) if hi > lo else (s / 2, s / 2)
    theta = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3):  # overall asymmetry
        r += rng.uniform(0, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 14):  # border irregularity
        r += severity * rng.uniform(0, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.6, 1.3)
    points = np.stack([cy + r * np.sin(theta), cx + r * np.cos(theta)], 1)
    return polygon2mask((s, s), points), severity


def _paint_lesion(img: np.ndarray, lesion: np.ndarray, severity: float, rng) -> None:
    s = img.shape[0]
    brown = np.array([0.50, 0.32, 0.22]) + rng.normal(0, 0.03, 3)
    dark = np.array([0.16, 0.09, 0.07])
    blue_grey = np.array([0.42, 0.47, 0.58])
    colour = np.broadcast_to(brown, img.shape).copy()
    # Variegation: dark patches whose extent grows with severity.
    mottle = (smooth_field(s, s / 24, rng) + 1) / 2
    weight = np.clip((mottle - (1 - severity)) * 2.5, 0, 1) * 0.9
    colour = colour * (1 - weight[..., None]) + dark * weight[..., None]
    # Blue-grey veil: present with probability equal to severity.
    if rng.random() < severity:
        veil = smooth_field(s, s / 20, rng) > 0.55 - 0.3 * severity
        colour[veil] = 0.4 * colour[veil] + 0.6 * blue_grey
    colour *= 1 + 0.05 * smooth_field(s, 1.0, rng)[..., None]
    alpha = gaussian_filter(lesion.astype(float), 0.8) * 0.92  # soft edge, faint translucency
    img[:] = img * (1 - alpha[..., None]) + colour * alpha[..., None]


def _vignette(s: int, rng) -> np.ndarray:
    """Multiplicative darkening of the corners (circular field stop of a dermatoscope)."""
    yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
    d = np.hypot(yy, xx) / (s / 2)
    start = rng.uniform(0.85, 1.05)
    ramp = np.clip((d - start) / 0.25, 0, 1)
    return 1 - rng.uniform(0.6, 0.9) * ramp**1.5


# Painters return (pixel mask, colour, opacity); masks are exact, painted pixels only.
def _ink(s, lesion, band, rng, scale=1.0):
    """Violet pen marks: dots or an arc around the lesion, inside the band."""
    shape = np.zeros((s, s), bool)
    ys, xs = np.nonzero(band)
    if len(ys) == 0:
        return shape, (0, 0, 0), 0.0
    dot = max(1.0, s / 90) * scale
    if rng.random() < 0.5:
        for k in rng.choice(len(ys), size=rng.integers(4, 9)):
            shape[disk((ys[k], xs[k]), dot, shape=(s, s))] = True
    else:
        # Arc along the middle of the band: band pixels about half-way out from the lesion.
        dist = distance_transform_edt(~lesion)
        mid = band & (np.abs(dist - dist[band].max() / 2) < dot)
        cy, cx = np.argwhere(lesion).mean(0)
        angle = np.arctan2(np.arange(s)[:, None] - cy, np.arange(s)[None, :] - cx)
        start, span = rng.uniform(-np.pi, np.pi), rng.uniform(np.pi / 2, 2 * np.pi)
        shape = mid & (np.mod(angle - start, 2 * np.pi) < span)
    colour = np.array([0.42, 0.18, 0.58]) + rng.normal(0, 0.04, 3)
    return shape, colour, rng.uniform(0.75, 0.95)


def _patches(s, lesion, band, rng, scale=1.0):
    """A coloured adhesive disc in the band."""
    shape = np.zeros((s, s), bool)
    ys, xs = np.nonzero(band)
    if len(ys) == 0:
        return shape, (0, 0, 0), 0.0
    k = rng.integers(len(ys))
    radius = max(2.0, s * rng.uniform(0.025, 0.035)) * scale
    shape[disk((ys[k], xs[k]), radius, shape=(s, s))] = True
    palette = [(0.2, 0.45, 0.85), (0.25, 0.7, 0.35), (0.95, 0.8, 0.2), (0.95, 0.5, 0.15)]
    return shape, palette[rng.integers(len(palette))], 0.9


def _gel_bubble(s, lesion, band, rng, scale=1.0):
    """Round bright rims, 2-12 px at 128 px; anywhere, or in the band when spurious."""
    shape = np.zeros((s, s), bool)
    pool = np.argwhere(band) if band.any() else np.argwhere(np.ones((s, s), bool))
    for _ in range(rng.integers(1, 5)):
        cy, cx = pool[rng.integers(len(pool))] if rng.random() < 0.5 else rng.integers(0, s, 2)
        radius = round(rng.uniform(2, 12) * s / 128 * scale)
        shape[circle_perimeter(int(cy), int(cx), max(radius, 2), shape=(s, s))] = True
    return shape, (0.97, 0.97, 0.97), 0.75


def _ruler(s, lesion, band, rng):
    """A light strip with black ticks along one edge."""
    width = max(4, round(s * rng.uniform(0.06, 0.09)))
    strip = np.zeros((s, s), bool)
    strip[:width] = True
    ticks = np.zeros((s, s), bool)
    step = max(3, round(s * 0.035))
    ticks[: width // 2, ::step] = True
    ticks[: width - 1, :: step * 5] = True
    k = rng.integers(4)
    strip, ticks = np.rot90(strip, k).copy(), np.rot90(ticks, k).copy()
    colour = np.where(ticks[..., None], 0.08, np.array([0.9, 0.9, 0.85]))
    return strip, colour[strip], 0.92


def _hair(s, lesion, band, rng):
    """Thin dark curves that may cross the lesion."""
    shape = np.zeros((s, s), bool)
    for _ in range(rng.integers(1, 7)):
        y0, x0, y1, x1, y2, x2 = rng.integers(-s // 4, s + s // 4, 6)
        rr, cc = bezier_curve(y0, x0, y1, x1, y2, x2, 1.0)
        keep = (rr >= 0) & (rr < s) & (cc >= 0) & (cc < s)
        shape[rr[keep], cc[keep]] = True
    if s >= 256:
        shape |= np.roll(shape, 1, axis=1)
    return shape, (0.14, 0.09, 0.07), 0.85


def _gel_border(s, lesion, band, rng):
    """A bright wobbling curve near one edge."""
    shape = np.zeros((s, s), bool)
    x = np.arange(s)
    offset = s * rng.uniform(0.04, 0.12)
    wobble = 0.03 * s * smooth_field(s, s / 12, rng)[0] * 3
    y = np.clip(np.round(offset + wobble), 0, s - 1).astype(int)
    shape[y, x] = True
    shape[np.clip(y + 1, 0, s - 1), x] = True
    return np.rot90(shape, rng.integers(4)).copy(), (0.96, 0.96, 0.92), 0.7


PAINTERS = {
    "ink": _ink,
    "patches": _patches,
    "gel_bubble": _gel_bubble,
    "ruler": _ruler,
    "hair": _hair,
    "gel_border": _gel_border,
}
