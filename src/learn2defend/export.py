"""`learn2defend export`: a trained classifier as one weights-only safetensors file.

The file holds exactly `learn2defend.load(RUN).state_dict()` (no prefixes, no optimizer,
no attacker) and, in its metadata, what it takes to rebuild the network and to use it
correctly: model name, classes, image shape, the normalization inside the model, the eps,
norm (threat model) and method it was trained with, and the versions that made it
(learn2defend; timm for a timm: model, as "made_with"); files written before the norm was
stored were l-inf and read as such. `learn2defend.load(FILE)` rebuilds it; any safetensors
reader gets the weights (README, "Sharing a model").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from . import checkpoint as ckpt
from .attacks.threat import THREAT_MODELS
from .config import option
from .errors import UserError
from .models import create_model, made_with
from .runs import check_architecture, load_run, load_weights, param_fingerprint
from .version import __version__

FORMAT = "learn2defend-model-1"
_FIELDS = ("model", "num_classes", "classes", "image_shape", "mean", "std", "eps", "method", "learn2defend_version")
# The run's data settings, stored as "data" (files exported before it was written lack it).
DATA_FIELDS = ("dataset", "val_size", "split_seed", "image_size", "on_bad_image")


@dataclass
class ExportConfig:
    """What `learn2defend export` writes: which checkpoint of which run, and where."""

    checkpoint: str = option(positional=True, metavar="RUN", help="run folder")
    out: str = option(help="file to write, e.g. model.safetensors")
    which: str = option("last", help="last or best checkpoint")


def export(run_dir: str | Path, out: str | Path, which: str = "last") -> dict[str, Any]:
    """Write the run's classifier to `out`; return the metadata written."""
    run = load_run(run_dir, which, "cpu", with_attacker=False)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file name such as model.safetensors")
    if not out.parent.is_dir():
        raise UserError(f"cannot write '{out}': the folder '{out.parent}' does not exist")
    meta = {
        "format": FORMAT,
        "model": run.config.model,
        "num_classes": len(run.meta["classes"]),
        "classes": run.meta["classes"],
        "image_shape": run.meta["image_shape"],
        # the statistics inside the model: the data set's, or pretrained weights' own (timm: models)
        "mean": _inside(run.model, "mean", run.meta["mean"]),
        "std": _inside(run.model, "std", run.meta["std"]),
        "eps": run.config.eps,
        "norm": run.config.norm,
        "method": run.config.method,
        "learn2defend_version": __version__,
        # what `eval --checkpoint FILE` needs to rebuild the run's data set and validation split
        "data": {k: getattr(run.config.data, k) for k in DATA_FIELDS},
    }
    if made_with(run.config.model):
        meta["made_with"] = {"learn2defend": __version__, "torch": torch.__version__, **made_with(run.config.model)}
    # clone: safetensors refuses tensors that share storage
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in run.model.state_dict().items()}
    meta["fingerprint"] = param_fingerprint(weights)  # names and shapes, checked when the file is loaded
    data = save(weights, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    ckpt.atomic_write(out, data, f"'{out}'")
    return meta


def _inside(model: nn.Module, which: str, otherwise: list[float]) -> list[float]:
    """The mean or std of the model's `normalize` layer where it differs from the data set's
    `otherwise` (pretrained timm weights bring their own), else `otherwise` as stored."""
    value = getattr(getattr(model, "normalize", None), which, None)
    if not isinstance(value, torch.Tensor) or len(value.flatten()) != len(otherwise):
        return list(otherwise)
    inside = [float(v) for v in value.flatten().tolist()]
    return list(otherwise) if all(abs(i - o) < 1e-6 for i, o in zip(inside, otherwise, strict=True)) else inside


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file; UserError for anything else."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{path} is not a model exported by learn2defend export "
                        "(a run's last.safetensors is loaded through its run folder)")
    try:
        meta = {k: raw[k] if k in ("model", "method", "learn2defend_version") else json.loads(raw[k]) for k in _FIELDS}
        if "fingerprint" in raw:  # files exported before it was recorded lack it
            meta["fingerprint"] = raw["fingerprint"]
        meta["norm"] = raw.get("norm", "linf")  # files exported before the norm was stored were l-inf
        if meta["norm"] not in THREAT_MODELS:
            raise ValueError(f"norm {meta['norm']!r}")
        if "data" in raw:
            meta["data"] = json.loads(raw["data"])
            if not (isinstance(meta["data"], dict) and set(meta["data"]) <= set(DATA_FIELDS)):
                raise ValueError("data")
        if "made_with" in raw:
            meta["made_with"] = json.loads(raw["made_with"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{path} has damaged metadata ({e!r})") from None
    return meta


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the classifier of an exported file, in eval mode."""
    meta = read_metadata(path)
    try:
        c, h, w = meta["image_shape"]
        model = create_model(meta["model"], num_classes=int(meta["num_classes"]), in_channels=int(c),
                             image_size=(int(h), int(w)), mean=meta["mean"], std=meta["std"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} has damaged metadata ({e})") from None
    if "fingerprint" in meta:
        check_architecture({"fingerprint": meta["fingerprint"]}, {"fingerprint": param_fingerprint(model.state_dict())},
                           f"exported model {path}", ("fingerprint",))
    load_weights(model, load_file(str(path)), f"exported model {path}")
    return model.to(device).eval()


def load(path: str | Path, which: str = "last", device: str | torch.device = "cpu") -> nn.Module:
    """The trained classifier of a run folder, or of a file written by `learn2defend export`:
    an ordinary module taking [0, 1] images, in eval mode."""
    if Path(path).is_file():
        return load_exported(path, device)
    return load_run(path, which, device, with_attacker=False).model
