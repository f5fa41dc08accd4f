"""The one training loop every method shares.

`train` resolves a `TrainConfig` into a `ResolvedConfig` (checked, every default filled
in), builds the networks and optimizers (`build_parts`), and runs epochs of the method's
step (`learn2defend.methods`) with validation, checkpoints and stopping; the run folder
it writes is described in `learn2defend.runs`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed, speed
from .attacks import correct_predictions, pgd_delta
from .config import TrainConfig, load_resolved
from .data import (
    NEEDS_DATA,
    PYTHON_SPEC,
    Dataset,
    DeviceLoader,
    FileData,
    ImageData,
    StreamLoader,
    check_streamed,
    load_dataset,
    make_loader,
    python_dataset,
)
from .errors import UserError
from .memory import PerturbationMemory, check_fits
from .methods import METHOD_RECORDS, STEPS, Metrics, StepContext, attacker_in_channels
from .models import made_with
from .models.attackers import ATTACKER_LAYOUT
from .runs import (
    BEST,
    CONFIG,
    LAST,
    METRICS,
    FolderLock,
    Run,
    architecture,
    build_attacker,
    build_classifier,
    changed_settings,
    check_architecture,
    check_attacker_layout,
    checked_meta,
    claim_folder,
    data_meta,
    load_run,
    load_weights,
    prepare_out,
    resolve_device,
    shown,
)
from .settings import OptimizerSettings, ResolvedConfig
from .version import __version__

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the run was saved and can be resumed."""


class TrainingDiverged(UserError):
    """The loss or the weights became non-finite (on_nonfinite="stop"); the last good
    checkpoint was kept. A UserError: the CLI prints one line and exits 2."""


def make_optimizer(settings: OptimizerSettings, params, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD or Adam as `settings` say; `fused`: PyTorch's fused kernels (None: its default choice)."""
    o = settings
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)


# OneCycle's peak, as a share of the run (Wong et al. 2020 peak at 2/5 of training).
ONECYCLE_PEAK = 0.4


def schedule(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
             total_steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule `settings.schedule` says, as PyTorch's own scheduler:

    - "multistep": MultiStepLR, the learning rate times `gamma` after each of the `milestones`
      epochs; stepped once per epoch.
    - "cosine": CosineAnnealingLR from `lr` down to 0 over `total_steps` batches (T_max; the
      last batch trains at a small positive rate); stepped once per batch.
    - "onecycle": OneCycleLR over `total_steps` batches with the cyclic schedule of Wong et al.
      2020 ("Fast is better than free", their code's `lr_schedule`: np.interp over
      [0, 2/5, 1] of the run, [0, lr, 0], read after each batch): linear up to `lr` at 2/5 of
      training, then linear down to 0; stepped once per batch. pct_start 0.4 and
      anneal_strategy "linear" give the shape; div_factor = 0.4 x total_steps makes the first
      batch's rate lr / (0.4 x total_steps), so batch t (0-based) trains at exactly Wong et al.'s
      lr (t + 1) / (0.4 x total_steps) on the way up and lr (total_steps - t - 1) /
      (0.6 x total_steps) on the way down, but for torch's final floor (min_lr = first rate /
      1e4, not 0). Their code puts the peak at epoch floor(2 x epochs / 5); here it is at 2/5
      of the batches exactly. Momentum is not cycled (cycle_momentum False: --momentum holds,
      as in Wong et al.). The fast-AT benchmark of Pan & Yao 2026 (fzjcdt/FastAT_Benchmark)
      instead calls OneCycleLR with torch's defaults (cosine annealing, peak at 0.3, cycled
      momentum) and steps it once per epoch.

    `total_steps` (batches of the whole run: epochs x batches per epoch, as the training
    loader counts them) is needed by cosine and onecycle. ValueError for an unknown schedule
    or a missing `total_steps` (config.validate refuses the former first)."""
    lr = torch.optim.lr_scheduler
    if settings.schedule == "multistep":
        return lr.MultiStepLR(optimizer, list(settings.milestones), settings.gamma)
    if total_steps is None or total_steps < 1:
        raise ValueError(f"the {settings.schedule} schedule needs the run's total steps, got {total_steps}")
    if settings.schedule == "cosine":
        return lr.CosineAnnealingLR(optimizer, T_max=total_steps)
    if settings.schedule == "onecycle":
        return lr.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total_steps, pct_start=ONECYCLE_PEAK,
                             anneal_strategy="linear", cycle_momentum=False,
                             div_factor=max(ONECYCLE_PEAK * total_steps, 1.0))
    raise ValueError(f"unknown learning-rate schedule {settings.schedule!r}")


def per_batch(settings: OptimizerSettings) -> bool:
    """Whether the schedule steps after every batch (cosine, onecycle) or every epoch (multistep)."""
    return settings.schedule != "multistep"


# ---- evaluation during training ------------------------------------------------------------


@torch.no_grad()
def _clean_correct(model: nn.Module, data: ImageData | FileData, device: torch.device, batch: int = 512,
                   workers: int | None = None) -> torch.Tensor:
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in make_loader(data, batch, device, workers=workers, shuffle=False, drop_last=False):
        correct += correct_predictions(model(x), y).sum()
    return correct


def _robust_correct(
    model: nn.Module, data: ImageData | FileData, eps: float, device: torch.device, batch: int = 256,
    workers: int | None = None, norm: str | None = None,
) -> torch.Tensor:
    """PGD-10 (random start, step eps/4) under `norm` (l-inf by default) on the given images;
    the model must be in eval mode."""
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in make_loader(data, batch, device, workers=workers, shuffle=False, drop_last=False):
        delta = pgd_delta(model, x, y, eps, steps=10, step_size=eps / 4, random_start=True, norm=norm)
        with torch.no_grad():
            correct += correct_predictions(model(x + delta), y).sum()
    return correct


def validate(model: nn.Module, data: Dataset, config: ResolvedConfig, device: torch.device) -> dict[str, float]:
    """Clean accuracy on the validation split and PGD-10 accuracy on its first
    `val_robust_n` images, in float32 whatever the training step's switches."""
    model.eval()
    try:
        with speed.float32_math(device):
            val, workers = data.val, config.data.workers  # a streamed val split: the eval transform
            result = {"val_clean_acc": _clean_correct(model, val, device, workers=workers).item() / len(val)}
            n = min(config.run.val_robust_n, len(val))
            if n and config.eps > 0:
                subset = val.head(n)
                result["val_pgd10_acc"] = _robust_correct(model, subset, config.eps, device, workers=workers,
                                                          norm=config.norm).item() / n
            return result
    finally:
        model.train()


