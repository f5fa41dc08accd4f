"""Per-sample correctness of a model under a list of attacks: the core that `evaluate`,
`checks`, `figures` and `reproduce` share.

It lives apart from `evaluate` so that `checks` (which `evaluate --checks` calls) can use
it without importing `evaluate` back.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .attacks import Attack, AutoAttack, check_labels, model_state_kept
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
) -> dict[str, Tensor]:
    """Per-sample correctness (bool, CPU, one entry per image): clean, per attack, and
    `worst` (correct under every attack).

    `source`: the model the attacks are computed on (default: `model` itself, white-box);
    another model makes them transfer attacks, and `model` is only ever queried for
    predictions; `source_correct`, if given, is filled with the source's own correctness
    on the same adversarial images. `state_dir`: AutoAttack saves each chunk's progress
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
        return dict(none)
    transfer = source is not None and source is not model
    source = source if transfer else model
    correct: dict[str, Tensor] = {}
    own: dict[str, Tensor] = {}
    loaders: dict[int, DeviceLoader | _FloatBatches] = {}

    def batches(size: int) -> DeviceLoader | _FloatBatches:
        if size not in loaders:
            loaders[size] = batches_in_order(images, size, device)
        return loaders[size]

    def chunk_size(attack: Attack) -> int:
        return attack.batch_size if isinstance(attack, AutoAttack) else batch_size

    n = len(images)
    bar = _bar(progress and bool(attacks), sum(len(batches(chunk_size(a))) for a in attacks))
    say = _say if progress and bar is None and attacks else None
    with model_state_kept(model, source), float32_math(device):  # attacks in IEEE float32 (speed.py)
        model.eval()
        source.eval()
        clean, own_clean = [], []
        for i, (x, y) in enumerate(batches(batch_size)):
            with torch.no_grad():
                logits = model(x)
                if i == 0:  # labels checked once, against the model's number of classes
                    check_labels(images.labels, n, int(logits.shape[1]))
                ok = logits.argmax(1) == y
                clean.append(ok.cpu())
                own_clean.append((source(x).argmax(1) == y).cpu() if transfer else ok.cpu())
        correct["clean"], own["clean"] = torch.cat(clean), torch.cat(own_clean)
        worst, own_worst = correct["clean"].clone(), own["clean"].clone()
        start = time.monotonic()
        try:
            for k, attack in enumerate(attacks):
                parts, own_parts = [], []
                loader = batches(chunk_size(attack))
                for i, (x, y) in enumerate(loader):
                    if bar is not None:
                        bar.set_postfix_str(attack.name, refresh=False)
                    kwargs: dict = {}
                    if isinstance(attack, AutoAttack):
                        if state_dir is not None:
                            kwargs["state_path"] = state_dir / f"{_safe(attack.name)}-chunk{i:05d}.pt"
                        if say is not None:
                            prefix = f"{attack.name} [{k + 1}/{len(attacks)}] chunk {i + 1}/{len(loader)}"
                            kwargs["progress"] = lambda line, prefix=prefix: say(f"{prefix}: {line}")
                    adv = attack(source, x, y, seed=seed, **kwargs)
                    with torch.no_grad():
                        ok = model(adv).argmax(1) == y
                        parts.append(ok.cpu())
                        own_parts.append((source(adv).argmax(1) == y).cpu() if transfer else ok.cpu())
                    if bar is not None:
                        bar.update()
                correct[attack.name], own[attack.name] = torch.cat(parts), torch.cat(own_parts)
                worst &= correct[attack.name]
                own_worst &= own[attack.name]
                if say is not None:
                    say(f"{attack.name} [{k + 1}/{len(attacks)}]: accuracy {fraction(correct[attack.name]):.4f} "
                        f"({int(correct[attack.name].sum())}/{n}), worst so far {fraction(worst):.4f}, "
                        f"{time.monotonic() - start:.0f} s")
        finally:
            if bar is not None:
                bar.close()
    correct["worst"], own["worst"] = worst, own_worst
    if source_correct is not None:
        source_correct.update({name: own[name] for name in names})
    return {name: correct[name] for name in names}


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


