"""Data a Python user already holds: tensors or a map-style `torch.utils.data.Dataset`,
for `learn2defend.train(config, data=...)`.

Either is read once into an `ImageData` (uint8, like every in-memory set: float images are
rounded to the nearest 1/255), then split like any data set (validation carved by
split_seed). The set's name is "python:" plus a fingerprint of its bytes, which the run's
checkpoints record: a resume must be given the same data again, and is refused otherwise.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from learn2defend.errors import UserError

PYTHON_SPEC = "python"  # TrainConfig.dataset of a run trained on data given from Python
NEEDS_DATA = ("was trained on data given from Python (train(config, data=...)); pass the same data again "
              "(learn2defend.train(config, data=..., resume=True)), or evaluate it with learn2defend.evaluate_model "
              "or eval --dataset SPEC")


def _as_uint8(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise UserError(f"{what} must be float in [0, 1] or uint8, not {images.dtype}")
    if images.numel() and not (float(images.min()) >= 0 and float(images.max()) <= 1):
        raise UserError(f"{what} must lie in [0, 1] (pixel units), got values in "
                        f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    return images.detach().mul(255).round_().to(torch.uint8).contiguous()


def from_python(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) on the CPU from `(images, labels)` (images
    float in [0, 1] or uint8, [N, C, H, W]; integer labels [N]) or from a map-style dataset whose
    items are (image [C, H, W], int label). UserError for anything else."""
    if isinstance(data, tuple) and len(data) == 2:
        images, labels = (torch.as_tensor(t) for t in data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        n = len(data)
        if n == 0:
            raise UserError("data= is an empty dataset")
        items = [data[i] for i in range(n)]
        try:
            shapes = {tuple(torch.as_tensor(x).shape) for x, _ in items}
            if len(shapes) > 1:
                raise UserError(f"data='s images have different shapes ({sorted(shapes)[:2]}); resize them to one "
                                "shape, or write them to a folder and train on folder:PATH --loader stream")
            images = torch.stack([_as_uint8(torch.as_tensor(x), "data='s images") for x, _ in items])
            labels = torch.tensor([int(y) for _, y in items], dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise UserError(f"data='s items must be (image tensor [C, H, W], int label): {e}") from None
    else:
        raise UserError("data= takes (images, labels) tensors or a map-style torch Dataset of (image, label), "
                        f"not {type(data).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"data='s images must be [N, C, H, W] with 1 or 3 channels, got {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"data='s labels must be [N] for {len(images)} images, got {list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UserError(f"data='s labels must be integers, not {labels.dtype}")
    labels = labels.long()
    if len(labels) and int(labels.min()) < 0:
        raise UserError("data='s labels must be >= 0 (class indices)")
    if len(torch.unique(labels)) < 2:
        raise UserError("data= needs images of at least two classes")
    return _as_uint8(images, "data='s images"), labels


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """16 hex digits of a sha256 over the images' and labels' bytes and shapes."""
    h = hashlib.sha256(repr((tuple(images.shape), tuple(labels.shape))).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]
