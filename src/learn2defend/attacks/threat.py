"""Threat models: one record per norm (`THREAT_MODELS["linf"]`, `THREAT_MODELS["l2"]`).

A threat model says which perturbations delta an attacker may add to an image x in [0, 1]:
those with ||delta|| <= eps (its norm) and x + delta in [0, 1]. Every attack, every training
method and the sanity checks read from the record what depends on the norm: the projection
onto the ball intersected with the box, the steepest-ascent direction of one step, the random
start, how a learned attacker's raw output is mapped into the ball, the largest sensible eps
and the default eps per data set. Nothing else in the package tests the norm by name.

eps is in pixel units of [0, 1] images:
- l-inf: the largest change of any one pixel (8/255 is RobustBench's CIFAR-10 radius);
- l2: the Euclidean length of delta over all C x H x W values of one image (RobustBench's
  CIFAR-10 radius is 0.5; ImageNet's 3.0).

Per-data-set defaults (`ThreatModel.default_eps`):
- l-inf: the paper's 0.03 for CIFAR and 0.05 for SVHN, 0.2 on the 8x8 digits, 0.3 on MNIST
  (learn2defend.config.DEFAULT_EPS, unchanged);
- l2: 0.5 for every 32x32 RGB set (RobustBench's CIFAR-10 l2 radius) and any other data
  set, 2.0 on MNIST (the usual MNIST l2 radius), and 1.0 on the 8x8 digits, measured as the
  l-inf 0.2 was chosen (10 epochs, seed 0, PGD-10 on the 180 validation images): at l2 0.5 a
  plain net keeps 48 % and PGD-AT 79 % (the plain net is half robust already), at 1.0 plain
  keeps 0 % and PGD-AT 47 %, as at l-inf 0.2 (plain 0 %, PGD-AT 58 % under PGD-10:
  docs/results.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from learn2defend.errors import UserError, eps_range_error

NORMS = ("linf", "l2")


def _view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def l2_norms(delta: Tensor) -> Tensor:
    """Per-image Euclidean norms [N] of delta [N, ...], computed in float32 or wider."""
    return delta.flatten(1).to(torch.promote_types(delta.dtype, torch.float32)).norm(dim=1)


# ---- l-inf --------------------------------------------------------------------------------------


def linf_norms(delta: Tensor) -> Tensor:
    """Per-image largest absolute values [N] of delta [N, ...]."""
    return delta.flatten(1).abs().amax(1) if delta.numel() else delta.new_zeros(len(delta))


def _linf_ball(delta: Tensor, eps: float) -> Tensor:
    return delta.clamp(-eps, eps)


def _linf_project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """{|delta| <= eps} and {0 <= x + delta <= 1} are per-pixel intervals that contain 0, so
    clamping to one and then the other is the exact projection onto their intersection."""
    return delta.clamp(-eps, eps).clamp(-x, 1 - x)


def _linf_direction(grad: Tensor) -> Tensor:
    """sign(g); a NaN component gives no step (0), an infinite one a full step."""
    return torch.nan_to_num(grad.sign(), nan=0.0)


def _linf_within(adv: Tensor, images: Tensor, eps: float) -> Tensor:
    return torch.minimum(torch.maximum(adv, images - eps), images + eps).clamp(0, 1)


def _linf_start(x: Tensor, eps: float, noise: Callable[..., Tensor] | None = None) -> Tensor:
    """Uniform in the cube [-eps, eps]^d (Madry et al.), from the global RNG or from `noise()`
    (uniform in [-1, 1], shaped like x)."""
    if noise is None:
        return torch.empty_like(x).uniform_(-eps, eps)
    return eps * noise()


def _linf_squash(h: Tensor, eps: float | Tensor) -> Tensor:
    """The paper's attacker head: eps * tanh(h), per pixel."""
    return eps * torch.tanh(h)


# ---- l2 -----------------------------------------------------------------------------------------


def _l2_ball(delta: Tensor, eps: float) -> Tensor:
    """delta scaled down per image to norm eps where it is longer (torch.renorm's rule)."""
    norms = l2_norms(delta)
    factor = torch.where(norms > eps, eps / norms.clamp_min(1e-30), torch.ones_like(norms))
    return delta * _view(factor, delta).to(delta.dtype)


