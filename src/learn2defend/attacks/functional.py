"""Functional attack cores shared by evaluation attacks and the training methods.

They never change the model's mode, touch only input gradients
(`torch.autograd.grad` w.r.t. delta, so no parameter `.grad` is written), and never
sync with the host, so a training step can call them at full speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learn2defend.errors import UserError

from .threat import LINF, ThreatModel, threat_model

LOSSES = ("ce", "margin")


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample CW margin max_{t != y} z_t - z_y (positive = misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.amax(1) - true


def project(delta: Tensor, x: Tensor, eps: float, norm: str | ThreatModel | None = None) -> Tensor:
    """Project onto {||delta|| <= eps} ∩ {0 <= x + delta <= 1}; l-inf unless `norm` says
    otherwise (the threat model's `project`: learn2defend.attacks.threat).

    Under l-inf both sets are per-pixel intervals that contain 0, so clamping to one and
    then the other is the exact projection onto their intersection.
    """
    return threat_model(norm).project(delta, x, eps)


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
    start_std: float = 0.0,
    loss: str = "ce",
    init: Tensor | None = None,
    norm: str | ThreatModel | None = None,
) -> Tensor:
    """PGD (steepest ascent, projected after every step); returns detached delta.

    `norm` names the threat model (default l-inf: sign-gradient steps; l2: g/||g|| steps,
    learn2defend.attacks.threat).

    random_start draws delta uniformly from the ball (l-inf: [-eps, eps] per pixel, as in
    Madry et al.; then projected into the image box); start_std > 0 draws it from N(0, start_std^2) instead, as
    TRADES' and MART's reference code do (0.001); with neither PGD starts at 0 like the
    paper's PGM. Both draw from the global torch RNG; `init` (a delta shaped like x,
    projected here) replaces the drawn start, for callers that keep their own random
    streams (the evaluation attacks do).
    """
    if loss not in LOSSES:
        raise UserError(f"unknown attack loss {loss!r}; use one of {', '.join(LOSSES)}")
    threat = threat_model(norm)
    x = x.detach()
    start = _start(x, eps, random_start, start_std, threat) if init is None else threat.project(init.detach(), x, eps)
    return _ascend(model, x, lambda logits: _loss(logits, y, loss), eps, steps, step_size, start, threat)


def kl_pgd_delta(
    model: nn.Module, x: Tensor, eps: float, *, steps: int, step_size: float, start_std: float = 0.001,
    norm: str | ThreatModel | None = None,
) -> Tensor:
    """TRADES' inner maximisation: PGD on KL(p(x) || p(x + delta)), summed over the batch,
    from a small Gaussian start (at delta = 0 the KL and its gradient are exactly zero).
    The labels play no part: the attack moves the prediction away from the clean one."""
    x = x.detach()
    with torch.no_grad():
        target = F.log_softmax(model(x), dim=1)  # the clean prediction, fixed during the attack

    def kl(logits: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum", log_target=True)

    threat = threat_model(norm)
    return _ascend(model, x, kl, eps, steps, step_size, _start(x, eps, False, start_std, threat), threat)


def _start(x: Tensor, eps: float, uniform: bool, std: float, threat: ThreatModel = LINF) -> Tensor:
    if uniform:
        return threat.project(threat.start(x, eps), x, eps)
    if std > 0:
        return threat.project(std * torch.randn_like(x), x, eps)
    return torch.zeros_like(x)


def _ascend(
    model: nn.Module, x: Tensor, objective: Callable[[Tensor], Tensor], eps: float, steps: int,
    step_size: float, delta: Tensor, threat: ThreatModel = LINF,
) -> Tensor:
    """`steps` steepest-ascent steps (the threat model's `direction`) on
    objective(model(x + delta)), each projected.

    The direction is finite whatever the gradient (l-inf: a NaN component gives no step
    and an infinite one a full step), so delta stays finite whatever the model does."""
    with torch.enable_grad():  # callers may be inside torch.no_grad()
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x + delta)), delta)
            step = threat.direction(grad)
            delta = threat.project(delta.detach() + step_size * step, x, eps)
    return delta.detach()


def fgsm_delta(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    step_size: float | None = None,
    random_start: bool = False,
    init: Tensor | None = None,
    norm: str | ThreatModel | None = None,
) -> Tensor:
    """FGSM = one PGD step of size eps (under l2: FGM, one normalized-gradient step);
    FGSM-RS (Wong et al.) = random start, step 1.25*eps. `init`: a given start, as in `pgd_delta`."""
    step = eps if step_size is None else step_size
    return pgd_delta(model, x, y, eps, steps=1, step_size=step, random_start=random_start, init=init, norm=norm)
