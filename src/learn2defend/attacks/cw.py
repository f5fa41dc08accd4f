"""The paper's CW-linf attack (section 3.1, eq. 4), vectorized over the batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Attack, _check_positive_int, _check_step_size, correct_predictions
from .functional import margin_loss, project


class CWLinf(Attack):
    """min_delta ||delta||_inf + c * (z_y - max_{t != y} z_t)_+  over the eps ball.

    The paper writes the penalty as max_t (z_t - z_y)_+, which is zero exactly while the
    sample is still classified correctly; the intended CW penalty (and the one used here)
    is the margin by which the true class still wins, so minimizing it fools the model.

    Optimizer: Adam on delta, each step followed by the exact projection onto the eps ball
    and the image box (clamping). Adam rather than a reparametrization such as
    eps * tanh(w): clamping keeps delta = 0 reachable and exact (the attack starts at 0
    and a sample that is never updated keeps delta = 0), and the box constraint x + delta
    in [0, 1] needs clamping anyway.

    c tuning: Adam normalizes each pixel's step, so c only decides the balance on the
    pixels at the max |delta| (the only ones the l-inf term pulls on): small c keeps the
    perturbation small and spread out (least norm), large c lets the margin term push
    every pixel to the eps boundary. Every sample starts at c_init; every `c_every`
    iterations, samples that still resist get c *= c_factor (default 0.1 -> 1000 over
    five stages of 20 iterations). A sample is frozen at its first success (the paper
    stops there), so c never needs to come down again.

    Each sample stops once misclassified; at most `steps` (100) iterations in total.

    l-inf only (`norms`): its objective is the l-inf norm; under l2 `make_attack` refuses it.
    """

    norms = ("linf",)

    def __init__(
        self,
        eps: float,
        steps: int = 100,
        c_init: float = 0.1,
        c_factor: float = 10.0,
        c_every: int = 20,
        step_size: float | None = None,
        name: str = "cw",
    ) -> None:
        super().__init__(eps)
        self.steps = _check_positive_int("steps", steps)
        self.c_init = _check_step_size(c_init)
        self.c_factor = _check_step_size(c_factor)
        self.c_every = _check_positive_int("c_every", c_every)
        # Adam's learning rate (roughly the per-pixel step): 10 steps to cross the ball.
        self.step_size = self.eps / 10 if step_size is None else _check_step_size(step_size)
        self.name = name

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        x, y, eps = images, labels, self.eps
        view = (-1,) + (1,) * (x.dim() - 1)  # per-sample values broadcast over pixels
        delta = torch.zeros_like(x)
        m, v = torch.zeros_like(x), torch.zeros_like(x)  # Adam moments
        c = torch.full((len(y),), self.c_init, device=x.device, dtype=x.dtype)
        active = torch.ones(len(y), dtype=torch.bool, device=x.device)
        beta1, beta2 = 0.9, 0.999
        with torch.enable_grad():
            for t in range(1, self.steps + 1):
                if t > 1 and (t - 1) % self.c_every == 0:
                    c = torch.where(active, c * self.c_factor, c)
                delta.requires_grad_(True)
                logits = model(x + delta)
                active = active & correct_predictions(logits, y)  # freeze samples already fooled
                if not bool(active.any()):
                    break
                norm = delta.flatten(1).abs().amax(1)
                loss = (norm + c * (-margin_loss(logits, y)).clamp_min(0)).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                delta = delta.detach()
                a = active.view(view)
                m = torch.where(a, beta1 * m + (1 - beta1) * grad, m)
                v = torch.where(a, beta2 * v + (1 - beta2) * grad * grad, v)
                step = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + 1e-12)
                delta = torch.where(a, project(delta - self.step_size * step, x, eps), delta)
        return (x + delta.detach()).clamp(0, 1)

    def __repr__(self) -> str:
        return (
            f"CWLinf(name={self.name!r}, eps={self.eps:g}, steps={self.steps}, "
            f"c_init={self.c_init:g}, c_factor={self.c_factor:g}, c_every={self.c_every}, "
            f"step_size={self.step_size:g})"
        )