# ---- the loop ------------------------------------------------------------------------------


RESUMABLE_CHANGES = {"epochs", "device", "progress", "checkpoint_every", "out", "data_dir", "download", "on_nonfinite",
                     "workers", "tensorboard", "channels_last", "compile", "tf32", "cudnn_benchmark"}


def _preflight(model: nn.Module, attacker: nn.Module | None, cfg: ResolvedConfig, meta: dict[str, Any],
               device: torch.device) -> None:
    """Run the classifier and the attacker once on two blank images, so that a network
    that cannot take these images fails before the run folder is touched. Eval mode and
    no gradients: no weight, statistic or random state changes."""
    c, h, w = meta["image_shape"]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(2, c, h, w, device=device))
            if attacker is not None:
                attacker.eval()
                attacker(torch.zeros(2, attacker_in_channels(cfg.method, c), h, w, device=device), cfg.eps)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {cfg.model} (or its attacker) cannot take {c}x{h}x{w} images: {first}") from None
    finally:
        model.train()
        if attacker is not None:
            attacker.train()


def train(config: TrainConfig | ResolvedConfig, *, resume: bool = False, overwrite: bool = False,
          data: object | None = None) -> Run:
    """Train a classifier with `config.method`; return the loaded run. A `ResolvedConfig` (e.g. a
    `dataclasses.replace` of a run's) is checked again through its flat form first.

    With `resume`, a run folder holding a checkpoint is continued from it (an empty or
    missing folder simply starts); with `overwrite`, an existing folder is replaced.
    Everything is validated before anything is written.

    `data`: train on what a Python user holds instead of `config.dataset`: `(images, labels)`
    (float [N, C, H, W] in [0, 1] or uint8; integer labels [N]) or a map-style dataset of
    (image [C, H, W], int label), held in memory as uint8 (see `data.python_dataset`). The run
    records dataset "python" and the data's fingerprint: resuming it needs the same data again.
    """
    flat = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config.to_dict())
    if data is not None:
        if flat.dataset not in (TrainConfig.dataset, PYTHON_SPEC):
            raise UserError(f"train(config, data=...) trains on the data given; leave config.dataset "
                            f"({flat.dataset!r}) out, the run records it as '{PYTHON_SPEC}'")
        flat = replace(flat, dataset=PYTHON_SPEC)
    cfg = flat.resolve()
    lock = FolderLock(Path(cfg.run.out))
    lock.acquire()  # before reading the folder, if there is one
    try:
        return _train(cfg, resume, overwrite, lock, data)
    finally:
        lock.release()


def _train(cfg: ResolvedConfig, resume: bool, overwrite: bool, lock: FolderLock, given: object | None = None) -> Run:
    """Check everything, build the run, take the folder, train; in that order, so that bad
    input fails before anything is written."""
    out = Path(cfg.run.out)
    if cfg.run.tensorboard:
        _require_tensorboard()
    continuing = prepare_out(out, resume, overwrite)
    stored = _check_resumable(out, cfg) if continuing else None
    device = distributed.local_device(resolve_device(cfg.run.device))
    world = distributed.world_size()
    if cfg.run.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (nccl): PyTorch's SyncBatchNorm does not run on the CPU; "
                        "leave it out (each process then normalizes with its own batch statistics)")
    data = _training_data(cfg, device, given, continuing)
    # unset speed switches: this device's defaults, decided before anything is built (and
    # written: config.json records what runs)
    steps_per_epoch = _batches_per_epoch(cfg, data, world)
    cfg, switches = speed.resolve_switches(cfg, device, cfg.epochs * steps_per_epoch)
    speed.check_switches(cfg.speed, device, world)
    loop = _Loop(cfg, out, device, data, build_parts(cfg, data_meta(data), device, world, fresh=stored is None,
                                                     steps_per_epoch=steps_per_epoch))
    if stored is not None:
        loop.restore(stored)
    # Nothing was written so far; from here on the run folder is ours (rank 0's alone).
    loop.ranks.barrier()  # every rank has read the folder before rank 0 changes it
    claim_folder(out, cfg, overwrite, loop.pos.history if continuing else None, lock)
    if continuing:
        if loop.pos.epoch < cfg.epochs:
            _log(f"resuming {out} at epoch {loop.pos.epoch + 1}, batch {loop.pos.batch}")
        else:
            _log(f"{out} has finished its {loop.pos.epoch} epochs; nothing to train")
    _log(_header(cfg, data, device, world))
    _log(switches)
    if cfg.model == "smallcnn" and min(data.image_shape[1:]) > SMALLCNN_MAX_SIZE:
        _log(SMALLCNN_ADVICE)
    loop.run()
    if world > 1:
        loop.ranks.barrier()  # rank 0 has written everything
        if not loop.ranks.is_main:  # the same weights as rank 0's, without every process reading the folder
            return loop.as_run()
    return load_run(out, "last", device)


