"""Per-sample correctness of a model under a list of attacks: the core that `evaluate`,
`checks`, `figures` and `reproduce` share.

It lives apart from `evaluate` so that `checks` (which `evaluate --checks` calls) can use
it without importing `evaluate` back.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attacks import Attack, AutoAttack, check_labels, correct_predictions, model_state_kept
from .data import DeviceLoader, ImageData
from .speed import float32_math


def fraction(flags: Tensor) -> float:
    """Share of True entries, exact (count / n in float64, not a float32 mean)."""
    return int(flags.sum()) / len(flags) if len(flags) else 0.0


class _FloatBatches:
    """Consecutive batches of float images (already in [0, 1]) moved to `device` as they are."""

    def __init__(self, data: ImageData, batch_size: int, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, batch_size, torch.device(device)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.data), self.batch_size):
            yield (self.data.images[i : i + self.batch_size].to(self.device),
                   self.data.labels[i : i + self.batch_size].to(self.device).long())


def batches_in_order(data: ImageData, batch_size: int, device: torch.device) -> DeviceLoader | _FloatBatches:
    """(images [B, C, H, W] float in [0, 1], labels int64 [B]) on `device`, in order, the last
    batch possibly smaller. `data.images` may be uint8 (the data sets: divided by 255 here)
    or floating point in [0, 1] (a user's own tensors: used as they are)."""
    if data.images.is_floating_point():
        return _FloatBatches(data, batch_size, device)
    return DeviceLoader(data, batch_size, device, shuffle=False, drop_last=False)


def attack_correct(
    model: nn.Module,
    images: ImageData,
    attacks: list[Attack],
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
    state_dir: Path | None = None,
    source: nn.Module | None = None,
    source_correct: dict[str, Tensor] | None = None,
    nonfinite: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-sample correctness (bool, CPU, one entry per image): clean, per attack, and
    `worst` (correct under every attack).

    `source`: the model the attacks are computed on (default: `model` itself, white-box);
    another model makes them transfer attacks, and `model` is only ever queried for
    predictions; `source_correct`, if given, is filled with the source's own correctness
    on the same adversarial images. `nonfinite`, if given, is filled with the same keys:
    per image, whether the model's logits were not all finite (NaN or inf) on that input;
    such an image counts as wrong (`attacks.correct_predictions`). `state_dir`: AutoAttack saves each chunk's progress
    there and resumes from it.

    An image's result depends only on the models, the image, the attack and `seed`:
    every attack is called with `seed` and draws its random numbers per image (see
    `Attack`), and AutoAttack, whose random numbers are shared by a batch, always gets
    chunks of its own `batch_size` consecutive images; `batch_size` only sets the memory
    used by the other attacks, and neither the other attacks nor their order matter.
    The models' modes, `requires_grad` flags and `.grad`s are restored, and the global
    torch RNG is neither used nor reseeded.

    `progress`: a bar on a terminal; otherwise one line on stderr per attack (and per
    AutoAttack stage) with the accuracy so far.
    """
    names = ["clean"] + [a.name for a in attacks] + ["worst"]
    if not len(images):  # an empty shard: a process of a torchrun evaluation with more processes than images
        none = {name: torch.zeros(0, dtype=torch.bool) for name in names}
        if source_correct is not None:
            source_correct.update(none)
        if nonfinite is not None:
            nonfinite.update(none)
        return dict(none)
    run = _Attacking(model, source, images, batch_size, device, seed, state_dir)
    bar = _bar(progress and bool(attacks), sum(len(run.batches(run.chunk_size(a))) for a in attacks))
    run.bar, run.say = bar, _say if progress and bar is None and attacks else None
    with model_state_kept(model, run.source), float32_math(device):  # attacks in IEEE float32 (speed.py)
        model.eval()
        run.source.eval()
        correct, own = run.clean()
        worst, own_worst = correct["clean"].clone(), own["clean"].clone()
        run.start = time.monotonic()
        try:
            for k, attack in enumerate(attacks):
                correct[attack.name], own[attack.name] = run.attack(attack, f"[{k + 1}/{len(attacks)}]")
                worst &= correct[attack.name]
                own_worst &= own[attack.name]
                run.report(attack.name, f"[{k + 1}/{len(attacks)}]", correct[attack.name], worst)
        finally:
            if bar is not None:
                bar.close()
    correct["worst"], own["worst"] = worst, own_worst
    if source_correct is not None:
        source_correct.update({name: own[name] for name in names})
    if nonfinite is not None:
        bad = dict(run.nonfinite)
        bad["worst"] = torch.stack(list(bad.values())).any(0)
        nonfinite.update(bad)
    return {name: correct[name] for name in names}


class _Attacking:
    """One `attack_correct` call: the models, the images in batches of each size asked for,
    and where progress goes (a bar, or lines through `say`)."""

    def __init__(self, model: nn.Module, source: nn.Module | None, images: ImageData, batch_size: int,
                 device: torch.device, seed: int, state_dir: Path | None) -> None:
        self.transfer = source is not None and source is not model
        self.model, self.source = model, source if self.transfer else model
        self.images, self.batch_size, self.device = images, batch_size, device
        self.seed, self.state_dir = seed, state_dir
        self.loaders: dict[int, DeviceLoader | _FloatBatches] = {}
        self.bar: Any = None
        self.say: Callable[[str], None] | None = None
        self.start = time.monotonic()
        self.nonfinite: dict[str, Tensor] = {}  # per input name: the model's logits were not finite
        self._bad: list[Tensor] = []

    def batches(self, size: int) -> DeviceLoader | _FloatBatches:
        if size not in self.loaders:
            self.loaders[size] = batches_in_order(self.images, size, self.device)
        return self.loaders[size]

    def chunk_size(self, attack: Attack) -> int:
        return attack.batch_size if isinstance(attack, AutoAttack) else self.batch_size

    def _scored(self, x: Tensor, y: Tensor, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per image: the model's (its `logits` of `x`, if given) and the source's prediction
        of `x` is `y` (CPU, bool)."""
        with torch.no_grad():
            logits = self.model(x) if logits is None else logits
            ok = correct_predictions(logits, y)
            self._bad.append((~torch.isfinite(logits).all(1)).cpu())
            return ok.cpu(), correct_predictions(self.source(x), y).cpu() if self.transfer else ok.cpu()

    def clean(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's and the source's clean correctness, the labels checked on the first batch."""
        clean, own_clean = [], []
        for i, (x, y) in enumerate(self.batches(self.batch_size)):
            with torch.no_grad():
                logits = self.model(x)
            if i == 0:  # labels checked once, against the model's number of classes
                check_labels(self.images.labels, len(self.images), int(logits.shape[1]))
            ok, own = self._scored(x, y, logits)
            clean.append(ok)
            own_clean.append(own)
        self.nonfinite["clean"], self._bad = torch.cat(self._bad), []
        return {"clean": torch.cat(clean)}, {"clean": torch.cat(own_clean)}

    def attack(self, attack: Attack, position: str) -> tuple[Tensor, Tensor]:
        """The model's and the source's correctness on `attack`'s images, batch by batch."""
        parts, own_parts = [], []
        loader = self.batches(self.chunk_size(attack))
        for i, (x, y) in enumerate(loader):
            if self.bar is not None:
                self.bar.set_postfix_str(attack.name, refresh=False)
            adv = attack(self.source, x, y, seed=self.seed, **self._autoattack_options(attack, position, i, loader))
            ok, own = self._scored(adv, y)
            parts.append(ok)
            own_parts.append(own)
            if self.bar is not None:
                self.bar.update()
        self.nonfinite[attack.name], self._bad = torch.cat(self._bad), []
        return torch.cat(parts), torch.cat(own_parts)

    def _autoattack_options(self, attack: Attack, position: str, i: int, loader: Any) -> dict[str, Any]:
        """AutoAttack's state file of chunk i, and its progress lines; nothing for other attacks."""
        kwargs: dict[str, Any] = {}
        if isinstance(attack, AutoAttack):
            if self.state_dir is not None:
                kwargs["state_path"] = self.state_dir / f"{_safe(attack.name)}-chunk{i:05d}.pt"
            if self.say is not None:
                prefix, say = f"{attack.name} {position} chunk {i + 1}/{len(loader)}", self.say
                kwargs["progress"] = lambda line: say(f"{prefix}: {line}")
        return kwargs

    def report(self, name: str, position: str, correct: Tensor, worst: Tensor) -> None:
        if self.say is not None:
            self.say(f"{name} {position}: accuracy {fraction(correct):.4f} "
                     f"({int(correct.sum())}/{len(self.images)}), worst so far {fraction(worst):.4f}, "
                     f"{time.monotonic() - self.start:.0f} s")


def _say(line: str) -> None:
    print(f"learn2defend: {line}", file=sys.stderr, flush=True)


def _bar(enabled: bool, total: int):
    """A tqdm bar over (batch, attack) pairs on a terminal, or None."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="attacking", unit="batch-attack", leave=False, file=sys.stderr)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


