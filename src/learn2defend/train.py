"""The one training loop every method shares.

`train` resolves a `TrainConfig` into a `ResolvedConfig` (checked, every default filled
in), builds the networks and optimizers (`build_parts`), and runs epochs of the method's
step (`learn2defend.methods`) with validation, checkpoints and stopping; the run folder
it writes is described in `learn2defend.runs`. The optimizers, their schedules and the
weight average are `learn2defend.optim`; what stops or protects a run (interruption,
divergence, the non-finite guard, collapse detection) is `learn2defend.guards`; what the
loop reports (epoch records, log lines, progress bar, TensorBoard) is `learn2defend.reporting`.
"""

from __future__ import annotations

import functools
import json
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
from .guards import (
    COLLAPSE_FRACTION,
    COLLAPSE_MIN_DROP,
    SkipGuard,
    StopFlag,
    TrainingDiverged,
    TrainingInterrupted,
    check_finite,
    collapsed,
    holds,
)
from .memory import PerturbationMemory, check_fits
from .methods import METHOD_RECORDS, STEPS, Metrics, StepContext, attacker_in_channels
from .models import made_with
from .models.attackers import ATTACKER_LAYOUT
from .optim import ONECYCLE_PEAK, WeightAverage, make_optimizer, match_layouts, per_batch, schedule
from .reporting import (
    SMALLCNN_ADVICE,
    SMALLCNN_MAX_SIZE,
    duration,
    epoch_record,
    format_record,
    header,
    log,
    progress,
    require_tensorboard,
    tensorboard_writer,
)
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
from .settings import ResolvedConfig
from .version import __version__

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


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
            clean_batch, robust_batch = speed.validation_batches(device)
            correct = _clean_correct(model, val, device, batch=clean_batch, workers=workers)
            result = {"val_clean_acc": correct.item() / len(val)}
            n = min(config.run.val_robust_n, len(val))
            if n and config.eps > 0:
                subset = val.head(n)
                result["val_pgd10_acc"] = _robust_correct(model, subset, config.eps, device, batch=robust_batch,
                                                          workers=workers, norm=config.norm).item() / n
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
        require_tensorboard()
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
            log(f"resuming {out} at epoch {loop.pos.epoch + 1}, batch {loop.pos.batch}")
        else:
            log(f"{out} has finished its {loop.pos.epoch} epochs; nothing to train")
    log(header(cfg, data, device, world))
    log(switches)
    if cfg.model == "smallcnn" and min(data.image_shape[1:]) > SMALLCNN_MAX_SIZE:
        log(SMALLCNN_ADVICE)
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
        self.guard: SkipGuard | None = None  # on_nonfinite=skip: undoes a step that went non-finite
        if cfg.run.on_nonfinite == "skip":
            self.guard = SkipGuard([parts.model, parts.attacker, parts.ema],
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
                match_layouts(opt)

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
        with StopFlag() as stop, tensorboard_writer(out, cfg.run.tensorboard and self.ranks.is_main) as board:
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
                    self.ranks.barrier()  # rank 0 has saved the epoch (see _maybe_checkpoint)
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
        batches = progress(loader.iterate(pos.batch, indices=self.memory is not None), len(loader) - pos.batch,
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

    def _maybe_checkpoint(self, i: int, stop: StopFlag) -> None:
        """After batch `i`: every --checkpoint-every batches, and when a stop was asked for,
        save LAST (then stop); check the loss sums then and every NONFINITE_CHECK_EVERY batches."""
        cfg, pos = self.cfg, self.pos
        periodic = bool(cfg.run.checkpoint_every) and i % cfg.run.checkpoint_every == 0 and i < len(self.loader)
        stopping = self.ranks.agree_stop(stop.requested, due=periodic or i % STOP_CHECK_EVERY == 0)
        if not (stopping or periodic or i % NONFINITE_CHECK_EVERY == 0):
            return
        total = self.ranks.reduce_sums(pos.sums)  # all ranks' sums so far
        check_finite(total, self.out, f"epoch {pos.epoch + 1} by batch {i}", pos.saved_at)
        if not (stopping or periodic):
            return
        self.ranks.broadcast_buffers([self.parts.model, self.parts.attacker])
        if self.memory is not None:  # every rank's rows of this epoch so far, on every rank
            self.memory.merge()
        if self.ranks.is_main:
            _save(self.out / LAST, self.state(pos.epoch, i, total))
        pos.saved_at = (pos.epoch, i)
        if stopping:
            # Every rank leaves once rank 0 has written LAST, so that "saved" is true on every
            # rank that reports it (a caller that catches this may go on to read the folder).
            self.ranks.barrier()
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
                                   f"{holds(out, pos.saved_at)}; start over with a lower --lr (--overwrite)")
        check_finite(pos.sums, out, f"epoch {pos.epoch + 1}", pos.saved_at)
        record = epoch_record(pos.epoch, pos.sums, self.parts.optimizer, seconds)
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
            log(f"[{self.out.name}] catastrophic overfitting at epoch {record['epoch']}: validation PGD-10 "
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
        log(f"[{out.name}] " + format_record(record, cfg.epochs) + f" | {duration(left)} left")

    def as_run(self) -> Run:
        """The trained networks as a Run, in eval mode, without reading the folder."""
        p = self.parts
        p.evaluated.eval()
        if p.attacker is not None:
            p.attacker.eval()
        return Run(self.out, self.cfg, p.meta, p.evaluated, p.attacker, self.pos.epoch, self.pos.history)


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
        log(f"the checkpoint is {batch * saved_global} images into an epoch, no whole number of global batches "
            f"of {global_batch}: the epoch starts over")
        return 0, {}
    return batch * saved_global // global_batch, sums if distributed.is_main() else {}


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


# The public names; those defined in optim and guards stay importable from here as before.
__all__ = [
    "train", "validate", "build_parts", "Parts", "RESUMABLE_CHANGES", "STOP_CHECK_EVERY", "NONFINITE_CHECK_EVERY",
    "TrainingInterrupted", "TrainingDiverged", "COLLAPSE_FRACTION", "COLLAPSE_MIN_DROP", "collapsed",
    "make_optimizer", "ONECYCLE_PEAK", "schedule", "per_batch", "WeightAverage",
]
