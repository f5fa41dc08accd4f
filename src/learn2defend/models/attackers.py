"""The attacker networks g(A; phi) of the paper's Table 1.

An attacker maps its input A (the image for the naive attacker; image and loss gradient
concatenated on channels for the gradient attacker) to a perturbation eps * tanh(h), so
|delta| <= eps holds by construction and no projection is needed during training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learn2defend.errors import UserError

ATTACKERS = ("slim", "wide")


class ResBlock(nn.Module):
    """The SNGAN generator's residual block (Miyato et al. 2018): BN-ReLU-conv twice.

    `downsample` average-pools both branches by 2 at the end, as SNGAN's discriminator block
    does; the shortcut is a 1x1 conv only when the channel count changes.
    """

    def __init__(self, cin: int, cout: int, downsample: bool = False) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x) + self.shortcut(x)
        # Pooling the sum equals pooling each branch: avg-pool is linear.
        return F.avg_pool2d(out, 2) if self.downsample else out


def _bn_relu(c: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())


class _Attacker(nn.Module):
    """Shared output head: eps * tanh(s * h), with s a learnable scalar or fixed at 1.

    The authors' code learns s (starting at 5) for the slim attacker: a steeper tanh lets the
    untrained attacker reach the eps boundary, where strong perturbations live, early on.
    """

    def __init__(self, learnable_scale: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0)) if learnable_scale else None

    def squash(self, h: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            h = self.scale * h
        return eps * torch.tanh(h)


class SlimAttacker(_Attacker):
    """Downsamples once, works at half size, upsamples back; a skip feeds A to the last conv.

    The skip restores the fine detail the half-size body cannot carry (paper, section 3.1).
    """

    def __init__(self, in_channels: int, out_channels: int, width: float, learnable_scale: bool):
        super().__init__(learnable_scale)
        c128, c256 = _scaled(128, width), _scaled(256, width)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c128, 3, padding=1),
            _bn_relu(c128),
            ResBlock(c128, c256, downsample=True),
            ResBlock(c256, c128),
            _bn_relu(c128),
            nn.ConvTranspose2d(c128, 16, 4, stride=2, padding=1),
        )
        self.head = nn.Conv2d(in_channels + 16, out_channels, 3, padding=1)

    def forward(self, a: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        if a.shape[-2] % 2 or a.shape[-1] % 2:
            raise UserError(
                f"the slim attacker halves and then doubles the image size, so it needs even "
                f"height and width, got {a.shape[-2]}x{a.shape[-1]}; use the wide attacker"
            )
        h = self.head(torch.cat([a, self.body(a)], dim=1))
        return self.squash(h, eps)


class WideAttacker(_Attacker):
    """Four residual blocks at full resolution: costlier than slim, but loses no detail."""

    def __init__(self, in_channels: int, out_channels: int, width: float, learnable_scale: bool):
        super().__init__(learnable_scale)
        c64, c128, c256 = _scaled(64, width), _scaled(128, width), _scaled(256, width)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c64, 3, padding=1),
            _bn_relu(c64),
            ResBlock(c64, c128),
            ResBlock(c128, c256),
            ResBlock(c256, c128),
            ResBlock(c128, c64),
            _bn_relu(c64),
            nn.Conv2d(c64, out_channels, 3, padding=1),
        )

    def forward(self, a: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        return self.squash(self.body(a), eps)


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
    """Build the paper's "slim" or "wide" attacker; `width` scales its channel counts.

    The returned module is called as `attacker(a, eps)` with a of shape [B, in_channels, H, W]
    and returns a perturbation of shape [B, out_channels, H, W] with values in [-eps, eps].
    """
    if kind not in ATTACKERS:
        raise UserError(f"unknown attacker {kind!r}; choose one of: {', '.join(ATTACKERS)}")
    if in_channels < 1 or out_channels < 1:
        raise UserError(
            f"in_channels and out_channels must be at least 1, got {in_channels}, {out_channels}"
        )
    if not width > 0:
        raise UserError(f"attacker width must be positive, got {width}")
    cls = SlimAttacker if kind == "slim" else WideAttacker
    return cls(in_channels, out_channels, width, learnable_scale)
