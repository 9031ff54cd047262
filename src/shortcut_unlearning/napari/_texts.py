"""The words the dock shows: plain words on the controls, the technical term and a line of
explanation in the tooltips, and the legend of the layers' colours."""

from __future__ import annotations

from ._layers import BAND, BENIGN, FORGET, MALIGNANT

FORGET_AS_S = "the forget set"
# Plain words on the controls; the technical term and a line of explanation in the tooltip.
METHODS = {
    "relearn": (
        "Erase and relearn",
        "Reset the decoder and relearn it from your corrected masks and the pixels the other "
        "coarse masks are sure about, stopped on images held out of it. Exact unlearning of "
        "the decoder when the encoder never saw the coarse labels; no noise, no certificate.",
    ),
    "neggrad-seg": (
        "Correct and push away",
        "NegGrad-Seg: from the current model, learn the corrected masks while pushing the "
        "forget set away from its coarse label. Cleans the predicted lesions; on held-out "
        "data it left the diagnosis following the artefact. Not certified.",
    ),
    "finetune": (
        "Correct only",
        "Fine-tune the current model on the corrected masks, with no push on the forget set.",
    ),
    "gradient-clipping": (
        "Certified, gradient clip",
        "Koloskova et al.'s gradient clipping: noisy, clipped steps give an (epsilon, delta) "
        "certificate, then noise-free relearning.",
    ),
    "model-clipping": (
        "Erase with noise (certified)",
        "Koloskova et al.'s model clipping: the decoder's weights are clipped and drowned in "
        "noise until the (epsilon, delta) certificate holds, then relearnt without noise from "
        "your corrected masks. On held-out data it moved the diagnosis furthest from the "
        "artefact.",
    ),
}
SCOPES = {
    "decoder": "Decoder (default)",
    "head": "Last layer only",
    "all": "Whole network",
}
# The context term's modes (unlearning/context.py CONTEXT_TERMS), in plain words.
CONTEXTS = {
    "off": "Off (default)",
    "blind": "Learn filled-in copies",
    "consistent": "Match filled-in copies",
    "blind+consistent": "Both",
}
TIPS = {
    "context": "Context term (this project's, docs/method.md, 'The context term'; off is the "
    "paper's method): the refined images are also learnt with their erased pixels filled in "
    "from the skin around them (blind), or their prediction is held to that of the filled-in "
    "copy (consistent). It lowered band reliance in a benchmark, at some cost in Dice.",
    "artefacts": "S in S_global: the pixels that hold artefacts. Paint them on a Labels layer "
    "and pick it here, or use the forget set (what the coarse masks wrongly call lesion).",
    "scope": "Scope: which parameters unlearning may change; the rest stays frozen. The "
    "certificate covers the scope only.",
    "epsilon": "epsilon: the privacy budget of the certificate. Smaller is a stronger "
    "guarantee and more noise.",
    "delta": "delta: the probability the guarantee may fail. 1e-5 is usual.",
    "steps": "Optimiser steps. For the methods that relearn (Erase and relearn, the "
    "certified ones): the most relearning steps, stopped sooner once images held out of it "
    "stop improving; the certified methods' noisy phase comes before them.",
    "forget": "Forget set: the pixels the coarse masks call lesion and your refinement erased. "
    "Unlearning removes what the model learned from them.",
    "scores": "Lesion malignancy score per image: the mean malignant probability over the "
    "lesion the model predicts, before and after the run. Click a row to go to the image.",
    "details": "The numbers behind the verdict: S_global in nats per pixel, the 95% intervals "
    "and chance levels, Dice, and the certificate where there is one.",
    "scale": "Saliency is drawn in percent of a scale: by default each image's own (the "
    "99th percentile of its before and after maps), so every image's map shows and its two "
    "halves compare; checked, one scale for all images, so images compare with each other.",
    "preview": "The numbers behind the preview: the noise, the parameters it covers, the "
    "full certificate and its warnings.",
}


def legend_html() -> str:
    """The dock's legend, in the layers' colours."""

    def swatch(colour: str, text: str) -> str:
        return f"<span style='color:{colour}'>&#9632;</span>&nbsp;{text}"

    return (
        f"{swatch(BENIGN, 'benign lesion')} &nbsp; {swatch(MALIGNANT, 'malignant lesion')}"
        f"<br>{swatch(FORGET, 'forget set: erased from a coarse mask')}"
        f"<br>{swatch(BAND, 'band of the image to refine next')}"
        "<br>Outlines: the model's predicted lesion. Heat: saliency of the malignant score "
        "(the colour bar shows its scale). Left: before, right: after unlearning."
    )


def method_label(name: str) -> str:
    return METHODS.get(name, (name, ""))[0]


# The phases a run's progress line names (a plain operator's phase is its method's name).
PHASES = {"noisy": "noisy steps", "fine-tune": "relearning"}


def phase_label(phase: str) -> str:
    return PHASES.get(phase) or method_label(phase)
