"""Focal loss and the "sine wave with linear warmup" LR schedule of the 1st place.

    BCE = -[y log p + (1 - y) log(1 - p)],  p_t = exp(-BCE),  FL = alpha (1 - p_t)^gamma BCE

with alpha = 1, gamma = 2, mean over the batch; each step adds FL(s+, 1) + FL(s-, 0).
The multiplier of the base LR (T total steps, W = int(warmup_ratio T), C cycles, amplitude A):

    f(s) = s / W                                   for s < W
    f(s) = |(1 - p)(1 + A sin(2 pi C p))|,  p = (s - W) / (T - W)   otherwise
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-7


def _focal(bce: Tensor, alpha: float, gamma: float) -> Tensor:
    # 1 - p_t = 1 - exp(-BCE) = -expm1(-BCE): exact for confident predictions (BCE ~ 0).
    return (alpha * (-torch.expm1(-bce)) ** gamma * bce).mean()


def focal_loss(prob: Tensor, target: Tensor, alpha: float = 1.0, gamma: float = 2.0, eps: float = EPS) -> Tensor:
    """Focal loss on probabilities (the original's logits=False), mean over the batch.

    p is clamped to [eps, 1 - eps] so that log() stays finite when a sigmoid saturates.
    """
    p = prob.clamp(eps, 1.0 - eps)
    target = target.to(p.dtype)
    bce = -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p))
    return _focal(bce, alpha, gamma)


def focal_loss_with_logits(logits: Tensor, target: Tensor, alpha: float = 1.0, gamma: float = 2.0) -> Tensor:
    """Same loss as `focal_loss(sigmoid(logits), ...)`, computed stably from logits (no clamping)."""
    bce = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return _focal(bce, alpha, gamma)


def sine_wave_warmup(
    step: int, total_steps: int, warmup_ratio: float = 0.1, cycles: float = 6, amplitude: float = 0.3
) -> float:
    """LR multiplier f(step): linear warmup, then linear decay to 0 modulated by a sine."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return step / warmup
    p = (step - warmup) / max(1, total_steps - warmup)
    return abs((1.0 - p) * (1.0 + amplitude * math.sin(2.0 * math.pi * cycles * p)))


def sine_wave_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.1,
    cycles: float = 6,
    amplitude: float = 0.3,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR setting lr = base_lr * sine_wave_warmup(step); call .step() after each optimizer step."""
    f = functools.partial(
        sine_wave_warmup, total_steps=total_steps, warmup_ratio=warmup_ratio, cycles=cycles, amplitude=amplitude
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
