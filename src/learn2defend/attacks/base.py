"""Attack objects: `attack(model, images, labels) -> adversarial images`, torchattacks style."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from learn2defend.errors import UserError

from .functional import LOSSES, fgsm_delta, pgd_delta


def check_eps(eps: float) -> float:
    """eps is an l-inf radius in pixel units, so it must lie in [0, 1]."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
        raise UserError(f"eps must be a number in [0, 1] (pixel units, e.g. 8/255), got {eps!r}")
    return float(eps)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_step_size(step_size: float) -> float:
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not (math.isfinite(step_size) and step_size > 0)
    ):
        raise UserError(f"step_size must be a positive number, got {step_size!r}")
    return float(step_size)


class Attack:
    """Base class: subclasses implement `perturb(model, images, labels)`.

    `__call__` runs the attack with the model in eval mode (BatchNorm/dropout must not
    react to adversarial batches), then restores every module's mode and every
    parameter's `.grad` exactly as they were, so it is safe to call mid-training.
    """

    name = "attack"

    def __init__(self, eps: float) -> None:
        self.eps = check_eps(eps)

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise UserError("attack inputs must be images in [0, 1]")
        if self.eps == 0:  # the ball is one point: every attack returns the images themselves
            return images.detach().clone()
        modes = [(m, m.training) for m in model.modules()]
        params = list(model.parameters())
        grads = [p.grad for p in params]
        for p in params:  # some attacks (AutoAttack's FAB) call .backward(): keep it off ours
            p.grad = None
        model.eval()
        try:
            adv = self.perturb(model, images.detach(), labels.detach())
        finally:
            for m, training in modes:
                m.training = training
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        return adv.detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, eps={self.eps:g})"


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al.): one signed step of size eps."""

    def __init__(
        self, eps: float, *, step_size: float | None = None, random_start: bool = False
    ) -> None:
        super().__init__(eps)
        self.step_size = None if step_size is None else _check_step_size(step_size)
        self.random_start = bool(random_start)
        self.name = "fgsm"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        delta = fgsm_delta(
            model,
            images,
            labels,
            self.eps,
            step_size=self.step_size,
            random_start=self.random_start,
        )
        return (images + delta).clamp(0, 1)


class PGD(Attack):
    """l-inf PGD (Madry et al.) with the CE or the CW margin loss, optionally restarted.

    With restarts > 1 each sample keeps the first restart that fools the model (or the
    last one if none does), so a success is never overwritten by a later failure.
    """

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        name: str | None = None,
    ) -> None:
        super().__init__(eps)
        self.steps = _check_positive_int("steps", steps)
        self.restarts = _check_positive_int("restarts", restarts)
        if loss not in LOSSES:
            raise UserError(f"unknown attack loss {loss!r}; use one of {', '.join(LOSSES)}")
        # Madry's rule: 2.5 * eps / steps lets a step-size-limited walk reach and move along
        # the boundary of the ball within the budget.
        self.step_size = (
            2.5 * self.eps / self.steps if step_size is None else _check_step_size(step_size)
        )
        self.random_start = bool(random_start)
        self.loss = loss
        self.name = name or f"{'cwpgd' if loss == 'margin' else 'pgd'}{self.steps}"

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        best = None
        fooled = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        for _ in range(self.restarts):
            delta = pgd_delta(
                model,
                images,
                labels,
                self.eps,
                steps=self.steps,
                step_size=self.step_size,
                random_start=self.random_start,
                loss=self.loss,
            )
            if self.restarts == 1:
                return (images + delta).clamp(0, 1)
            with torch.no_grad():
                wrong = model(images + delta).argmax(1) != labels
            keep = ~fooled.view(-1, *[1] * (images.dim() - 1))
            best = delta if best is None else torch.where(keep, delta, best)
            fooled |= wrong
            if bool(fooled.all()):
                break
        return (images + best).clamp(0, 1)

    def __repr__(self) -> str:
        return (
            f"PGD(name={self.name!r}, eps={self.eps:g}, steps={self.steps}, "
            f"step_size={self.step_size:g}, random_start={self.random_start}, "
            f"restarts={self.restarts}, loss={self.loss!r})"
        )