def _l2_project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Onto the l2 ball (scaled down per image), then clipped to the box [-x, 1 - x].

    This is what MadryLab's robustness (L2Step.project, then clamp to [0, 1]) and
    torchattacks (PGDL2) do; it is not the exact Euclidean projection onto the
    intersection, but its result always lies in both sets: clipping to the box moves every
    component toward 0 (the box contains 0), so it never lengthens delta. Projecting twice
    changes the result only by float rounding."""
    return _l2_ball(delta, eps).clamp(-x, 1 - x)


def _l2_direction(grad: Tensor) -> Tensor:
    """g / ||g||_2 per image: the steepest-ascent direction of the l2 ball.

    NaN components count as 0; an image with infinite components steps along their signs
    alone; an image whose gradient is 0 (after that) does not step. The gradient is first
    divided by its largest magnitude so that squaring it cannot overflow."""
    inf = torch.isinf(grad)
    finite = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    has_inf = _view(inf.flatten(1).any(1), grad)
    g = torch.where(has_inf, torch.where(inf, grad.sign(), torch.zeros_like(grad)), finite)
    peak = _view(g.flatten(1).abs().amax(1), g).clamp_min(1e-30)
    g = g / peak
    return g / _view(l2_norms(g), g).to(g.dtype).clamp_min(1e-12)


def _l2_within(adv: Tensor, images: Tensor, eps: float) -> Tensor:
    return (images + _l2_project(adv - images, images, eps)).clamp(0, 1)


def _l2_start(x: Tensor, eps: float, noise: Callable[..., Tensor] | None = None) -> Tensor:
    """Uniform in the l2 ball of radius eps: a uniform direction (a normalized Gaussian) times
    eps * U^(1/d), d = C*H*W (the textbook construction; torchattacks' PGDL2 takes eps * U,
    which crowds the start toward the centre, and robustness starts on the sphere). From the
    global RNG, or from `noise(tag)` (uniform in [-1, 1], shaped like x; the Gaussian by
    Box-Muller from two draws)."""
    d = x[0].numel() if len(x) else 1
    if noise is None:
        gauss = torch.randn_like(x)
        u = torch.rand(len(x), device=x.device, dtype=x.dtype)
    else:
        u1 = (noise("u1") + 1) / 2  # in [0, 1]
        u2 = (noise("u2") + 1) / 2
        gauss = torch.sqrt(-2 * torch.log(u1.clamp_min(1e-12))) * torch.cos(2 * math.pi * u2)
        u = ((noise("radius").flatten(1)[:, 0] + 1) / 2) if len(x) else torch.zeros(0).to(x)
    direction = gauss / _view(l2_norms(gauss), gauss).to(x.dtype).clamp_min(1e-12)
    return direction * _view(eps * u.clamp(0, 1) ** (1.0 / d), x).to(x.dtype)


def _l2_squash(h: Tensor, eps: float | Tensor) -> Tensor:
    """A learned attacker's raw output h into the l2 ball: eps * tanh(||h||) * h / ||h|| per
    image (a radial tanh: the direction is the network's, the length saturates at eps as the
    l-inf head's tanh saturates per pixel; smooth, and 0 maps to 0)."""
    norms = _view(l2_norms(h), h).to(h.dtype)
    return eps * torch.tanh(norms) * h / norms.clamp_min(1e-12)


# ---- the records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreatModel:
    """Everything that depends on the norm of the perturbation.

    name: "linf" or "l2" (the --norm value, stored in config.json and exports).
    label: how tables and results name it ("l-inf", "l2").
    pyautoattack_norm: pyautoattack.AutoAttack's `norm` ("Linf", "L2").
    ball(delta, eps): delta [N, C, H, W] onto the eps-ball alone.
    project(delta, x, eps): onto the ball intersected with {0 <= x + delta <= 1}.
    direction(grad): the steepest-ascent direction of one step (finite for any grad).
    start(x, eps, noise=None): a random start uniform in the ball (before the box);
      `noise(*tag)` gives uniform [-1, 1] noise shaped like x, else the global RNG is used.
    squash(h, eps): a learned attacker's raw output into the ball.
    norms(delta): per-image norms [N] of delta [N, C, H, W].
    within(adv, images, eps): adversarial images back into the ball and [0, 1] (the attacks'
      final guarantee; bit for bit a no-op under l-inf on images already there).
    gray_eps(d): the radius within which the all-gray image (0.5 everywhere) lies of every
      [0, 1] image of d values (l-inf 0.5, l2 0.5 sqrt(d)): an attack of that radius can
      map every image to the same one (the sanity checks' large_eps check).
    eps_max: the largest eps accepted (l-inf: 1, the whole pixel range; l2: sqrt of
      4096 x 4096 x 3 pixels, the largest image learn2defend takes).
    eps_help: what eps means, for --help and errors.
    eps_error(what, eps): the UserError for an eps out of range.
    defaults: the default eps per data-set name; `fallback` for any other data set.
    """

    name: str
    label: str
    pyautoattack_norm: str
    ball: Callable[[Tensor, float], Tensor]
    project: Callable[[Tensor, Tensor, float], Tensor]
    direction: Callable[[Tensor], Tensor]
    start: Callable[..., Tensor]
    squash: Callable[[Tensor, float | Tensor], Tensor]
    within: Callable[[Tensor, Tensor, float], Tensor]
    norms: Callable[[Tensor], Tensor]
    gray_eps: Callable[[int], float]
    eps_max: float
    eps_help: str
    eps_error: Callable[[str, object], UserError]
    defaults: dict[str, float] = field(default_factory=dict)
    fallback: float = 0.03

    def default_eps(self, dataset: str) -> float:
        """The default radius for a data-set name ("digits", "cifar10", "folder:..." ...)."""
        return self.defaults.get(dataset.split(":", 1)[0], self.fallback)

    def check_eps(self, eps: object, what: str = "eps") -> float:
        """eps as a float; UserError (`eps_error`) unless it is a number in [0, eps_max]."""
        if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                or not 0 <= eps <= self.eps_max):
            raise self.eps_error(what, eps)
        return float(eps)


