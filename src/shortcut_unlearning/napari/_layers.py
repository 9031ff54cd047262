"""How the plugin's layers look, and the result layers it owns (thin; no policy).

Colours are fixed so a legend can name them: benign green, malignant red (as in the
project's figures), the forget set yellow on top, saliency in inferno with a colour bar.
"""

from __future__ import annotations

import weakref

import numpy as np

from .. import display

RESULT = "shortcut_unlearning_result"  # metadata flag of the layers this plugin owns
BENIGN, MALIGNANT, FORGET = "#2ca02c", "#d62728", "#ffd400"
AFTER_GAP = 1.06  # the "after" copy sits this many image widths to the right
# The refined masks' fill lets 65% of the image through (napari's 0.7 hid the lesion's edge
# and strokes along it erased lesion); the forget set lets 40% through.
REFINED_OPACITY, FORGET_OPACITY = 0.35, 0.6


def class_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: BENIGN, 2: MALIGNANT}
    )


def forget_colormap():
    from napari.utils.colormaps import Colormap

    return Colormap([[0, 0, 0, 0], [1, 0.83, 0, 1]], name="forget set", interpolation="zero")


def band_colormap():
    from napari.utils.colormaps import Colormap

    return Colormap([[0, 0, 0, 0], [0, 0.9, 1, 0.45]], name="band", interpolation="zero")


def saliency_colormap():
    """inferno, transparent where attribution is weak: the image stays readable under it."""
    from matplotlib import colormaps
    from napari.utils.colormaps import Colormap

    colours = colormaps["inferno"](np.linspace(0, 1, 256))
    colours[:, 3] = np.clip((np.linspace(0, 1, 256) - 0.1) * 2, 0, 0.85)  # weakest tenth: clear
    return Colormap(colours, name="saliency")


SALIENCY_LAYER, PREDICTION_LAYER, AFTER_IMAGES = "saliency", "predicted lesion", "images (after)"
SUGGESTED_BAND = "band to refine"
BAND = "#00e5ff"  # cyan: the band of the image suggested next


def after_offset(width: int) -> int:
    """Columns from an image's left edge to its "after" copy on the right."""
    return round(width * AFTER_GAP)


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(N, H, W) before and after maps in one (N, H, offset + W) array, zero between them:
    one layer shows both halves, so showing results adds one layer where it took two."""
    n, height, width = before.shape
    offset = after_offset(width)
    out = np.zeros((n, height, offset + width), np.result_type(before, after))
    out[..., :width] = before
    out[..., offset:] = after
    return out


def saliency_panels(record, per_image: bool) -> np.ndarray:
    """Before | after saliency in percent of each map's top, or of one top for every map
    (display.saliency_scales): the colour scale runs from 0 to 100."""
    before, after = record.before, record.after
    scales = display.saliency_scales(before.saliency_tops, after.saliency_tops, per_image)
    return side_by_side(
        display.as_percent(before.saliency, scales[0]),
        display.as_percent(after.saliency, scales[1]),
    )


def result_layer(viewer, name: str):
    """This plugin's own result layer `name`, or None (never a layer the user made)."""
    return next(
        (layer for layer in viewer.layers if layer.name == name and layer.metadata.get(RESULT)),
        None,
    )


def update_result_layer(layer, data, style: dict) -> None:
    """Show new data in a result layer already on the canvas."""
    layer.data = data
    for key in ("translate", "contrast_limits", "contour"):
        if key in style:
            setattr(layer, key, style[key])
    layer.visible = True


def make_result_layer(name: str, data, kind: str, **style):
    """A new result layer, not yet on the canvas: napari's layer model only, no Qt or vispy."""
    from napari.layers import Image, Labels

    contour = style.pop("contour", 0)  # a Labels property, not a constructor argument
    if kind == "labels":  # given when made: set afterwards, the layer is drawn twice
        style["colormap"] = class_colormap()
    layer = (Image if kind == "image" else Labels)(
        data, name=name, metadata={RESULT: True}, **style
    )
    if contour:
        layer.contour = contour
    return layer


def set_result_layer(viewer, name: str, data, kind: str, **style):
    """Update this plugin's own result layer `name`, or add it."""
    layer = result_layer(viewer, name)
    if layer is None:
        viewer.layers.append(make_result_layer(name, data, kind, **style))
    else:
        update_result_layer(layer, data, style)


SALIENCY_WORDS = "saliency_words"  # the canvas text under the colour bar


def show_colorbar(viewer, name: str, position: str, words: str) -> None:
    """The colour bar of this plugin's result layer `name`, with `words` under it saying what
    its numbers mean (napari's colour bar has numbers only); both go with the layer. Its own
    step: napari takes about 100 ms to make a colour bar, as long as adding the layer."""
    from napari.components.overlays import TextOverlay

    layer = viewer.layers[name]
    layer.colorbar.visible = True
    layer.colorbar.position = position
    overlays = viewer.canvas.overlays
    if SALIENCY_WORDS not in overlays:
        overlays[SALIENCY_WORDS] = TextOverlay(position=position, font_size=10)
    if layer not in _CAPTIONED:
        _CAPTIONED.add(layer)
        layer.events.visible.connect(lambda event: set_caption(viewer, event.source.visible))
    set_caption(viewer, layer.visible, words)


_CAPTIONED = weakref.WeakSet()  # layers whose visibility the caption follows


def set_caption(viewer, visible: bool, words: str | None = None) -> None:
    """Show or hide the colour bar's words (and change them)."""
    overlays = viewer.canvas.overlays
    if SALIENCY_WORDS in overlays:
        caption = overlays[SALIENCY_WORDS]
        caption.visible = visible
        if words is not None:
            caption.text = words


def mirror_name(layer) -> str:
    return f"{layer.name} (after)"


def make_mirror(layer, offset: int):
    """A copy of the overlay `layer` (the refined masks, the forget set...) over the "after"
    half, `offset` columns to its right: the same data, not copied, and the same look."""
    from napari.layers import Labels

    if isinstance(layer, Labels):  # made with the class colours, as the refined layer
        mirror = make_result_layer(mirror_name(layer), layer.data, "labels")
    else:
        style = {"colormap": layer.colormap, "contrast_limits": layer.contrast_limits}
        mirror = make_result_layer(mirror_name(layer), layer.data, "image", **style)
    follow(layer, mirror, offset)
    return mirror


LOOK = ("visible", "opacity", "blending", "contour")  # what a mirror copies (contour: Labels)


def follow(layer, mirror, offset: int) -> None:
    """`mirror` shows the overlay `layer` as it is now: its data (edited in place or
    replaced), its look, over the "after" half."""
    if mirror.data is not layer.data:
        mirror.data = layer.data
    elif mirror.visible:
        mirror.refresh()
    for attribute in LOOK:
        value = getattr(layer, attribute, None)
        if value is not None and getattr(mirror, attribute) != value:
            setattr(mirror, attribute, value)
    if tuple(mirror.translate[-1:]) != (offset,):
        mirror.translate = (0, 0, offset)


def remove_result_layers(viewer, keep=()) -> None:
    """Take this plugin's result layers off the canvas (the forget set and `keep` stay)."""
    for layer in [
        layer for layer in viewer.layers if layer.metadata.get(RESULT) and layer.name not in keep
    ]:
        viewer.layers.remove(layer)


def text_overlay(viewer):
    """The canvas text overlay (viewer.canvas.overlays.text since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.text if overlays is not None else viewer.text_overlay
