"""Functional attack cores shared by evaluation attacks and the training methods.

They never change the model's mode, touch only input gradients
(`torch.autograd.grad` w.r.t. delta, so no parameter `.grad` is written), and never
sync with the host, so a training step can call them at full speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learn2defend.errors import UserError

LOSSES = ("ce", "margin")


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample CW margin max_{t != y} z_t - z_y (positive = misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.amax(1) - true


def project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto {|delta| <= eps} ∩ {0 <= x + delta <= 1}.

    Both sets are per-pixel intervals that contain 0, so clamping to one and then the
    other is the exact projection onto their intersection.
    """
    return delta.clamp(-eps, eps).clamp(-x, 1 - x)


def _loss(logits: Tensor, labels: Tensor, loss: str) -> Tensor:
    # Summed, not averaged: each sample's gradient is then independent of the batch size.
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    return margin_loss(logits, labels).sum()


def pgd_delta(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    steps: int,
    step_size: float,
    random_start: bool = False,
    loss: str = "ce",
) -> Tensor:
    """l-inf PGD (sign-gradient ascent, projected after every step); returns detached delta.

    random_start draws delta uniformly from [-eps, eps] (then projected into the image
    box), as in Madry et al.; without it PGD starts at 0 like the paper's PGM.
    """
    if loss not in LOSSES:
        raise UserError(f"unknown attack loss {loss!r}; use one of {', '.join(LOSSES)}")
    x = x.detach()
    if random_start:
        delta = project(torch.empty_like(x).uniform_(-eps, eps), x, eps)
    else:
        delta = torch.zeros_like(x)
    with torch.enable_grad():  # callers may be inside torch.no_grad()
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(_loss(model(x + delta), y, loss), delta)
            delta = project(delta.detach() + step_size * grad.sign(), x, eps)
    return delta.detach()


def fgsm_delta(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    step_size: float | None = None,
    random_start: bool = False,
) -> Tensor:
    """FGSM = one PGD step of size eps; FGSM-RS (Wong et al.) = random start, step 1.25*eps."""
    step = eps if step_size is None else step_size
    return pgd_delta(model, x, y, eps, steps=1, step_size=step, random_start=random_start)