def _check_resumable(out: Path, cfg: ResolvedConfig) -> ResolvedConfig:
    """The stored config of the run being continued; UserError if `cfg` changes what it computes."""
    # resolved again: a field added since the run was written gets the value the run had
    stored = load_resolved(out / CONFIG)
    if stored.data.dataset == PYTHON_SPEC and cfg.data.dataset != PYTHON_SPEC:
        raise UserError(f"'{out}' {NEEDS_DATA}")
    same_schedule = cfg.optimizer.schedule == stored.optimizer.schedule  # else changed_settings says so
    if per_batch(stored.optimizer) and same_schedule and cfg.epochs != stored.epochs:
        raise UserError(f"cannot resume '{out}' with --epochs {cfg.epochs}: its --lr-schedule "
                        f"{stored.optimizer.schedule} spans the run's {stored.epochs} epochs; give --epochs "
                        f"{stored.epochs} (only a multistep schedule may be extended)")
    differ = changed_settings(stored, cfg, RESUMABLE_CHANGES | {"batch_size"})
    if differ:  # the values too: a default that changed between versions is set back with its flag
        raise UserError(f"cannot resume '{out}' with other settings: {differ}; give the run's values to continue it")
    return stored


def _batches_per_epoch(cfg: ResolvedConfig, data: Dataset, world: int) -> int:
    """Steps of one epoch, as the training loader counts them (`_train_loader`)."""
    images = len(data.train) // world
    return images // cfg.batch_size if images >= cfg.batch_size else 1


def _training_data(cfg: ResolvedConfig, device: torch.device, given: object | None = None,
                   continuing: bool = False) -> Dataset:
    """The data set, in memory or streamed as --loader says (data.load_dataset decides), or
    the data `given` from Python, with the run's subset and augmentation overrides applied; a
    streamed set's unreadable files are left out (or refused) here, before anything is written."""
    d = cfg.data
    val_size = d.val_size if d.val_size < 1 else int(d.val_size)
    if d.dataset == PYTHON_SPEC:
        if given is None and continuing:
            raise UserError(f"'{cfg.run.out}' {NEEDS_DATA}")
        if given is None:
            raise UserError(f"dataset '{PYTHON_SPEC}' is data given from Python: pass it as "
                            "train(config, data=(images, labels)) or data=dataset")
        data = python_dataset(given, val_size=val_size, split_seed=d.split_seed)
    else:
        data = load_dataset(
            d.dataset, d.data_dir, val_size=val_size, split_seed=d.split_seed, download=d.download,
            image_size=d.image_size, on_bad_image=d.on_bad_image, loader=d.loader, device=device,
        )
    if d.train_size is not None:
        data.train = data.train.head(d.train_size)
    data = check_streamed(data, d.on_bad_image)
    if d.flip is not None:  # the data set's augmentation, where the run overrides it
        data.flip = d.flip
    if d.crop_padding is not None and data.streamed:
        raise UserError(f"{data.name} streams from its files and crops with RandomResizedCrop; --crop-padding "
                        "applies to data sets in memory (leave it out, or use --loader memory if it fits)")
    if d.crop_padding is not None:
        if d.crop_padding > min(data.image_shape[1:]):  # a crop would then see padding only
            raise UserError(f"--crop-padding {d.crop_padding} is larger than the {data.image_shape[1]}x"
                            f"{data.image_shape[2]} images; use at most {min(data.image_shape[1:])}")
        data.crop_padding = d.crop_padding
    return data


@dataclass
class Parts:
    """What a run trains: the networks, their optimizers and learning-rate schedules, and
    the StepContext its training step gets. With --compile the context holds the compiled
    networks; `model` and `attacker` are always the originals, which checkpoints save."""

    meta: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    attacker: nn.Module | None = None
    attacker_optimizer: torch.optim.Optimizer | None = None
    attacker_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    ctx: StepContext | None = None
    ema: WeightAverage | None = None  # --ema: the averaged classifier, updated after every step

    @property
    def evaluated(self) -> nn.Module:
        """The classifier that is validated, kept as best, evaluated and exported: the
        averaged one under --ema, else the trained one."""
        return self.model if self.ema is None else self.ema.module

    def step(self, cfg: ResolvedConfig, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], Metrics]:
        """One training step of `cfg.method` on a batch, with the speed switches around it."""
        return speed.wrap_step(functools.partial(STEPS[cfg.method], self.ctx), cfg.speed, device)


