"""Fine-tune on the retain set: NegGrad-Seg with beta = 1 (no ascent on the forget set)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Operator


@dataclass
class FineTune(Operator):
    name = "finetune"

    def loss(self, retain_ce: torch.Tensor, forget_ce: torch.Tensor) -> dict[str, torch.Tensor]:
        forget = forget_ce.mean().detach() if forget_ce.numel() else retain_ce.detach() * 0
        return {"total": retain_ce, "retain": retain_ce.detach(), "forget": forget}