LINF = ThreatModel(
    name="linf", label="l-inf", pyautoattack_norm="Linf", ball=_linf_ball, project=_linf_project,
    direction=_linf_direction, start=_linf_start, squash=_linf_squash, within=_linf_within, norms=linf_norms,
    gray_eps=lambda d: 0.5,
    eps_max=1.0,
    eps_help="the largest change of one pixel, in [0, 1] units, e.g. 8/255", eps_error=eps_range_error,
    defaults={"digits": 0.2, "mnist": 0.3, "svhn": 0.05}, fallback=0.03,
)
def _l2_eps_error(what: str, eps: object) -> UserError:
    return UserError(f"{what} must be an l2 radius in [0, {L2.eps_max:g}] (the Euclidean length of the "
                     f"perturbation over an image's values, e.g. 0.5), got {eps!r}")


L2 = ThreatModel(
    name="l2", label="l2", pyautoattack_norm="L2", ball=_l2_ball, project=_l2_project,
    direction=_l2_direction, start=_l2_start, squash=_l2_squash, within=_l2_within, norms=l2_norms,
    gray_eps=lambda d: 0.5 * math.sqrt(d),
    eps_max=math.sqrt(4096 * 4096 * 3),
    eps_help="the Euclidean length of the perturbation over all of an image's values, e.g. 0.5",
    eps_error=_l2_eps_error,
    defaults={"digits": 1.0, "mnist": 2.0}, fallback=0.5,
)
THREAT_MODELS: dict[str, ThreatModel] = {LINF.name: LINF, L2.name: L2}


def threat_model(norm: str | ThreatModel | None) -> ThreatModel:
    """The record for a norm name ("linf", "l2"; also "Linf", "L2", "inf", "2"); None: l-inf
    (what every run before --norm was trained under). UserError for any other name."""
    if isinstance(norm, ThreatModel):
        return norm
    if norm is None:
        return LINF
    key = str(norm).strip().lower().replace("-", "")
    key = {"inf": "linf", "2": "l2"}.get(key, key)
    if key not in THREAT_MODELS:
        raise UserError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return THREAT_MODELS[key]
