"""A per-image memory for training methods that remember each image's last perturbation
(FGSM-PGI, `learn2defend.methods.fgsm_pgi_step`; the remembering learned start,
`fgsm-sdi-memory`).

`PerturbationMemory` holds float32 buffers of the training split's shape [N, C, H, W] on
the training device: the perturbation to start from at the image's next visit and, for
FGSM-PGI, a gradient momentum (`momentum=False`: the perturbation alone). Row i belongs to
the image at index i of the training split (the index the loaders yield with
`iterate(..., indices=True)`). The cost is 4 bytes x N x C x H x W per buffer: CIFAR-10's
50,000 training images (3 x 32 x 32) take 614 MB per buffer, 1.23 GB for two; ImageNet's
1.28 M images at 224 x 224 would take 771 GB per buffer, so `check_fits` refuses what does
not fit before training starts.

Under torchrun every rank keeps a full-size memory and writes the rows of the images it
trains on; an image's rows are thus fresh on the rank that saw it last. `merge` (every
rank, at an epoch's end and before a checkpoint) gathers the rows each rank wrote since the
last merge onto every rank, so that all ranks then hold the same memory, every row as its
image's last visit left it, whichever rank that visit was on: the next epoch, whose shards
are drawn anew, starts every image from its own last perturbation, as one process would.
In one epoch an image is visited once, on one rank, so the gathered rows never collide.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import UserError

BYTES_PER_VALUE = 4  # float32


class PerturbationMemory:
    """Per-image start perturbation `delta` and gradient `momentum`, float32 [N, C, H, W] on
    `device`, zero until `reset`. `momentum=False`: no momentum buffer (`momentum` is None, and
    so is what `read` gives for it). `track`: remember the rows written since the last `merge`
    (needed only with more than one process)."""

    def __init__(self, n: int, shape: tuple[int, ...], device: torch.device | str, *, momentum: bool = True,
                 track: bool = False) -> None:
        self.delta = torch.zeros(n, *shape, device=device)
        self.momentum = torch.zeros_like(self.delta) if momentum else None
        self.track = track
        self._written: list[Tensor] = []  # index tensors of the rows written since the last merge
        # Between begin() and rollback(): (rows, their values before) of every write, oldest first.
        self._undo: list[tuple[Tensor, dict[str, Tensor]]] | None = None
        self._written_at_begin = 0

    @staticmethod
    def nbytes(n: int, shape: tuple[int, ...], buffers: int = 2) -> int:
        """Bytes of `buffers` buffers (2: with momentum) for `n` images of `shape`."""
        return buffers * n * math.prod(shape) * BYTES_PER_VALUE

    @property
    def buffers(self) -> dict[str, Tensor]:
        """{"delta": ..., "momentum": ...}: the buffers this memory holds."""
        return {"delta": self.delta} | ({} if self.momentum is None else {"momentum": self.momentum})

    def __len__(self) -> int:
        return len(self.delta)

    def reset(self, delta: Tensor) -> None:
        """Every row's perturbation set to `delta` [N, C, H, W], every momentum to zero."""
        self.delta.copy_(delta)
        if self.momentum is not None:
            self.momentum.zero_()
        self._written.clear()

    def read(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Copies of the rows `idx` (int64 [B] on the memory's device): (delta, momentum)."""
        return self.delta[idx], (None if self.momentum is None else self.momentum[idx])

    @torch.no_grad()
    def write(self, idx: Tensor, delta: Tensor, momentum: Tensor | None = None) -> None:
        """Rows `idx` become `delta` and `momentum` ([B, C, H, W]); values that are not finite
        (a step whose gradient overflowed) are stored as 0, so one bad step does not poison
        an image's later visits. No host sync."""
        if self._undo is not None:  # kept for rollback()
            self._undo.append((idx, {name: buffer[idx] for name, buffer in self.buffers.items()}))
        self.delta[idx] = torch.nan_to_num(delta.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.momentum is not None:
            self.momentum[idx] = torch.nan_to_num(momentum.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
        if self.track:
            self._written.append(idx)

    def begin(self) -> None:
        """From now on keep what each `write` replaces, until `rollback` or the next `begin`
        (on_nonfinite=skip: a step that is undone must not leave its writes behind). Costs one
        copy of the written rows per write."""
        self._undo, self._written_at_begin = [], len(self._written)

    @torch.no_grad()
    def rollback(self) -> None:
        """Put back every row written since `begin`, as if those writes had not happened."""
        for idx, before in reversed(self._undo or []):
            for name, rows in before.items():
                self.buffers[name][idx] = rows
        del self._written[self._written_at_begin:]
        self._undo = None

    @torch.no_grad()
    def merge(self) -> None:
        """Every rank: the rows any rank wrote since the last merge, on every rank (one
        all-gather of indices, perturbations and momenta). Every rank must call it at the same
        point, having written the same number of rows (the loaders give every rank the same
        number of batches of the same size). Nothing without a process group of several."""
        written, self._written = self._written, []
        if not (self.track and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        world = dist.get_world_size()
        idx = torch.cat(written) if written else torch.zeros(0, dtype=torch.long, device=self.delta.device)
        all_idx = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(all_idx, idx)
        for buffer in self.buffers.values():
            rows = buffer[idx]
            gathered = [torch.empty_like(rows) for _ in range(world)]
            dist.all_gather(gathered, rows)
            for i, r in zip(all_idx, gathered, strict=True):
                buffer[i] = r

    def state_dict(self) -> dict[str, Any]:
        return dict(self.buffers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The buffers of a checkpoint; ValueError if their shapes are not this memory's."""
        for name, mine in self.buffers.items():
            theirs = state[name]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"its per-image memory {name} has shape {tuple(theirs.shape)}, "
                                 f"this run's {tuple(mine.shape)}")
            mine.copy_(theirs)
        self._written.clear()


def check_fits(method: str, n: int, shape: tuple[int, ...], limit: int, what: str, buffers: int = 2) -> None:
    """UserError when the memory (`buffers` buffers) of `n` images of `shape` is over `limit`
    bytes (`what` says which limit, e.g. "0.5 of the free memory of cuda:0")."""
    need = PerturbationMemory.nbytes(n, shape, buffers)
    if need > limit:
        size = " x ".join(map(str, (buffers, n, *shape)))
        raise UserError(f"--method {method} keeps a per-image memory of {size} "
                        f"floats ({need / 1e9:.3g} GB) on the training device, more than {limit / 1e9:.3g} GB "
                        f"({what}); train on fewer images (--train-size) or smaller ones (--image-size)")
