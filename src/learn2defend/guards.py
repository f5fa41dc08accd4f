"""What stops or protects a training run.

`TrainingInterrupted` (SIGINT or SIGTERM, turned into a flag by `StopFlag` so that the loop
saves first), `TrainingDiverged` (a non-finite loss, `check_finite`, or non-finite weights),
`SkipGuard` (on_nonfinite="skip": a step that went non-finite is undone), and `collapsed`
(catastrophic overfitting, marked in the epoch records). The loop in `learn2defend.train`
uses them; when it checks (STOP_CHECK_EVERY, NONFINITE_CHECK_EVERY) is its own.
"""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import UserError
from .memory import PerturbationMemory
from .methods import Metrics, StepContext
from .runs import LAST


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved and can be resumed."""


class TrainingDiverged(UserError):
    """The loss or the weights became non-finite (on_nonfinite="stop"); the last good
    checkpoint was kept. A UserError: the CLI prints one line and exits 2."""


# Catastrophic overfitting (Wong et al. 2020): within one epoch, validation PGD-10 accuracy
# falls to less than COLLAPSE_FRACTION of the previous epoch's, and by at least
# COLLAPSE_MIN_DROP, while clean accuracy rises. FGSM-RS collapses from tens of percent to
# near zero in an epoch or two; an ordinary noisy epoch moves robust accuracy by a few points.
COLLAPSE_FRACTION = 0.5
COLLAPSE_MIN_DROP = 0.05


def collapsed(before: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether the epoch record `now` shows catastrophic overfitting after the record `before`
    (both metrics.jsonl records with val_clean_acc and val_pgd10_acc; False without the latter)."""
    if "val_pgd10_acc" not in before or "val_pgd10_acc" not in now:
        return False
    robust_before, robust_now = before["val_pgd10_acc"], now["val_pgd10_acc"]
    return (robust_now < COLLAPSE_FRACTION * robust_before and robust_before - robust_now >= COLLAPSE_MIN_DROP
            and now["val_clean_acc"] > before["val_clean_acc"])


def holds(out: Path, saved_at: tuple[int, int] | None) -> str:
    """What the run folder `out` still holds, for a message about a run that stopped."""
    if saved_at is None:
        return f"no checkpoint was written to {out}"
    epoch, batch = saved_at
    where = f"the end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
    return f"{out / LAST} still holds {where}"


def check_finite(sums: dict[str, Any], out: Path, where: str, saved_at: tuple[int, int] | None) -> None:
    """Stop (TrainingDiverged) when the loss summed so far is not finite; one host sync."""
    loss = sums.get("loss")
    if loss is not None and not bool(torch.isfinite(loss)):
        raise TrainingDiverged(
            f"training diverged: non-finite loss in {where}; {holds(out, saved_at)}; "
            "resume with --on-nonfinite skip to skip such steps, or start over with a lower --lr (--overwrite)"
        )


class SkipGuard:
    """on_nonfinite="skip": undo a training step whose loss or new weights are not finite.

    The step functions update the weights themselves, so the guard copies the weights,
    buffers and optimizer states (and the method's own state: LIET's class-wise starts, the
    rows FGSM-PGI's per-image memory overwrites) before every step and puts them back after a
    step that went non-finite. Cost per step: one copy of that state and one host-device sync for
    the check; small next to a forward and backward pass, but not free, which is why
    "stop", the default, checks only at checkpoints, every train.NONFINITE_CHECK_EVERY steps
    and at epoch ends.
    """

    def __init__(self, modules: list[nn.Module | None], optimizers: list[torch.optim.Optimizer | None],
                 ranks: distributed.Ranks) -> None:
        self.modules = [m for m in modules if m is not None]
        self.optimizers = [o for o in optimizers if o is not None]
        self.ranks = ranks
        self.ctx: StepContext | None = None  # its `state` dict (set by the loop)
        self.memory: PerturbationMemory | None = None  # the per-image memory, if the method has one
        self._saved: tuple[list, list, dict] = ([], [], {})

    def run(self, step: Callable[[], Metrics]) -> Metrics | None:
        """`step()`'s metrics; None, with the state it found put back, when its loss or the
        new weights are not finite on some rank (as if its batch had not been drawn)."""
        self.snapshot()
        metrics = step()
        if self.finite(metrics["loss"]):
            return metrics
        self.restore()
        return None

    def snapshot(self) -> None:
        self._saved = (
            [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules],
            [copy.deepcopy(o.state_dict()) for o in self.optimizers],
            {} if self.ctx is None else copy.deepcopy(self.ctx.state),
        )
        if self.memory is not None:
            self.memory.begin()

    def finite(self, loss: torch.Tensor) -> bool:
        flags = [torch.isfinite(loss).all()]
        tensors = [t for m in self.modules for t in m.state_dict().values() if t.is_floating_point()]
        flags += [torch.isfinite(t).all() for t in tensors]
        return not self.ranks.any(not bool(torch.stack(flags).all()))  # every rank skips, or none

    def restore(self) -> None:
        weights, optimizer_states, method_state = self._saved
        for m, w in zip(self.modules, weights, strict=True):
            m.load_state_dict(w)
        for o, s in zip(self.optimizers, optimizer_states, strict=True):
            o.load_state_dict(s)
        if self.ctx is not None:
            self.ctx.state = method_state
        if self.memory is not None:
            self.memory.rollback()


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can save first."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
