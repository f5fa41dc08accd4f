"""Per-sample correctness of a model under a list of attacks: the core that `evaluate`,
`checks`, `figures` and `reproduce` share.

It lives apart from `evaluate` so that `checks` (which `evaluate --checks` calls) can use
it without importing `evaluate` back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .attacks import Attack, AutoAttack
from .data import DeviceLoader, ImageData
from .speed import float32_math


def fraction(flags: Tensor) -> float:
    """Share of True entries, exact (count / n in float64, not a float32 mean)."""
    return int(flags.sum()) / len(flags) if len(flags) else 0.0


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
    """
    torch.manual_seed(seed)
    model.eval()
    transfer = source is not None and source is not model
    source = source.eval() if transfer else model
    names = ["clean"] + [a.name for a in attacks] + ["worst"]
    if not len(images):  # an empty shard: a process of a torchrun evaluation with more processes than images
        none = {name: torch.zeros(0, dtype=torch.bool) for name in names}
        if source_correct is not None:
            source_correct.update(none)
        return dict(none)
    correct: dict[str, list[Tensor]] = {name: [] for name in names}
    own: dict[str, list[Tensor]] = {name: [] for name in names}
    batches = DeviceLoader(images, batch_size, device, shuffle=False, drop_last=False)
    bar = _bar(progress and bool(attacks), len(batches) * len(attacks))
    with float32_math(device):  # attacks in IEEE float32 (speed.py)
        try:
            for i, (x, y) in enumerate(batches):
                with torch.no_grad():
                    survived = model(x).argmax(1) == y
                    own_survived = source(x).argmax(1) == y if transfer else survived
                correct["clean"].append(survived.cpu())
                own["clean"].append(own_survived.cpu())
                for attack in attacks:
                    if bar is not None:
                        bar.set_postfix_str(attack.name, refresh=False)
                    if isinstance(attack, AutoAttack) and state_dir is not None:
                        path = state_dir / f"{_safe(attack.name)}-chunk{i:05d}.pt"
                        adv = attack(source, x, y, state_path=path)
                    else:
                        adv = attack(source, x, y)
                    with torch.no_grad():
                        ok = model(adv).argmax(1) == y
                        own_ok = source(adv).argmax(1) == y if transfer else ok
                    correct[attack.name].append(ok.cpu())
                    own[attack.name].append(own_ok.cpu())
                    survived, own_survived = survived & ok, own_survived & own_ok
                    if bar is not None:
                        bar.update()
                correct["worst"].append(survived.cpu())
                own["worst"].append(own_survived.cpu())
        finally:
            if bar is not None:
                bar.close()
    if source_correct is not None:
        source_correct.update({name: torch.cat(parts) for name, parts in own.items()})
    return {name: torch.cat(parts) for name, parts in correct.items()}


def _bar(enabled: bool, total: int):
    """A tqdm bar over (batch, attack) pairs on a terminal, or None."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="attacking", unit="batch-attack", leave=False, file=sys.stderr)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