def build_parts(cfg: ResolvedConfig, meta: dict[str, Any], device: torch.device, world: int = 1, *,
                fresh: bool = True, steps_per_epoch: int = 1) -> Parts:
    """The networks, optimizers and schedules of a run, as `train` builds them (also `bench`);
    `fresh` (not a resumed run, whose checkpoint holds the weights) reads --pretrained."""
    torch.manual_seed(cfg.run.seed)
    model = build_classifier(cfg, meta, cfg.pretrained if fresh else None).to(device)
    attacker = build_attacker(cfg, meta)
    if cfg.init:
        init = load_run(cfg.init, with_attacker=False)
        mine, theirs = architecture(cfg, meta, model.state_dict()), architecture(init.config, init.meta,
                                                                                  init.model.state_dict())
        differ = [f"{k} {shown(theirs[k])} (this run: {shown(mine[k])})"
                  for k in ("model", "num_classes", "image_shape", "fingerprint") if theirs[k] != mine[k]]
        if init.meta["classes"] != meta["classes"] and theirs["num_classes"] == mine["num_classes"]:
            differ.append(f"classes {shown(init.meta['classes'])} (this run: {shown(meta['classes'])})")
        if differ:
            raise UserError(f"--init {cfg.init} cannot start this run: it holds {', '.join(differ)}")
        model.load_state_dict(init.model.state_dict())
    if attacker is not None:
        attacker.to(device)
    # Identical starting weights everywhere (the seed gives them already; this makes sure).
    distributed.broadcast_modules([model, attacker])
    if cfg.run.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model, step_attacker = speed.prepare_modules(model, attacker, cfg.speed)
    fused = True if speed.fused_optimizers(cfg.speed) else None
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), fused)
    parts = Parts(meta, model, optimizer, schedule(optimizer, cfg.optimizer, cfg.epochs * steps_per_epoch))
    if attacker is not None:
        parts.attacker = attacker
        parts.attacker_optimizer = make_optimizer(cfg.attacker.optimizer, attacker.parameters(), fused)
        parts.attacker_scheduler = schedule(parts.attacker_optimizer, cfg.attacker.optimizer)
    # Every later optimizer step first averages its gradients over the processes.
    distributed.install_gradient_sync([parts.optimizer, parts.attacker_optimizer])
    parts.ctx = StepContext(step_model, optimizer, cfg, step_attacker, parts.attacker_optimizer,
                            speed.grad_scaler(cfg.speed, device))
    if cfg.ema is not None:
        parts.ema = WeightAverage(model, cfg.ema)
    return parts


class WeightAverage(nn.Module):
    """An exponential moving average of a classifier's weights (--ema DECAY): after step t,
    avg <- d_t avg + (1 - d_t) weights, with d_t = min(DECAY, (1 + t) / (10 + t)).

    The warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) keeps the
    average from clinging to the first, random weights in short runs: 0.99 is reached after
    900 steps, 0.999 after 9,000. Batch-norm running statistics are averaged alike, so the
    averaged net normalizes with statistics of the weights it holds (as timm's ModelEmaV2);
    integer buffers (batch counts) are copied. The step t comes from the loop's position, so
    a resumed run averages exactly as an uninterrupted one, and nothing syncs with the host
    (torch's AveragedModel reads its counter on the host every update). Fast-AT benchmarks
    average weights this way (Pan & Yao 2026; de Jorge et al. 2022).

    `module` is the averaged classifier (eval mode, no gradients); the state dict holds its
    weights under "module.", which `learn2defend.runs.classifier_weights` reads.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*model.parameters(), *model.buffers()], strict=True))
        self._floats = [(a, m) for a, m in pairs if a.is_floating_point()]
        self._others = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the trained model's current weights after step `step` (0-based)."""
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_([a for a, _ in self._floats], [m.detach() for _, m in self._floats], weight)
        for a, m in self._others:
            a.copy_(m)


def _train_loader(cfg: ResolvedConfig, data: Dataset, device: torch.device,
                  ranks: distributed.Ranks) -> DeviceLoader | StreamLoader:
    # Under torchrun --batch-size is per process; rank r takes every world-th image of the
    # epoch's permutation, so global batch i is the same images for any world size.
    loader = make_loader(
        data.train, cfg.batch_size, device, workers=cfg.data.workers, on_bad_image=cfg.data.on_bad_image,
        shuffle=True,
        drop_last=len(data.train) // ranks.world >= cfg.batch_size,
        augment=cfg.data.augment, crop_padding=data.crop_padding, flip=data.flip, seed=cfg.run.seed,
        rank=ranks.rank, world_size=ranks.world,
    )
    if len(loader) == 0:
        raise UserError(f"--batch-size {cfg.batch_size} leaves no batch of {len(data.train)} training images")
    if min(cfg.batch_size, len(data.train)) < 2:  # batch norm cannot train on a single image
        raise UserError(f"training needs batches of at least 2 images; got --batch-size {cfg.batch_size} "
                        f"and {len(data.train)} training image(s)")
    return loader


@dataclass
class _Position:
    """Where a run stands, besides its weights: what a checkpoint stores to continue exactly."""

    epoch: int = 0  # finished epochs
    batch: int = 0  # global batches done in the current epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    sums: dict[str, Any] = field(default_factory=dict)  # metric sums of the current epoch so far
    best: float = -1.0  # best validation score so far (robust accuracy, else clean)
    saved_at: tuple[int, int] | None = None  # (epoch, batch) that LAST holds, for messages
    seconds: float = 0.0  # training seconds of the current epoch before this process took it up


