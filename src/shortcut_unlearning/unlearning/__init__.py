"""Unlearning operators, by name: a registry the command line and the plugin choose from."""

from .base import Operator, UnlearnData, UnlearnResult, unlearning_job
from .certified import CertifiedOperator, GradientClipping, ModelClipping
from .finetune import FineTune
from .neggrad_seg import NegGradSeg
from .relearn import Relearn

OPERATORS: dict[str, type[Operator]] = {
    Relearn.name: Relearn,
    NegGradSeg.name: NegGradSeg,
    FineTune.name: FineTune,
    GradientClipping.name: GradientClipping,
    ModelClipping.name: ModelClipping,
}

# The operators that give an (eps, delta) certificate.
CERTIFIED = tuple(name for name, op in OPERATORS.items() if issubclass(op, CertifiedOperator))
# The operators that end in a relearning, whose steps settings.OperatorSettings keeps apart.
RELEARNING = (*CERTIFIED, Relearn.name)


def make_operator(
    name: str,
    steps: int | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    **options,
) -> Operator:
    """An operator by name. For the certified ones the calibration fixes the noisy steps, so
    `steps` sets the fine-tuning after them (unless finetune_steps is given); epsilon and
    delta apply to them only."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; choose one of {sorted(OPERATORS)}")
    privacy = {k: v for k, v in (("epsilon", epsilon), ("delta", delta)) if v is not None}
    if name in CERTIFIED:
        options.update(privacy)
        if steps:
            options.setdefault("finetune_steps", steps)
    else:
        if privacy:
            raise ValueError(f"epsilon and delta apply to {' and '.join(CERTIFIED)} only")
        if steps:
            options["steps"] = steps
    return OPERATORS[name](**options)


__all__ = [
    "CERTIFIED",
    "OPERATORS",
    "RELEARNING",
    "CertifiedOperator",
    "FineTune",
    "GradientClipping",
    "ModelClipping",
    "NegGradSeg",
    "Operator",
    "Relearn",
    "UnlearnData",
    "UnlearnResult",
    "make_operator",
    "unlearning_job",
]
