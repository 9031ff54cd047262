"""NegGrad-Seg (docs/method.md, "NegGrad-Seg"): descend on retain pixels, ascend on forget pixels.

L = beta * mean_R CE(retain) - (1 - beta) * mean_F min(CE(forget, coarse label), clamp)

Separate means because forget pixels are few. The clamp bounds the ascent: once a forget
pixel's coarse class has probability exp(-clamp), pushing it further only damages the model.
Not certified; keeps utility.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Operator


@dataclass
class NegGradSeg(Operator):
    beta: float = 0.95
    forget_clamp: float = 2.3  # CE of ln(10): the coarse class down to 10 % probability

    name = "neggrad-seg"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")

    def loss(self, retain_ce: torch.Tensor, forget_ce: torch.Tensor) -> dict[str, torch.Tensor]:
        forget = (
            forget_ce.clamp(max=self.forget_clamp).mean() if forget_ce.numel() else retain_ce * 0
        )
        total = self.beta * retain_ce - (1 - self.beta) * forget
        return {"total": total, "retain": retain_ce.detach(), "forget": forget.detach()}