class _Loop:
    """The training loop of one run: epochs of steps, checkpoints, validation, stopping."""

    def __init__(self, cfg: ResolvedConfig, out: Path, device: torch.device, data: Dataset, parts: Parts) -> None:
        self.cfg, self.out, self.device, self.data, self.parts = cfg, out, device, data, parts
        self.ranks = distributed.Ranks.current()
        self.loader = _train_loader(cfg, data, device, self.ranks)
        parts.ctx.batches_per_epoch = len(self.loader)
        _preflight(parts.model, parts.attacker, cfg, parts.meta, device)
        self.step = parts.step(cfg, device)
        self.guard: _SkipGuard | None = None  # on_nonfinite=skip: undoes a step that went non-finite
        if cfg.run.on_nonfinite == "skip":
            self.guard = _SkipGuard([parts.model, parts.attacker, parts.ema],
                                    [parts.optimizer, parts.attacker_optimizer], self.ranks)
        self.pos = _Position()
        self.memory = self._per_image_memory()
        if self.guard is not None:  # a skipped step leaves no trace in the method's own state either
            self.guard.ctx, self.guard.memory = parts.ctx, self.memory

    def _per_image_memory(self) -> PerturbationMemory | None:
        """The method's per-image memory over the training split (fgsm-pgi, fgsm-sdi-memory), on
        the training device, in the step's context; None for methods without one. UserError if
        it does not fit (learn2defend.memory.check_fits)."""
        kind = METHOD_RECORDS[self.cfg.method].per_image_memory
        if not kind:
            return None
        from .data.stream import available_memory

        n, shape, momentum = len(self.data.train), tuple(self.data.image_shape), "momentum" in kind
        check_fits(self.cfg.method, n, shape, *available_memory(self.device), buffers=1 + momentum)
        self.parts.ctx.memory = PerturbationMemory(n, shape, self.device, momentum=momentum,
                                                   track=self.ranks.world > 1)
        return self.parts.ctx.memory

    # The continuation state: with it, a resumed run computes bit for bit what an
    # uninterrupted one would. Data order and augmentation need no entry: DeviceLoader
    # derives them from (seed, epoch, batch).
    def state(self, epoch: int, batch: int, sums: dict[str, Any], with_memory: bool = True) -> dict[str, Any]:
        """`with_memory`: the per-image memory too (LAST, which resume reads; BEST does without)."""
        p = self.parts
        s = {
            "data": p.meta, "epoch": epoch, "batch": batch, "history": self.pos.history, "best": self.pos.best,
            "model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
            "arch": architecture(self.cfg, p.meta, p.model.state_dict()),
            "scheduler": p.scheduler.state_dict(), "sums": sums, "rng": ckpt.rng_state(),
            "world_size": self.ranks.world,
            # the epoch's training seconds so far, across resumes (0 at an epoch's end)
            "epoch_seconds": 0.0 if batch == 0 else self._epoch_seconds(),
            # what made it, for whoever reads a shared run (config.json stores --device as given)
            "made_with": {"learn2defend": __version__, "torch": torch.__version__, "device": str(self.device),
                          **made_with(self.cfg.model)},
        }
        if p.attacker is not None:
            s.update(attacker=p.attacker.state_dict(), attacker_layout=ATTACKER_LAYOUT,
                     attacker_optimizer=p.attacker_optimizer.state_dict(),
                     attacker_scheduler=p.attacker_scheduler.state_dict())
        if p.ctx.scaler is not None:  # --amp fp16: the loss scale and its growth counter
            s["scaler"] = p.ctx.scaler.state_dict()
        if p.ema is not None:  # load_run takes the classifier from here (runs.EMA)
            s["ema"] = p.ema.state_dict()
        if p.ctx.state:  # the method's own state (liet: its class-wise starts)
            s["method_state"] = dict(p.ctx.state)
        if self.memory is not None and with_memory:  # merged across ranks (merge) before the save
            s["memory"] = self.memory.state_dict()
        return s

    def restore(self, stored: ResolvedConfig) -> None:
        """Load LAST (written with the settings `stored`) into this run; UserError if it does not fit."""
        p, cfg, path = self.parts, self.cfg, self.out / LAST
        s = ckpt.load_state(path, device=self.device)
        checked_meta(s, path)
        check_architecture(s.get("arch"), architecture(stored, p.meta, p.model.state_dict()), f"checkpoint {path}")
        try:
            self._load_networks(s, path)
            pos, saved_world = self._position(s, stored)
            ckpt.set_rng_state(s["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {path} does not fit this run ({e!r:.200}); "
                            "start over with --overwrite") from None
        if s["data"]["classes"] != p.meta["classes"] or s["data"]["image_shape"] != p.meta["image_shape"]:
            raise UserError(f"checkpoint {path} was trained on other data than {cfg.data.dataset}")
        if cfg.data.dataset == PYTHON_SPEC and s["data"].get("dataset") != p.meta["dataset"]:
            raise UserError(f"checkpoint {path} was trained on other data given from Python (fingerprint "
                            f"{s['data'].get('dataset')}, given {p.meta['dataset']}); pass the same data to resume")
        # --batch-size is per process: it may change on resume only so that the global batch stays
        if cfg.batch_size != stored.batch_size and cfg.batch_size * self.ranks.world != stored.batch_size * saved_world:
            raise UserError(f"cannot resume '{self.out}' with a different --batch-size: it was trained with "
                            f"{saved_world} process(es) x {stored.batch_size}; keep --batch-size {stored.batch_size}, "
                            f"or keep the global batch {stored.batch_size * saved_world} (batch x processes)")
        pos.saved_at = (pos.epoch, pos.batch)
        self.pos = pos

    def _load_networks(self, s: dict[str, Any], path: Path) -> None:
        """The checkpoint `s`'s weights, optimizer, schedule, loss-scale and average states."""
        p = self.parts
        load_weights(p.model, s["model"], f"checkpoint {path}")
        p.optimizer.load_state_dict(s["optimizer"])
        p.scheduler.load_state_dict(s["scheduler"])
        if p.attacker is not None:
            check_attacker_layout(s, path)
            load_weights(p.attacker, s["attacker"], f"attacker in {path}")
            p.attacker_optimizer.load_state_dict(s["attacker_optimizer"])
            p.attacker_scheduler.load_state_dict(s["attacker_scheduler"])
        if p.ctx.scaler is not None:
            p.ctx.scaler.load_state_dict(s["scaler"])
        if p.ema is not None:
            load_weights(p.ema, s["ema"], f"averaged weights in {path}")
        p.ctx.state = dict(s.get("method_state", {}))
        if self.memory is not None:
            self.memory.load_state_dict(s["memory"])
        for opt in (p.optimizer, p.attacker_optimizer):  # e.g. Adam state loaded into SGD
            if opt is not None and any(set(opt.defaults) - set(g) for g in opt.param_groups):
                raise ValueError(f"its optimizer state is not {type(opt).__name__}'s")
            if opt is not None:
                _match_layouts(opt)

    def _position(self, s: dict[str, Any], stored: ResolvedConfig) -> tuple[_Position, int]:
        """Where the checkpoint `s` stands, in this run's global batches, and the number of
        processes that wrote it; ValueError if that is outside this run."""
        pos = _Position(s["epoch"], s["batch"], s["history"], s["sums"], s["best"])
        pos.seconds = float(s.get("epoch_seconds", 0.0))  # checkpoints before it was stored: 0
        saved_world = s.get("world_size", 1)
        if not (isinstance(saved_world, int) and saved_world >= 1):
            raise ValueError(f"world_size {saved_world!r}")
        pos.batch, pos.sums = _rescale_position(pos.batch, pos.sums, stored.batch_size * saved_world,
                                                self.cfg.batch_size * self.ranks.world)
        if not (0 <= pos.epoch and 0 <= pos.batch <= len(self.loader)):
            raise ValueError(f"epoch {pos.epoch}, batch {pos.batch} is outside this run")
        return pos, saved_world

    def run(self) -> None:
        """Train until `cfg.epochs` are done; TrainingInterrupted (saved) on SIGINT/SIGTERM.

        Epoch, batch, step, account, maybe checkpoint; then the end of the epoch."""
        cfg, pos, out = self.cfg, self.pos, self.out
        self.started, self.first_epoch = time.perf_counter(), pos.epoch  # for the time left of the whole run
        self._train_mode()
        with _StopFlag() as stop, _board(out, cfg.run.tensorboard and self.ranks.is_main) as board:
            while pos.epoch < cfg.epochs:
                self.epoch_started, pos.seconds = time.perf_counter() - pos.seconds, 0.0
                self._epoch_start()
                for i, (x, y, *idx) in self._batches():
                    if idx:  # the batch's rows in the per-image memory
                        self.parts.ctx.indices = idx[0]
                    self._account(self._guarded_step(i, x, y), len(y))
                    self._maybe_checkpoint(i, stop)
                self._end_epoch(self._epoch_seconds(), board)
                if self.ranks.agree_stop(stop.requested) and pos.epoch < cfg.epochs:
                    raise TrainingInterrupted(f"interrupted after epoch {pos.epoch}; saved to {out}; "
                                              "continue with --resume")

    def _epoch_start(self) -> None:
        """The method's hook before an epoch's first batch (not when resuming mid-epoch: the
        checkpoint holds what it would have done)."""
        hook = METHOD_RECORDS[self.cfg.method].epoch_start
        if hook is not None and self.pos.batch == 0:
            hook(self.parts.ctx, self.pos.epoch)

    def _epoch_seconds(self) -> float:
        """Seconds the current epoch has trained, those before a resume included."""
        return time.perf_counter() - self.epoch_started

    def _train_mode(self) -> None:
        self.parts.model.train()
        if self.parts.attacker is not None:
            self.parts.attacker.train()

    def _batches(self) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The rest of the current epoch's batches, each with its 1-based index in the epoch."""
        pos, loader = self.pos, self.loader
        loader.set_epoch(pos.epoch)
        batches = _progress(loader.iterate(pos.batch, indices=self.memory is not None), len(loader) - pos.batch,
                            pos.epoch, self.cfg)
        return enumerate(batches, start=pos.batch + 1)

    def _guarded_step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> Metrics | None:
        """`_step` under on_nonfinite=skip's guard: None for a step that went non-finite and
        was undone. ("stop" costs nothing per step: the loss sums are checked at checkpoints,
        every NONFINITE_CHECK_EVERY steps and at epoch ends.)"""
        self._advance_schedule(i)  # outside the guard: the rate follows the batch, skipped or not
        if self.guard is None:
            return self._step(i, x, y)
        return self.guard.run(functools.partial(self._step, i, x, y))

    def _advance_schedule(self, i: int) -> None:
        """A per-batch schedule (cosine, onecycle): bring it to batch `i` (1-based) of the epoch,
        so that global batch t trains at the schedule's rate t. Its position is the checkpoint's
        (a resumed run continues where it stopped); host integers only, no device sync. A
        position past the batch (an epoch started over on resume) holds the rate until the
        batches catch up; the schedule never passes its last step."""
        scheduler = self.parts.scheduler
        if not per_batch(self.cfg.optimizer):
            return
        t = min(self.pos.epoch * len(self.loader) + i - 1, self.cfg.epochs * len(self.loader) - 1)
        while scheduler.last_epoch < t:
            scheduler.step()

    def _step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> Metrics:
        """The method's step on batch `i` (1-based) of the epoch, then the weight average's update."""
        p = self.parts
        p.ctx.step_index = self.pos.epoch * len(self.loader) + i - 1  # global batches before this one
        metrics = self.step(x, y)
        if p.ema is not None:
            p.ema.update(p.ctx.step_index)
        return metrics

    def _account(self, metrics: Metrics | None, images: int) -> None:
        """Add a step's metrics to the epoch's sums, or count it skipped (None)."""
        sums = self.pos.sums
        if metrics is None:
            sums["skipped"] = sums.get("skipped", 0) + 1
            return
        for k, v in metrics.items():
            sums[k] = sums[k] + v if k in sums else v.clone()
        sums["n"] = sums.get("n", 0) + images

    def _maybe_checkpoint(self, i: int, stop: _StopFlag) -> None:
        """After batch `i`: every --checkpoint-every batches, and when a stop was asked for,
        save LAST (then stop); check the loss sums then and every NONFINITE_CHECK_EVERY batches."""
        cfg, pos = self.cfg, self.pos
        periodic = bool(cfg.run.checkpoint_every) and i % cfg.run.checkpoint_every == 0 and i < len(self.loader)
        stopping = self.ranks.agree_stop(stop.requested, due=periodic or i % STOP_CHECK_EVERY == 0)
        if not (stopping or periodic or i % NONFINITE_CHECK_EVERY == 0):
            return
        total = self.ranks.reduce_sums(pos.sums)  # all ranks' sums so far
        _check_finite(total, self.out, f"epoch {pos.epoch + 1} by batch {i}", pos.saved_at)
        if not (stopping or periodic):
            return
        self.ranks.broadcast_buffers([self.parts.model, self.parts.attacker])
        if self.memory is not None:  # every rank's rows of this epoch so far, on every rank
            self.memory.merge()
        if self.ranks.is_main:
            _save(self.out / LAST, self.state(pos.epoch, i, total))
        pos.saved_at = (pos.epoch, i)
        if stopping:
            raise TrainingInterrupted(f"interrupted at epoch {pos.epoch + 1}, batch {i}; saved to "
                                      f"{self.out}; continue with --resume")

    def _end_epoch(self, seconds: float, board: SummaryWriter | None) -> None:
        """Record, validate, step the schedules and save: the epoch is finished."""
        p, pos = self.parts, self.pos
        record = self._record(seconds)
        self.ranks.broadcast_buffers([p.model, p.attacker])  # rank 0's batch-norm statistics everywhere
        if self.memory is not None:  # every rank's rows of this epoch, on every rank
            self.memory.merge()
        if self.ranks.is_main:  # the others go on and wait for it at their first gradient sync
            self._validate(record)
        pos.history.append(record)
        if not per_batch(self.cfg.optimizer):  # cosine and onecycle step per batch (_advance_schedule)
            p.scheduler.step()
        if p.attacker_scheduler is not None:
            p.attacker_scheduler.step()
        pos.epoch, pos.batch, pos.sums = pos.epoch + 1, 0, {}
        if self.ranks.is_main:
            self._save_epoch(record, board)
        pos.saved_at = (pos.epoch, 0)

    def _record(self, seconds: float) -> dict[str, Any]:
        """The finished epoch's training record, from all ranks' sums; TrainingDiverged if
        every step was skipped or the loss is not finite."""
        pos, out = self.pos, self.out
        pos.sums = self.ranks.reduce_sums(pos.sums)  # all ranks' sums: one all-reduce per epoch
        if not pos.sums.get("n"):
            raise TrainingDiverged(f"every step of epoch {pos.epoch + 1} had a non-finite loss and was skipped; "
                                   f"{_holds(out, pos.saved_at)}; start over with a lower --lr (--overwrite)")
        _check_finite(pos.sums, out, f"epoch {pos.epoch + 1}", pos.saved_at)
        record = _epoch_record(pos.epoch, pos.sums, self.parts.optimizer, seconds)
        if self.guard is not None:
            record["skipped_steps"] = pos.sums.get("skipped", 0)
        return record

    def _validate(self, record: dict[str, Any]) -> None:
        """Add the validation accuracies of the evaluated classifier to `record`, and mark
        (and log) catastrophic overfitting."""
        pos = self.pos
        record.update(validate(self.parts.evaluated, self.data, self.cfg, self.device))
        if pos.history and collapsed(pos.history[-1], record):
            record["collapsed"] = True
            _log(f"[{self.out.name}] catastrophic overfitting at epoch {record['epoch']}: validation PGD-10 "
                 f"{pos.history[-1]['val_pgd10_acc']:.3f} -> {record['val_pgd10_acc']:.3f} while clean accuracy "
                 f"rose to {record['val_clean_acc']:.3f}; {BEST} keeps the best robust weights so far")

    def _save_epoch(self, record: dict[str, Any], board: SummaryWriter | None) -> None:
        """Rank 0 at an epoch's end: BEST if the score is the best so far, LAST, metrics.jsonl,
        TensorBoard, and the epoch's line in the log."""
        cfg, pos, out = self.cfg, self.pos, self.out
        score = record.get("val_pgd10_acc", record["val_clean_acc"])
        if score > pos.best:
            pos.best = score
            _save(out / BEST, self.state(pos.epoch, 0, pos.sums, with_memory=False))
        _save(out / LAST, self.state(pos.epoch, 0, pos.sums))
        ckpt.atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in pos.history))
        if board is not None:
            for key, value in record.items():
                if key != "epoch":
                    board.add_scalar(key, value, record["epoch"])
            board.flush()
        left = (time.perf_counter() - self.started) / (pos.epoch - self.first_epoch) * (cfg.epochs - pos.epoch)
        _log(f"[{out.name}] " + _format_record(record, cfg.epochs) + f" | {_duration(left)} left")

    def as_run(self) -> Run:
        """The trained networks as a Run, in eval mode, without reading the folder."""
        p = self.parts
        p.evaluated.eval()
        if p.attacker is not None:
            p.attacker.eval()
        return Run(self.out, self.cfg, p.meta, p.evaluated, p.attacker, self.pos.epoch, self.pos.history)


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


