"""Unlearning operators, by name: a registry the command line and the plugin choose from."""

from .base import Operator, UnlearnData, UnlearnResult
from .certified import GradientClipping, ModelClipping
from .finetune import FineTune
from .neggrad_seg import NegGradSeg

OPERATORS: dict[str, type[Operator]] = {
    NegGradSeg.name: NegGradSeg,
    FineTune.name: FineTune,
    GradientClipping.name: GradientClipping,
    ModelClipping.name: ModelClipping,
}

__all__ = [
    "OPERATORS",
    "FineTune",
    "GradientClipping",
    "ModelClipping",
    "NegGradSeg",
    "Operator",
    "UnlearnData",
    "UnlearnResult",
]
