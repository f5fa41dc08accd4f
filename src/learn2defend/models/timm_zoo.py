"""Any timm model as a learn2defend classifier: `--model timm:NAME`.

`create` builds `timm.create_model(NAME, num_classes=K, in_chans=C[, img_size=(H, W)])` behind
the project's `Normalize`, so the classifier takes [0, 1] images like every other one and eps
stays in pixel units. `img_size` goes only to models that take it (ViTs, Swin, ...; CNNs do not).
A model that cannot take the images (a ViT patch larger than the image, a stem that pools them
to nothing) is caught at build time by one forward pass of a blank image, as one UserError line.

Weights: `pretrained` is None (random), a local file (safetensors, or a timm/torch checkpoint
read with `torch.load(weights_only=True)`, so no code is unpickled), or "hub" (timm's own
download, online only). Either way timm's loader does the adapting (`timm.models.load_pretrained`:
the model's checkpoint filter, e.g. a ViT's position embeddings resampled to the image size;
the first convolution summed to C channels; a classifier head for another number of classes
dropped and left freshly initialized). With pretrained weights the normalization inside is the
model's `pretrained_cfg` mean and std, the statistics those weights were trained with.

timm is an optional dependency (`pip install 'learn2defend[timm]'`): this module imports it
only when a timm model is asked for.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from learn2defend.errors import UserError

PREFIX = "timm:"
HUB = "hub"  # --pretrained hub: timm's own download of the model's default pretrained weights
INSTALL_HINT = "install it with: pip install 'learn2defend[timm]'"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(f"timm: models need the timm package, which is not installed; {INSTALL_HINT}") from None
    return timm


def version() -> str:
    """The installed timm's version; UserError when it is not installed."""
    return str(_timm().__version__)


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def list_names(pattern: str) -> list[str]:
    """'timm:NAME' for every timm architecture whose name matches the shell-style pattern after
    the prefix (`pattern` is 'timm:*resnet*', say), sorted."""
    names = _timm().list_models()
    return sorted(PREFIX + n for n in names if fnmatch.fnmatchcase(n, pattern[len(PREFIX):]))


def _check_known(arch: str) -> None:
    timm = _timm()
    if arch and timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "no timm model has a close name;"
    raise UserError(f"unknown timm model '{arch}': {hint} list timm models with: "
                    "learn2defend models 'timm:*PATTERN*'")