STOP_CHECK_EVERY = 10  # under torchrun: steps between the ranks' agreement on a SIGINT/SIGTERM
NONFINITE_CHECK_EVERY = 50  # steps between checks of the loss sums with on_nonfinite=stop


def _rescale_position(batch: int, sums: dict[str, Any], saved_global: int, global_batch: int
                      ) -> tuple[int, dict[str, Any]]:
    """Where a run that saved `batch` global batches of `saved_global` images into an epoch
    continues with global batches of `global_batch` (= --batch-size x processes). Rank r
    takes every world-th image of the epoch's permutation, so the first k global batches
    are the first k x global-batch images of the permutation for any number of processes:
    the position carries over whenever it is a whole number of new batches; otherwise the
    epoch starts over (its metric sums too). The checkpoint's sums (all ranks' together)
    continue on rank 0."""
    if batch * saved_global % global_batch:
        _log(f"the checkpoint is {batch * saved_global} images into an epoch, no whole number of global batches "
             f"of {global_batch}: the epoch starts over")
        return 0, {}
    return batch * saved_global // global_batch, sums if distributed.is_main() else {}


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each optimizer buffer its parameter's memory layout again. Checkpoints store
    tensors contiguous, so after --channels-last a loaded momentum buffer is NCHW while its
    parameter and gradient are NHWC; the fused kernels (--amp fp16) then combine them
    element by element in memory order, which is wrong (seen on the CPU, torch 2.14)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _holds(out: Path, saved_at: tuple[int, int] | None) -> str:
    if saved_at is None:
        return f"no checkpoint was written to {out}"
    epoch, batch = saved_at
    where = f"the end of epoch {epoch}" if batch == 0 else f"epoch {epoch + 1}, batch {batch}"
    return f"{out / LAST} still holds {where}"


