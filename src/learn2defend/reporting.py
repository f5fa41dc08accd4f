"""What the training loop reports: an epoch's record for metrics.jsonl (`epoch_record`)
and its line in the log (`format_record`), the run's header line (`header`, with the
smallcnn advice), the progress bar, TensorBoard's writer, and `log` (stderr, rank 0 only).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .data import Dataset
from .errors import UserError
from .settings import ResolvedConfig


def epoch_record(epoch: int, sums: dict[str, Any], optimizer: torch.optim.Optimizer, seconds: float) -> dict[str, Any]:
    n = sums["n"]
    record = {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": sums["loss"].item() / n,
        "train_acc": sums["correct"].item() / n,
        "seconds": round(seconds, 3),
    }
    if "attack_success" in sums:
        record["attack_success"] = sums["attack_success"].item() / n
    return record


def format_record(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"loss {r['train_loss']:.4f}", f"train acc {r['train_acc']:.3f}"]
    if "attack_success" in r:
        parts.append(f"attack success {r['attack_success']:.3f}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']} non-finite steps")
    parts.append(f"val clean {r['val_clean_acc']:.3f}")
    if "val_pgd10_acc" in r:
        parts.append(f"val pgd10 {r['val_pgd10_acc']:.3f}" + (" (collapsed)" if r.get("collapsed") else ""))
    parts.append(f"{r['seconds']:.1f}s")
    return " | ".join(parts)


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: "
                        "pip install 'learn2defend[tensorboard]'") from None


@contextlib.contextmanager
def tensorboard_writer(out: Path, enabled: bool):
    """A TensorBoard writer for RUN/tensorboard/ (one scalar per metric and epoch), or None."""
    if not enabled:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        yield writer
    finally:
        writer.close()


# smallcnn pools once, so its last conv sees 10x10-pixel patches, which global pooling then
# averages: enough for 8x8 digits, a bag of local strokes on larger images. On a 5,000-image
# MNIST folder (28x28, --no-flip, 2 epochs, lr 0.1) it reached 0.66 training accuracy where
# smallcnn-pooled reached 0.87, at a third of the cost (docs/results.md, "Folder data sets").
SMALLCNN_MAX_SIZE = 16
SMALLCNN_ADVICE = ("note: smallcnn sees 10x10-pixel patches before its global pooling, made for 8x8 images; "
                   "on images this large --model smallcnn-pooled (or a ResNet) learns faster and costs less")


def header(cfg: ResolvedConfig, data: Dataset, device: torch.device, world: int) -> str:
    """One line saying what this run trains, on what, and where."""
    a = cfg.attacker
    method = cfg.method + (f" ({a.name} attacker x{a.width:g})" if a is not None else "")
    where = str(device) + (" (auto: no CUDA here)" if cfg.run.device == "auto" and device.type == "cpu" else "")
    if world > 1:
        where += f" x {world} processes"
    augment = []
    if cfg.data.augment and data.streamed:
        augment.append(f"random-resized crop {data.image_shape[1]} px")
    if cfg.data.augment and data.crop_padding:
        augment.append(f"crop {data.crop_padding} px")
    if cfg.data.augment and data.flip:
        augment.append("flip")
    norm = "" if cfg.norm == "linf" else f" ({cfg.norm})"  # l-inf runs keep the header they always had
    return (f"train {cfg.run.out}: {method}, {cfg.model} on {data.name}, eps {cfg.eps:g}{norm}, {cfg.epochs} epochs, "
            f"augmentation {' + '.join(augment) or 'none'}, device {where}, "
            f"loader {data.loader}{f' ({data.loader_reason})' if data.loader_reason else ''}")


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def log(message: str) -> None:
    if not distributed.is_main():
        return
    print(message, file=sys.stderr, flush=True)


def progress(batches, total: int, epoch: int, cfg: ResolvedConfig):
    """A tqdm bar on a terminal; nothing (the per-epoch line) otherwise."""
    if not (cfg.run.progress and sys.stderr.isatty()) or not distributed.is_main():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)
