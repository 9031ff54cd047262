"""Unlearning operators, by name: a registry the command line and the plugin choose from."""

from .base import Operator, UnlearnData, UnlearnResult
from .finetune import FineTune
from .neggrad_seg import NegGradSeg

OPERATORS: dict[str, type[Operator]] = {
    NegGradSeg.name: NegGradSeg,
    FineTune.name: FineTune,
}

__all__ = ["OPERATORS", "FineTune", "NegGradSeg", "Operator", "UnlearnData", "UnlearnResult"]
