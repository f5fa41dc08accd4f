"""Classifiers by name, and the paper's attacker networks.

Every classifier takes images in [0, 1] and normalizes inside (a `Normalize` module at
`model.normalize`), so perturbation budgets are always in pixel units and a checkpoint carries
the statistics it was trained with.

Names: the built-in zoo (`classifiers`), models registered with `register_model` (--import,
entry points), and `timm:NAME` for any timm model (`timm_zoo`, needing the timm extra).
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from learn2defend.errors import UserError

__all__ = [
    "ATTACKERS",
    "Normalize",
    "create_attacker",
    "create_model",
    "import_models",
    "list_attackers",
    "list_models",
    "load_plugins",
    "made_with",
    "register_attacker",
    "register_model",
]

ENTRY_POINT_GROUP = "learn2defend.models"  # packages declare modules that register models here
OWN_MODEL_HINT = (f"a model of your own: register it with @register_model in a module and pass --import MODULE, "
                  f"or declare the module in the '{ENTRY_POINT_GROUP}' entry-point group "
                  "(README, 'Train your own model')")


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers so they are saved with the weights."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UserError(
                f"mean has {len(mean)} values but std has {len(std)}; give one per channel"
            )
        if any(s <= 0 for s in std):
            raise UserError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


@dataclass(frozen=True)
class _Entry:
    fn: Callable[..., nn.Module]
    min_image_size: int


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, min_image_size: int = 1) -> Callable:
    """Register `fn(*, num_classes, in_channels, image_size, mean, std) -> nn.Module` as `name`.

    `min_image_size` is the smallest height and width the network can take; `create_model` checks
    both so the user gets a clear message instead of a shape error deep inside the network.
    `fn` gets `image_size` as `create_model` was given it: an int for square images, (H, W) otherwise.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = _Entry(fn, min_image_size)
        return fn

    return decorator


_plugins_loaded = False


def load_plugins() -> None:
    """Import, once per process, every module of the `learn2defend.models` entry-point group.

    A package makes its models available to every learn2defend command, in every process, by
    declaring the module that registers them, e.g. in its pyproject.toml:

        [project.entry-points."learn2defend.models"]
        mynets = "mypackage.models"

    A module that fails to import is reported on stderr and left out; the others still load.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not stop the built-in models
            print(f"learn2defend: warning: entry point '{ep.name} = {ep.value}' of '{ENTRY_POINT_GROUP}' "
                  f"failed to load ({type(e).__name__}: {e}); its models are missing", file=sys.stderr)


def import_models(modules: Iterable[str]) -> None:
    """Import each named module (e.g. "mymodels" or "pkg.nets"), so that its @register_model
    functions join the registry; the CLI's `--import MODULE`.

    As `python -m` does, the current folder is searched first, then PYTHONPATH and the
    installed packages. Raises UserError for a module that cannot be imported.
    """
    modules = list(modules)
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name != e.name and not name.startswith(e.name + "."):
                raise UserError(f"--import {name}: it imports '{e.name}', which is not installed") from None
            hint = " (give a module name, not a file)" if name.endswith(".py") else ""
            raise UserError(f"--import {name}: no module named '{name}'{hint}; put the folder that holds it "
                            "in the current folder or on PYTHONPATH, or install its package") from None
        except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import
            raise UserError(f"--import {name}: importing it failed ({type(e).__name__}: {e})") from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style `pattern`, sorted (entry points included);
    a pattern starting with 'timm:' ('timm:*resnet*') lists the matching timm models instead."""
    if timm_zoo.is_timm_name(pattern):
        return timm_zoo.list_names(pattern)
    load_plugins()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: str | None = None,
) -> nn.Module:
    """Build a registered classifier for [0, 1] images [B, in_channels, H, W].

    `image_size` is H = W for square images, or (H, W); a square (H, H) is passed on as H.

    mean and std (one value per channel, in [0, 1] units) default to 0.5, which maps [0, 1] to
    [-1, 1]; pass the data set's statistics to match the usual preprocessing.

    `timm:NAME` builds a timm model (`timm_zoo.create`); `pretrained` (a weights file, or 'hub')
    applies to those only, and their normalization is then the weights' own (pretrained_cfg).
    """
    if timm_zoo.is_timm_name(name):
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        mean, std = _checked_stats(mean, std, in_channels, num_classes)
        return timm_zoo.create(name, num_classes=num_classes, in_channels=in_channels, image_size=(h, w),
                               mean=mean, std=std, pretrained=pretrained)
    if pretrained is not None:
        raise UserError(f"--pretrained applies to timm: models only, not {name!r} (use --init RUN to start "
                        "from a trained run)")
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}; "
                        f"timm:NAME for a timm model; {OWN_MODEL_HINT}")
    entry = _REGISTRY[name]
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise UserError(f"in_channels must be at least 1, got {in_channels}")
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    image_size = h if h == w else (h, w)
    if min(h, w) < entry.min_image_size:
        raise UserError(
            f"{h}x{w} images are too small for model {name!r}: its downsampling needs a height and width "
            f"of at least {entry.min_image_size}; use larger images or a model such as 'smallcnn'"
        )
    mean, std = _checked_stats(mean, std, in_channels, num_classes)
    return entry.fn(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, mean=mean, std=std
    )


def _checked_stats(mean: Sequence[float] | None, std: Sequence[float] | None, in_channels: int,
                   num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean and std with their 0.5 defaults, one value per channel; UserError otherwise (and for
    counts of classes or channels below 1)."""
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if in_channels < 1:
        raise UserError(f"in_channels must be at least 1, got {in_channels}")
    mean = (0.5,) * in_channels if mean is None else tuple(mean)
    std = (0.5,) * in_channels if std is None else tuple(std)
    for what, values in (("mean", mean), ("std", std)):
        if len(values) != in_channels:
            raise UserError(
                f"{what} has {len(values)} values but the images have {in_channels} channels; "
                f"give one value per channel"
            )
    return mean, std


def made_with(name: str) -> dict[str, str]:
    """The versions of the libraries that build model `name`, beyond learn2defend and torch:
    {'timm': '1.0.31'} for a timm model, {} otherwise (checkpoints and exports record them)."""
    return timm_zoo.made_with(name)


# Imported last: classifiers registers itself through register_model above.
from learn2defend.models import classifiers, timm_zoo  # noqa: E402, F401
from learn2defend.models.attackers import ATTACKERS, create_attacker, list_attackers, register_attacker  # noqa: E402
