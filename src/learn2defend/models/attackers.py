"""The attacker networks g(A; phi) of the paper's Table 1.

An attacker maps its input A (the image for the naive attacker; image and loss gradient
concatenated on channels for the gradient attacker) to a perturbation eps * tanh(h), so
|delta| <= eps holds by construction and no projection is needed during training.

Cost at width 1 on a 32x32 image with 6 input channels (Grad attacker on CIFAR), counted
with torch.utils.flop_counter.FlopCounterMode (multiply-adds, forward pass):
- slim: 0.37 GMAC. Its first ResBlock's first conv has stride 2 (the paper's "second
  convolutional layer downsamples"), so both ResBlocks run at 16x16;
- wide: 1.79 GMAC. Four ResBlocks at full resolution, up to 256 channels.
- sdi: 0.08 GMAC. FGSM-SDI's generator (Jia et al. 2022): one conv, one 64-channel
  residual block and one conv at full resolution; it proposes a start, not the whole attack.
For comparison, WRN-34-10 costs 6.7 GMAC and WRN-34-4 1.1 GMAC per 32x32 image.

ATTACKER_LAYOUT numbers this layout. Checkpoints store it; an attacker saved with another
layout (learn2defend before layout 2 pooled at the end of the slim attacker's first
ResBlock and ended both bodies in BN + ReLU) refuses to load instead of loading silently
into different computation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from learn2defend.errors import UserError

# A threat model's map of the attacker's raw output into its ball: to_ball(h, eps) -> delta.
ToBall = Callable[[torch.Tensor, "float | torch.Tensor"], torch.Tensor]

ATTACKER_LAYOUT = 2
_ATTACKERS: dict[str, type] = {}


def register_attacker(name: str):
    """Class decorator: the attacker network `cls(in_channels, out_channels, width,
    learnable_scale)` is built by `create_attacker(name, ...)`, as @register_model does for
    classifiers."""

    def decorator(cls: type) -> type:
        if name in _ATTACKERS:
            raise ValueError(f"attacker {name!r} is registered twice")
        _ATTACKERS[name] = cls
        return cls

    return decorator


def list_attackers(pattern: str = "*") -> list[str]:
    """Registered attacker names matching the shell-style `pattern`, in registration order."""
    return [n for n in _ATTACKERS if fnmatch.fnmatchcase(n, pattern)]


class ResBlock(nn.Module):
    """The SNGAN generator's residual block (Miyato et al. 2018): BN-ReLU-conv twice.

    With `stride` 2 the first conv downsamples, and the 1x1 shortcut is strided with it.
    The shortcut is a 1x1 conv whenever the shape changes, the identity otherwise.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        changes_shape = cin != cout or stride != 1
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class _Attacker(nn.Module):
    """Shared output head: eps * tanh(s * h), with s a learnable scalar or fixed at 1.

    The authors' code learns s (starting at 5) for the slim attacker: a steeper tanh lets the
    untrained attacker reach the eps boundary, where strong perturbations live, early on.
    """

    def __init__(self, learnable_scale: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0)) if learnable_scale else None

    def squash(self, h: torch.Tensor, eps: float | torch.Tensor, to_ball: ToBall | None = None) -> torch.Tensor:
        """eps * tanh(s * h) per pixel (the l-inf ball), or `to_ball(s * h, eps)`: a threat
        model's map of the raw output into its ball (learn2defend.attacks.threat, `squash`)."""
        if self.scale is not None:
            h = self.scale * h
        return eps * torch.tanh(h) if to_ball is None else to_ball(h, eps)


@register_attacker("slim")
class SlimAttacker(_Attacker):
    """Table 1, slim: conv 128 (BN+ReLU), ResBlock 256 (downsampling), ResBlock 128, BN,
    deconv 16 (upsampling), conv to the image's channels on [A, deconv output], tanh.

    The skip feeds A to the last conv: it restores the fine detail the half-size body
    cannot carry (paper, section 3.1).
    """

    def __init__(self, in_channels: int, out_channels: int, width: float, learnable_scale: bool):
        super().__init__(learnable_scale)
        c128, c256 = _scaled(128, width), _scaled(256, width)
        self.stem = _conv_bn_relu(in_channels, c128)
        self.down = ResBlock(c128, c256, stride=2)
        self.block = ResBlock(c256, c128)
        self.bn = nn.BatchNorm2d(c128)
        self.up = nn.ConvTranspose2d(c128, 16, 4, stride=2, padding=1)
        self.head = nn.Conv2d(in_channels + 16, out_channels, 3, padding=1)

    def forward(self, a: torch.Tensor, eps: float | torch.Tensor, to_ball: ToBall | None = None) -> torch.Tensor:
        if a.shape[-2] % 2 or a.shape[-1] % 2:
            raise UserError(
                f"the slim attacker halves and then doubles the image size, so it needs even "
                f"height and width, got {a.shape[-2]}x{a.shape[-1]}; use the wide attacker"
            )
        h = self.up(self.bn(self.block(self.down(self.stem(a)))))
        return self.squash(self.head(torch.cat([a, h], dim=1)), eps, to_ball)


