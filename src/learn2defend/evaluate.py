"""Accuracy of a trained run under attacks, with the per-sample worst case.

Robust accuracy is only meaningful against the strongest attack tried, so besides
one number per attack we report `worst`: the fraction of images that survive
*every* attack that was run on them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .attacks import make_attack
from .config import parse_fraction
from .data import Dataset, DeviceLoader, ImageData, load_dataset
from .errors import UserError
from .train import Run, load_run, resolve_device


@dataclass
class EvalConfig:
    checkpoint: str
    attacks: list[str] = field(default_factory=list)
    dataset: str | None = None  # None: the run's own data set, with its validation split
    split: str = "val"
    n: int | None = None  # evaluate the first n images of the split
    batch_size: int = 256
    eps: float | None = None  # None: the run's training eps
    which: str = "last"
    device: str = "auto"
    data_dir: str = "data"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.eps is not None and not (0 <= self.eps <= 1):
            raise UserError(f"--eps must lie in [0, 1] (pixel units), got {self.eps}")
        if self.n is not None and self.n < 1:
            raise UserError(f"--n must be a positive integer, got {self.n}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.split not in ("train", "val", "test"):
            raise UserError(f"--split must be val or test (or train), got '{self.split}'")


def eval_data(run: Run, dataset: str | None, data_dir: str) -> Dataset:
    """The run's own data (same validation split as in training), or another set with the same classes."""
    c = run.config
    data = load_dataset(
        dataset or c.dataset, data_dir, val_size=c.val_size if c.val_size < 1 else int(c.val_size),
        split_seed=c.split_seed, image_size=c.image_size,
    )
    if len(data.classes) != len(run.meta["classes"]):
        raise UserError(f"{data.name} has {len(data.classes)} classes but the model was trained on {len(run.meta['classes'])}")
    if list(data.image_shape) != list(run.meta["image_shape"]):
        raise UserError(f"{data.name} has images of shape {list(data.image_shape)} but the model takes {run.meta['image_shape']}; use --image-size")
    return data


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Clean accuracy, accuracy under each attack, and the per-sample worst case."""
    config.validate()
    device = resolve_device(config.device)
    run = load_run(config.checkpoint, config.which, device)
    eps = run.config.eps if config.eps is None else config.eps
    attacks = [make_attack(name, eps) for name in config.attacks]  # bad names fail before any work
    data = eval_data(run, config.dataset, config.data_dir)
    images = data.split(config.split)
    if config.n is not None:
        images = ImageData(images.images[: config.n], images.labels[: config.n])
    counts = attack_accuracy(run.model, images, attacks, config.batch_size, device, config.seed, config.progress)
    n = len(images)
    accuracy = {name: count / n for name, count in counts.items()}
    if not attacks:
        del accuracy["worst"]  # the worst case over no attack is just clean accuracy
    result: dict[str, Any] = {
        "accuracy": accuracy,
        "n": n,
        "dataset": data.name,
        "split": config.split,
        "eps": eps,
        "checkpoint": str(run.path),
        "which": config.which,
        "model": run.config.model,
        "method": run.config.method,
    }
    warnings = [w for a in attacks for w in getattr(a, "warnings", [])]
    if warnings:
        result["warnings"] = warnings
    return result


def attack_accuracy(
    model: torch.nn.Module,
    images: ImageData,
    attacks: list,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """Correct counts: clean, per attack, and `worst` (correct under every attack)."""
    torch.manual_seed(seed)
    model.eval()
    names = ["clean"] + [a.name for a in attacks]
    correct = {name: torch.zeros((), dtype=torch.long, device=device) for name in names + ["worst"]}
    batches = DeviceLoader(images, batch_size, device, shuffle=False, drop_last=False)
    iterator = iter(batches)
    if progress and sys.stderr.isatty() and attacks:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(batches), desc="attacking", leave=False, file=sys.stderr)
    for x, y in iterator:
        with torch.no_grad():
            survived = model(x).argmax(1) == y
        correct["clean"] += survived.sum()
        for attack in attacks:
            adv = attack(model, x, y)
            with torch.no_grad():
                ok = model(adv).argmax(1) == y
            correct[attack.name] += ok.sum()
            survived &= ok
        correct["worst"] += survived.sum()
    return {name: int(count.item()) for name, count in correct.items()}


__all__ = ["EvalConfig", "evaluate", "attack_accuracy", "eval_data", "parse_fraction"]
