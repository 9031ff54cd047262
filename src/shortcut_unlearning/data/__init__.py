"""Data: the LesionSet record, the synthetic generator and dataset folders."""

from .lesion_set import ARTEFACTS, CLASS_NAMES, LesionSet

__all__ = ["ARTEFACTS", "CLASS_NAMES", "LesionSet"]