@register_attacker("wide")
class WideAttacker(_Attacker):
    """Table 1, wide: conv 64 (BN+ReLU), ResBlocks 128, 256, 128, 64 at full resolution,
    BN, conv to the image's channels, tanh. Costlier than slim, but loses no detail."""

    def __init__(self, in_channels: int, out_channels: int, width: float, learnable_scale: bool):
        super().__init__(learnable_scale)
        c64, c128, c256 = _scaled(64, width), _scaled(128, width), _scaled(256, width)
        self.stem = _conv_bn_relu(in_channels, c64)
        self.blocks = nn.Sequential(
            ResBlock(c64, c128), ResBlock(c128, c256), ResBlock(c256, c128), ResBlock(c128, c64)
        )
        self.bn = nn.BatchNorm2d(c64)
        self.head = nn.Conv2d(c64, out_channels, 3, padding=1)

    def forward(self, a: torch.Tensor, eps: float | torch.Tensor, to_ball: ToBall | None = None) -> torch.Tensor:
        return self.squash(self.head(self.bn(self.blocks(self.stem(a)))), eps, to_ball)


@register_attacker("sdi")
class SdiAttacker(_Attacker):
    """FGSM-SDI's generator, as in the authors' code (github.com/jiaxiaojunQAQ/FGSM-SDI,
    attacker.py): conv 64 (no bias, BN, ReLU), one residual block of 64 channels (BN without
    affine parameters, PReLU, conv, twice), BN without affine parameters, conv to the image's
    channels, eps * tanh. 0.08 GMAC per 32x32 image with 6 input channels."""

    def __init__(self, in_channels: int, out_channels: int, width: float, learnable_scale: bool):
        super().__init__(learnable_scale)
        c64 = _scaled(64, width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c64, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c64, eps=1e-3), nn.ReLU())
        self.residual = nn.Sequential(
            nn.BatchNorm2d(c64, affine=False), nn.PReLU(), nn.Conv2d(c64, c64, 3, padding=1),
            nn.BatchNorm2d(c64, affine=False), nn.PReLU(), nn.Conv2d(c64, c64, 3, padding=1),
        )
        self.bn = nn.BatchNorm2d(c64, affine=False)
        self.head = nn.Conv2d(c64, out_channels, 3, padding=1)

    def forward(self, a: torch.Tensor, eps: float | torch.Tensor, to_ball: ToBall | None = None) -> torch.Tensor:
        h = self.stem(a)
        return self.squash(self.head(self.bn(h + self.residual(h))), eps, to_ball)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def create_attacker(
    kind: str,
    *,
    in_channels: int,
    out_channels: int,
    width: float = 1.0,
    learnable_scale: bool = False,
) -> nn.Module:
    """Build the paper's "slim" or "wide" attacker, or FGSM-SDI's "sdi"; `width` scales its channel counts.

    The returned module is called as `attacker(a, eps)` with a of shape [B, in_channels, H, W]
    and returns a perturbation of shape [B, out_channels, H, W] with values in [-eps, eps];
    `attacker(a, eps, to_ball)` maps its raw output into another ball instead (a threat model's
    `squash`, e.g. the l2 ball: learn2defend.attacks.threat).
    """
    if kind not in _ATTACKERS:
        raise UserError(f"unknown attacker {kind!r}; choose one of: {', '.join(_ATTACKERS)}")
    if in_channels < 1 or out_channels < 1:
        raise UserError(
            f"in_channels and out_channels must be at least 1, got {in_channels}, {out_channels}"
        )
    if not width > 0:
        raise UserError(f"attacker width must be positive, got {width}")
    cls = _ATTACKERS[kind]
    return cls(in_channels, out_channels, width, learnable_scale)


ATTACKERS = tuple(list_attackers())  # the names, for choices and help
