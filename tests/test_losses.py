"""Focal loss and the sine-wave warmup schedule against the 1st place's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmrecall.training.losses import focal_loss, focal_loss_with_logits, sine_wave_scheduler, sine_wave_warmup


def fl(p: float, y: int, alpha: float = 1.0, gamma: float = 2.0) -> float:
    bce = -math.log(p) if y == 1 else -math.log(1 - p)
    return alpha * (1 - math.exp(-bce)) ** gamma * bce


@pytest.mark.parametrize("p,y", [(0.9, 1), (0.2, 0), (0.3, 1), (0.95, 0)])
@pytest.mark.parametrize("alpha,gamma", [(1.0, 2.0), (0.25, 2.0), (1.0, 0.5), (2.0, 3.0)])
def test_focal_loss_matches_hand_values(p, y, alpha, gamma):
    got = focal_loss(torch.tensor([p], dtype=torch.float64), torch.tensor([y]), alpha, gamma)
    assert got.item() == pytest.approx(fl(p, y, alpha, gamma), rel=1e-9)


def test_focal_loss_worked_examples():
    # p=0.9, y=1: BCE = -ln 0.9 = 0.1053605, p_t = 0.9, FL = 0.1^2 * BCE
    assert focal_loss(torch.tensor([0.9]), torch.tensor([1.0])).item() == pytest.approx(0.01 * 0.1053605, rel=1e-5)
    # p=0.2, y=0: BCE = -ln 0.8 = 0.2231436, p_t = 0.8, FL = 0.2^2 * BCE
    assert focal_loss(torch.tensor([0.2]), torch.tensor([0.0])).item() == pytest.approx(0.04 * 0.2231436, rel=1e-5)
    # mean over the batch
    both = focal_loss(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 0.0])).item()
    assert both == pytest.approx((0.01 * 0.1053605 + 0.04 * 0.2231436) / 2, rel=1e-5)


def test_gamma_zero_alpha_one_is_bce():
    torch.manual_seed(0)
    p, y = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01, (torch.rand(50) > 0.5).double()
    bce = F.binary_cross_entropy(p, y).item()
    assert focal_loss(p, y, alpha=1.0, gamma=0.0).item() == pytest.approx(bce, rel=1e-12)


def test_clamp_keeps_saturated_probabilities_finite():
    loss = focal_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(loss) and loss.item() > 10


def test_logits_version_equals_probability_version_with_gradients():
    torch.manual_seed(0)
    logits = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_()
    y = (torch.rand(64) > 0.5).double()
    a = focal_loss(torch.sigmoid(logits), y, 0.5, 2.0)
    b = focal_loss_with_logits(logits, y, 0.5, 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    assert torch.allclose(ga, gb, rtol=1e-8, atol=1e-14)


def test_logits_version_is_stable_at_extreme_logits():
    logits = torch.tensor([80.0, -80.0, 80.0, -80.0], requires_grad=True)
    loss = focal_loss_with_logits(logits, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert loss.item() == pytest.approx(80.0 / 2, rel=1e-6)  # two wrong ones: BCE = 80, p_t ~ 0


def f_ref(s: int, T: int, W: int, C: float = 6, A: float = 0.3) -> float:
    if s < W:
        return s / W
    p = (s - W) / (T - W)
    return abs((1 - p) * (1 + A * math.sin(2 * math.pi * C * p)))


def test_schedule_faithful_numbers():
    T = math.ceil(3_000_000 * 10 / 64)
    W = int(0.1 * T)
    assert (T, W) == (468_750, 46_875)
    mid = W + (T - W) // 2
    for s in [0, 1, W - 1, W, W + 1, mid, W + (T - W) // 24, T - 1, T, T + 1000]:
        assert sine_wave_warmup(s, T) == pytest.approx(f_ref(s, T, W), abs=1e-12)
    assert sine_wave_warmup(0, T) == 0.0
    assert sine_wave_warmup(W - 1, T) == pytest.approx((W - 1) / W)
    assert sine_wave_warmup(W, T) == 1.0
    assert sine_wave_warmup(mid, T) == pytest.approx(0.5, abs=1e-5)  # sin(6*pi) = 0
    assert sine_wave_warmup(T, T) == 0.0
    assert sine_wave_warmup(T + 1000, T) > 0  # abs() past T
    # peak of the first sine period: p = 1/24 -> (1 - 1/24) * 1.3
    assert sine_wave_warmup(W + (T - W) // 24, T) == pytest.approx((1 - 1 / 24) * 1.3, rel=1e-4)


def test_schedule_other_parameters():
    T = 1000
    for s in [0, 49, 50, 300, 999, 1000]:
        assert sine_wave_warmup(s, T, 0.05, 2, 0.5) == pytest.approx(f_ref(s, T, 50, 2, 0.5))


def test_lambda_lr_drives_adamw():
    T, base = 200, 1e-5
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=base, weight_decay=0.01)
    sched = sine_wave_scheduler(opt, T, warmup_ratio=0.1, cycles=6, amplitude=0.3)
    for s in range(T + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(base * f_ref(s, T, 20), abs=1e-18)
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