def _check_finite(sums: dict[str, Any], out: Path, where: str, saved_at: tuple[int, int] | None) -> None:
    """Stop (TrainingDiverged) when the loss summed so far is not finite; one host sync."""
    loss = sums.get("loss")
    if loss is not None and not bool(torch.isfinite(loss)):
        raise TrainingDiverged(
            f"training diverged: non-finite loss in {where}; {_holds(out, saved_at)}; "
            "resume with --on-nonfinite skip to skip such steps, or start over with a lower --lr (--overwrite)"
        )


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint, unless its weights are not finite: a diverged model never
    replaces a good checkpoint."""
    for part in ("model", "attacker"):
        for name, t in (state.get(part) or {}).items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise TrainingDiverged(f"training diverged: the {part}'s {name} is not finite; {path} was not "
                                       "overwritten; resume with --on-nonfinite skip, or start over with a lower --lr")
    try:
        ckpt.save_state(path, state)
    except ckpt.WriteFailed as e:
        kept = "the previous checkpoint is intact" if e.existed else "no checkpoint was written there yet"
        raise UserError(f"{e}; {kept}") from None


class _SkipGuard:
    """on_nonfinite="skip": undo a training step whose loss or new weights are not finite.

    The step functions update the weights themselves, so the guard copies the weights,
    buffers and optimizer states (and the method's own state: LIET's class-wise starts, the
    rows FGSM-PGI's per-image memory overwrites) before every step and puts them back after a
    step that went non-finite. Cost per step: one copy of that state and one host-device sync for
    the check; small next to a forward and backward pass, but not free, which is why
    "stop", the default, checks only at checkpoints, every NONFINITE_CHECK_EVERY steps
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


def _epoch_record(epoch: int, sums: dict[str, Any], optimizer: torch.optim.Optimizer, seconds: float) -> dict[str, Any]:
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


def _format_record(r: dict[str, Any], epochs: int) -> str:
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


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: "
                        "pip install 'learn2defend[tensorboard]'") from None


@contextlib.contextmanager
def _board(out: Path, enabled: bool):
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


def _header(cfg: ResolvedConfig, data: Dataset, device: torch.device, world: int) -> str:
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


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _log(message: str) -> None:
    if not distributed.is_main():
        return
    print(message, file=sys.stderr, flush=True)


def _progress(batches, total: int, epoch: int, cfg: ResolvedConfig):
    """A tqdm bar on a terminal; nothing (the per-epoch line) otherwise."""
    if not (cfg.run.progress and sys.stderr.isatty()) or not distributed.is_main():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can save first."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
