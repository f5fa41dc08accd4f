"""The run folder as a format: its files, its lock, and loading a run back.

A run folder holds:
- `config.json`: the run's `ResolvedConfig` in `TrainConfig`'s flat fields (every default filled in);
- `last.safetensors`: everything needed to continue exactly (weights, optimizers,
  schedulers, epoch and step, metric sums of a half-done epoch, random generators, and
  with --ema the averaged weights, which loading a run gives as its classifier);
- `best.safetensors`: the weights with the best validation robust accuracy so far (with
  --ema: the averaged weights with the best validation robust accuracy of the averaged net);
- `metrics.jsonl`: one JSON line per finished epoch (`"collapsed": true` where validation
  robust accuracy collapsed: catastrophic overfitting, `learn2defend.guards.collapsed`).

`learn2defend.train` writes run folders; everything else (evaluate, export, figures,
the `l2l:` attack) reads them through this module alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None  # type: ignore[assignment]

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, load_resolved
from .data import Dataset
from .errors import UserError
from .methods import attacker_in_channels
from .models import create_attacker, create_model
from .models.attackers import ATTACKER_LAYOUT
from .settings import ResolvedConfig

LAST, BEST, CONFIG, METRICS = "last.safetensors", "best.safetensors", "config.json", "metrics.jsonl"


class RunFolderBusy(UserError):
    """Another process is training into the same run folder."""


# ---- devices and networks ----------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    mps = device.type == "mps" and torch.backends.mps.is_available()
    if device.type not in ("cpu", "cuda") and not mps:
        raise UserError(f"device '{name}' is not supported here; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def data_meta(data: Dataset) -> dict[str, Any]:
    """What it takes to rebuild the classifier and to check another data set fits it."""
    c, h, w = data.image_shape
    return {
        "dataset": data.name,
        "classes": list(data.classes),
        "image_shape": [c, h, w],
        "mean": list(data.mean),
        "std": list(data.std),
    }


def build_classifier(config: ResolvedConfig, meta: dict[str, Any], pretrained: str | None = None) -> nn.Module:
    """The run's classifier for the data `meta` describes; with `pretrained` (timm: models, a
    weights file or 'hub'), starting from those weights."""
    c, h, w = meta["image_shape"]
    return create_model(
        config.model,
        num_classes=len(meta["classes"]),
        in_channels=c,
        image_size=(h, w),
        mean=meta["mean"],
        std=meta["std"],
        pretrained=pretrained,
    )


def build_attacker(config: ResolvedConfig, meta: dict[str, Any]) -> nn.Module | None:
    a = config.attacker
    if a is None:
        return None
    channels = meta["image_shape"][0]
    return create_attacker(
        a.name,
        in_channels=attacker_in_channels(config.method, channels),
        out_channels=channels,
        width=a.width,
        learnable_scale=a.scale,
    )


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict, with a mismatch turned into one clear line."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{what} holds no weights; the file is damaged or from another program")
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{what} does not fit this architecture ({detail})") from None


# ---- what a checkpoint holds ------------------------------------------------------------------

ARCH_FIELDS = ("model", "num_classes", "image_shape", "method", "fingerprint")


def param_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """16 hex digits of the sha256 of the sorted parameter and buffer names with their shapes:
    two networks whose weights load into each other have the same fingerprint (so it is
    recorded with the model's name), two that differ in any name or shape do not."""
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(weights.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def architecture(config: ResolvedConfig, meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a checkpoint of `config`'s classifier holds, as stored in it under "arch": model
    name, number of classes, image shape [C, H, W], method and `param_fingerprint` of `weights`."""
    return {"model": config.model, "num_classes": len(meta["classes"]), "image_shape": list(meta["image_shape"]),
            "method": config.method, "fingerprint": param_fingerprint(weights)}


def check_architecture(stored: Any, expected: dict[str, Any], what: str,
                       fields: tuple[str, ...] = ARCH_FIELDS) -> None:
    """UserError naming every field of `fields` where the architecture recorded in a
    checkpoint (`stored`; None for checkpoints written before it was recorded: nothing to
    check) differs from `expected`, the one of the run loading it."""
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise UserError(f"{what} is damaged: its architecture record is not a dictionary")
    differ = [f"{k} {shown(stored.get(k))} (this run: {shown(expected[k])})" for k in fields
              if stored.get(k) != expected[k]]
    if differ:
        raise UserError(f"{what} does not fit this run: it holds {', '.join(differ)}")


@dataclass
class Run:
    """A trained run loaded back from its folder."""

    path: Path
    config: ResolvedConfig
    meta: dict[str, Any]
    model: nn.Module
    attacker: nn.Module | None
    epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


def load_run(path: str | Path, which: str = "last", device: str | torch.device = "cpu", *,
             with_attacker: bool = True) -> Run:
    """Load a run folder's classifier (and, with `with_attacker`, its attacker) in eval mode;
    nothing is unpickled. Without the attacker, the classifier of a run whose attacker has an
    older layout still loads."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        if path.is_file():
            raise UserError(f"'{path}' is a file, not a run folder; an exported model file loads with "
                            "learn2defend.load (and evaluates with eval --checkpoint FILE)")
        raise UserError(f"'{path}' is not a run folder (no {CONFIG}); train one with learn2defend train --out {path}")
    if which not in ("last", "best"):
        raise UserError(f"--which must be last or best, got '{which}'")
    config = load_resolved(path / CONFIG)
    state = ckpt.load_state(path / (LAST if which == "last" else BEST), device=device)
    meta = checked_meta(state, path / (LAST if which == "last" else BEST))
    model = build_classifier(config, meta)
    check_architecture(state.get("arch"), architecture(config, meta, model.state_dict()),
                       f"checkpoint {path / (LAST if which == 'last' else BEST)}")
    load_weights(model, classifier_weights(state), f"checkpoint {path}")
    attacker = build_attacker(config, meta) if with_attacker else None
    if attacker is not None:
        check_attacker_layout(state, path)
        load_weights(attacker, state["attacker"], f"attacker in {path}")
        attacker.to(device).eval()
    return Run(path, config, meta, model.to(device).eval(), attacker, state.get("epoch", 0), state.get("history", []))


def classifier_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier's weights of a checkpoint: the averaged ones where the run kept an
    average (--ema; torch's AveragedModel stores them under "module."), else the trained ones."""
    ema = state.get("ema")
    if not isinstance(ema, dict):
        return state["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def check_attacker_layout(state: dict[str, Any], path: Path) -> None:
    """Refuse an attacker saved with another layout of the attacker networks: its weights
    could have the same names and shapes and load silently into different computation."""
    layout = state.get("attacker_layout", 1)  # checkpoints before layout 2 did not record it
    if layout != ATTACKER_LAYOUT:
        raise UserError(
            f"the attacker in {path} has layout {layout}, written by an older learn2defend whose "
            f"attackers differed from the paper's Table 1; this version builds layout {ATTACKER_LAYOUT}. "
            "Retrain the run (its classifier alone loads with learn2defend.load)"
        )


def checked_meta(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The data description of a checkpoint, checked before a model is built from it: a
    tampered file must not make us allocate a network for 10^6 x 10^6 images."""
    meta = state.get("data")
    try:
        c, h, w = meta["image_shape"]
        ok = (
            all(isinstance(v, int) and 1 <= v <= 4096 for v in (c, h, w)) and c <= 64
            and isinstance(meta["classes"], list) and 1 <= len(meta["classes"]) <= 100_000
            and all(len(meta[k]) == c and all(isinstance(v, (int, float)) for v in meta[k]) for k in ("mean", "std"))
            and isinstance(state.get("model"), dict)
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"checkpoint {path} is damaged or not a learn2defend run checkpoint (bad data description)")
    return meta


class FolderLock:
    """An exclusive lock (flock) on a run folder while a process trains into it: two
    processes writing one folder would interleave their checkpoints. Only rank 0 writes,
    so only rank 0 locks. The lock goes with the process, so a killed run leaves none."""

    def __init__(self, out: Path) -> None:
        self.out, self.fd = out, None

    def acquire(self) -> None:
        """Lock the folder if it exists and is not locked by us yet; RunFolderBusy if another holds it."""
        if self.fd is not None or fcntl is None or distributed.rank() != 0 or not self.out.is_dir():
            return
        try:
            fd = os.open(self.out, os.O_RDONLY)
        except OSError:
            return  # an unreadable folder: prepare_out says so in one line
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderBusy(f"run folder '{self.out}' is being trained by another process; "
                                "wait for it to finish, or use another --out") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def prepare_out(out: Path, resume: bool, overwrite: bool) -> bool:
    """Check the run folder; return True when a previous run is to be continued."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a folder")
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create the run folder '{out}': '{parent}' is not a writable folder")
    try:  # temp files of a run killed while writing do not make a folder "existing"
        existing = out.is_dir() and any(not ckpt.is_temp_file(p.name) for p in out.iterdir())
    except OSError as e:
        raise UserError(f"cannot read the run folder '{out}': {e.strerror}") from None
    if existing and not (resume or overwrite):
        raise UserError(f"run folder '{out}' already exists and is not empty; "
                        "pass --resume to continue it or --overwrite to replace it")
    if resume and existing and not (out / CONFIG).is_file():
        raise UserError(f"cannot resume '{out}': it holds no {CONFIG}")
    return resume and (out / LAST).is_file()


def resume_config(out: Path, given: dict[str, Any], may_change: set[str]) -> TrainConfig:
    """The configuration that continues the run in `out`: its own config.json, with `out` and
    the options given (`given`, by field name) put in. A given option must agree with the run
    unless it is one of `may_change` (such as epochs); UserError otherwise, and when `out`
    holds no run."""
    if not out.is_dir():
        raise UserError(f"cannot resume '{out}': no such run folder; leave out --resume to start a run there")
    if not (out / CONFIG).is_file():
        raise UserError(f"cannot resume '{out}': it holds no {CONFIG}, so no run was started there; "
                        "leave out --resume to start one")
    stored = TrainConfig.load(out / CONFIG)
    config = dataclasses.replace(stored, **{**given, "out": str(out)})
    try:
        resolved = config.resolve()
    except UserError:  # e.g. another --method, under which one of the run's options does not apply
        raw = {k: v for k, v in given.items() if k not in may_change and v != getattr(stored, k)}
        if not raw:
            raise
        differ = ", ".join(f"--{k.replace('_', '-')} (the run: {shown(getattr(stored, k))}, given: {shown(v)})"
                           for k, v in raw.items())
        raise UserError(f"cannot resume '{out}' with other settings: {differ}; leave them out to keep "
                        "the run's") from None
    differ = changed_settings(stored.resolve(), resolved, may_change)
    if differ:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(may_change - {"out"}))
        raise UserError(f"cannot resume '{out}' with other settings: {differ}; leave them out to keep the run's "
                        f"(only {allowed} may change on resume)")
    return config


def changed_settings(stored: ResolvedConfig, config: ResolvedConfig, may_change: set[str]) -> str:
    """The settings of `config` that differ from those of the run `stored`, but for `may_change`
    (both resolved first), as flags: '--lr (the run: 0.1, given: 0.05), ...'; '' when none."""
    before, now = stored.to_dict(), config.to_dict()
    differ = [k for k in dict.fromkeys([*before, *now]) if k not in may_change and now.get(k) != before.get(k)]
    return ", ".join(f"--{k.replace('_', '-')} (the run: {shown(before.get(k))}, given: {shown(now.get(k))})"
                     for k in differ)


def shown(value: Any) -> str:
    """A config value as it is written on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def claim_folder(out: Path, cfg: ResolvedConfig, overwrite: bool, history: list[dict[str, Any]] | None,
                  lock: FolderLock) -> None:
    """Rank 0 makes the run folder its own: old files of an overwritten run go, config.json
    is written, and a continued run's metrics (`history`) are rewritten from its checkpoint."""
    if distributed.rank() != 0:
        return
    try:
        if overwrite and out.is_dir():
            for child in (out / CONFIG, out / LAST, out / BEST, out / METRICS):
                child.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # a new folder: ours from its creation
        ckpt.remove_temp_files(out)  # left by a run killed while writing
        ckpt.atomic_write_text(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
        if history is not None:  # a run killed between its checkpoint and its metrics line
            ckpt.atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))
    except OSError as e:
        raise UserError(f"cannot write the run folder '{out}': {e}") from None