def _build(arch: str, kwargs: dict[str, Any], image_size: tuple[int, int]) -> nn.Module:
    """timm.create_model with `img_size` where the model takes it (tried first, dropped on the
    TypeError of a model without it)."""
    timm = _timm()
    h, w = image_size
    try:
        try:
            return timm.create_model(arch, img_size=h if h == w else (h, w), **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(arch, **kwargs)
    except (OSError, ImportError) as e:  # a hub download that failed, a missing optional package
        raise UserError(f"timm could not build '{arch}': {type(e).__name__}: {_first_line(e)}") from None
    except (RuntimeError, ValueError, AssertionError, TypeError, KeyError) as e:
        what = "load the pretrained weights into" if kwargs.get("pretrained") else "build"
        raise UserError(f"timm could not {what} '{arch}' for {h}x{w} images with {kwargs['in_chans']} channel(s): "
                        f"{_first_line(e)}") from None


class _MissingKeys(logging.Handler):
    """Collects the parameter names timm's pretrained loader reports missing (it loads
    non-strictly where it drops a head, and only logs what else it did not find)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Missing keys (") and ") discovered" in text:
            self.keys += [k.strip() for k in text[len("Missing keys ("):text.index(") discovered")].split(",")]


def _build_pretrained(arch: str, kwargs: dict[str, Any], image_size: tuple[int, int], what: str) -> nn.Module:
    """`_build` with pretrained weights, refusing a file that leaves weights of the model other
    than its classifier head unloaded (weights of another architecture, say)."""
    logger = logging.getLogger("timm.models._builder")
    catch, level = _MissingKeys(), logger.level
    logger.addHandler(catch)
    logger.setLevel(logging.INFO)
    try:
        net = _build(arch, kwargs, image_size)
    finally:
        logger.removeHandler(catch)
        logger.setLevel(level)
    heads = net.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing = [k for k in catch.keys if not k.endswith("num_batches_tracked")
               and not any(k.startswith(h + ".") for h in heads)]
    if missing:
        raise UserError(f"--pretrained {what}: it holds no weights for {len(missing)} of the tensors of '{arch}' "
                        f"(first: {missing[0]}); was it saved from another model?")
    return net


def _first_line(e: BaseException) -> str:
    """The line of an exception's message that says what went wrong (load_state_dict's second)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict: safetensors, or a torch checkpoint read with
    weights_only=True (a timm training checkpoint's 'state_dict_ema', 'state_dict' or 'model'
    entry, 'module.' prefixes removed: timm's own `load_state_dict`)."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {path}: no such file (give a .safetensors or .pth file, or 'hub')")
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle (refused globals) and zip errors alike
        raise UserError(f"--pretrained {path}: cannot read weights from it ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--pretrained {path}: it holds no state dict of tensors")
    return dict(state)


def _head_classes(arch: str, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of the classifier head in `state` (its weight's first dimension),
    or None where the model's pretrained_cfg names no head or the file lacks it."""
    try:
        heads = _timm().models.get_pretrained_cfg_value(arch, "classifier")
    except RuntimeError:  # an unknown pretrained tag: timm's build says so
        return None
    for head in (heads,) if isinstance(heads, str) else heads or ():
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def _pretrained_stats(net: nn.Module, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's pretrained_cfg mean and std, one value per channel (averaged for another count)."""
    cfg = net.pretrained_cfg
    mean, std = tuple(cfg.get("mean", (0.5,))), tuple(cfg.get("std", (0.5,)))
    if len(mean) != in_channels:
        mean, std = (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels
    return mean, std


class TimmClassifier(nn.Module):
    """`normalize` (learn2defend's Normalize), then the timm network `net`; [B, C, H, W] in [0, 1]
    -> logits [B, K]. `timm_name` is the architecture's timm name."""

    def __init__(self, normalize: nn.Module, net: nn.Module, timm_name: str) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.timm_name = timm_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def create(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
           mean: Sequence[float], std: Sequence[float], pretrained: str | None = None) -> nn.Module:
    """The classifier `timm:ARCH` for [0, 1] images [B, in_channels, H, W] (see the module's docstring).

    UserError: timm missing, an unknown name (with close names), weights that cannot be read or
    do not fit, a model that cannot take H x W images."""
    from learn2defend.models import Normalize

    arch = name[len(PREFIX):]
    _check_known(arch)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    if pretrained == HUB:
        kwargs["pretrained"] = True
    elif pretrained is not None:
        state = _read_weights(pretrained)
        classes = _head_classes(arch, state)
        overlay = {"state_dict": state, "source": None, "hf_hub_id": None, "url": None, "file": None}
        if classes is not None:  # the file's own head: kept when it fits, dropped (re-initialized) otherwise
            overlay["num_classes"] = classes
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    net = _build(arch, kwargs, image_size) if pretrained is None else _build_pretrained(arch, kwargs, image_size,
                                                                                      pretrained)
    if pretrained is not None:
        for cfg in {id(c): c for c in (net.pretrained_cfg, getattr(net, "default_cfg", {}))}.values():
            cfg.pop("state_dict", None)  # the overlay's weights, which the model would otherwise keep alive
        mean, std = _pretrained_stats(net, in_channels)
    model = TimmClassifier(Normalize(mean, std), net, arch)
    _dry_run(model, name, in_channels, image_size)
    return model


def _dry_run(model: nn.Module, name: str, c: int, image_size: tuple[int, int]) -> None:
    """One forward pass of one blank image in eval mode, without gradients: a model that
    cannot take the images says so now, in one line. No weight or statistic changes."""
    h, w = image_size
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, c, h, w))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        why = _first_line(e).rstrip(".")
        raise UserError(f"--model {name} cannot take {c}x{h}x{w} images: {why}; use larger images "
                        "(--image-size) or another model") from None
    finally:
        model.train(was_training)


def made_with(name: str) -> dict[str, str]:
    """{'timm': version} for a timm model (what checkpoints and exports record), {} otherwise."""
    if not is_timm_name(name):
        return {}
    return {"timm": version()}
