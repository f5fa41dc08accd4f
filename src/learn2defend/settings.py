"""The resolved configuration of a training run: what the training loop, the steps
(`methods.StepContext`), `speed` and `bench` take.

A `ResolvedConfig` is a `learn2defend.config.TrainConfig` after `TrainConfig.resolve`:
validated, every data-set- and method-dependent default filled in, and its fields grouped
(data, optimizer, the method's attack and loss, the attacker and its optimizer, speed
switches, the run). Frozen: nothing fills it in later. The flags and config.json keep
TrainConfig's flat names (`ResolvedConfig.to_dict`), so that run folders of every version
load and a run's settings read as the command line that made it.

This module imports nothing of the package's: the steps below the configuration read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataSettings:
    """Which data, split how, augmented how (learn2defend.data)."""

    dataset: str
    data_dir: str
    download: bool
    image_size: int | None  # None: the images' own size
    val_size: float  # a fraction in (0, 1), or a count of images
    split_seed: int
    train_size: int | None  # None: every training image
    augment: bool
    flip: bool | None  # None: the data set's own convention (no flips for digits and SVHN)
    crop_padding: int | None  # None: the data set's own (pixels)
    on_bad_image: str
    loader: str = "auto"  # auto | memory | stream (learn2defend.data.load_dataset)
    workers: int | None = None  # decode workers of a streamed set; None: the CPUs, at most 8


@dataclass(frozen=True)
class OptimizerSettings:
    """An optimizer and its learning-rate schedule: the classifier's or the attacker's.

    `schedule` (learn2defend.optim.schedule): "multistep" (MultiStepLR, stepped per epoch:
    `milestones` and `gamma`), "cosine" (CosineAnnealingLR) or "onecycle" (OneCycleLR), both
    stepped per batch. The attacker's is always multistep."""

    name: str  # sgd | adam
    lr: float
    momentum: float  # sgd only
    weight_decay: float
    betas: tuple[float, float]  # adam only
    milestones: tuple[int, ...]  # epochs after which lr is multiplied by gamma
    gamma: float
    schedule: str = "multistep"  # multistep | cosine | onecycle (config.LR_SCHEDULES)


@dataclass(frozen=True)
class AttackSettings:
    """The method's hand-designed training attack; None: the method has no such setting."""

    pgd_steps: int | None  # iterations of pgd, pgd-at, trades and mart; fgsm-sdi's steps after its start
    step_size: float | None  # pixels; None: the method takes no step (plain, the paper's L2L methods)
    random_start: bool | None  # fgsm (FGSM-RS) and pgd; None: fixed by the method (pgd-at: always random)
    noise: float | None  # n-fgsm's uniform noise half-width in pixels; None: other methods
    start_every: int | None = None  # liet: batches between refreshes of its class-wise starts; None: other methods
    pgi_decay: float | None = None  # fgsm-pgi: decay of the per-image gradient momentum; None: other methods
    pgi_reset: int | None = None  # fgsm-pgi: the memory is reset every this many epochs; None: other methods


@dataclass(frozen=True)
class LossSettings:
    """How the method's training loss weighs its terms."""

    clean_weight: float  # of the clean cross-entropy, (1 - w) of the adversarial one
    beta: float | None  # trades and mart: the KL term's weight; None: the method has none
    label_smoothing: float
    js_weight: float | None = None  # liet: the Jensen-Shannon term's weight in the last epoch; None: other methods
    pgi_lambda: float | None = None  # fgsm-pgi: weight of the MSE consistency term; None: other methods


@dataclass(frozen=True)
class AttackerSettings:
    """The learned attacker of an L2L method (learn2defend.models.attackers) and its optimizer."""

    name: str  # slim | wide | sdi
    every: int  # updated on every K-th batch
    width: float
    scale: bool  # the authors' learnable tanh scale
    steps: int  # attacker updates per classifier update
    grad_norm: str  # how its gradient input is conditioned
    update: str  # joint (one backward) | alternating (the authors' code)
    optimizer: OptimizerSettings


@dataclass(frozen=True)
class SpeedSettings:
    """The training step's speed switches (learn2defend.speed). None: the device's default,
    not yet known (`speed.resolve_switches` sets it when the run's device is; until then
    None acts as off)."""

    amp: str
    channels_last: bool | None
    compile: bool | None
    tf32: bool | None
    cudnn_benchmark: bool | None


@dataclass(frozen=True)
class RunSettings:
    """Where the run lives and how it reports, checkpoints and seeds itself."""

    out: str
    seed: int
    device: str
    val_robust_n: int
    checkpoint_every: int
    progress: bool
    on_nonfinite: str
    sync_bn: bool
    tensorboard: bool


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated `TrainConfig` with every default filled in (`TrainConfig.resolve`). No
    field is "filled in later": a None left says the run does without (no --init, no --ema,
    no attacker or attack setting the method lacks), or, in `data`, keeps what the data set
    itself prescribes (image size, flips, crop padding: learn2defend.data).

    To derive a variant, `dataclasses.replace` it and pass it to `learn2defend.train`, which
    checks it again through its flat form."""

    model: str
    method: str
    eps: float  # radius in pixel units ([0, 1] images) under `norm`
    epochs: int
    batch_size: int  # per process under torchrun
    init: str | None  # run folder whose classifier the run starts from
    ema: float | None  # decay of the classifier's weight average; None: off
    data: DataSettings
    optimizer: OptimizerSettings
    attack: AttackSettings
    loss: LossSettings
    attacker: AttackerSettings | None  # None: the method trains no attacker
    speed: SpeedSettings
    run: RunSettings
    # The threat model ("linf" | "l2"; learn2defend.attacks.threat): the norm of the eps-ball.
    norm: str = "linf"
    pretrained: str | None = None  # timm: models: the weights file (or "hub") the run started from

    def to_dict(self) -> dict[str, Any]:
        """config.json's object: the flat fields of learn2defend.config.TrainConfig, by which the
        run's flags are named; `TrainConfig.from_dict(d).resolve()` gives this config back. What
        the method does without is left out: the settings of an attacker it lacks, and attack
        settings or a KL weight it has none of (each field then takes its default)."""
        d: dict[str, Any] = {
            "model": self.model, "method": self.method, "eps": self.eps, "norm": self.norm, "epochs": self.epochs,
            "batch_size": self.batch_size, "init": self.init, "pretrained": self.pretrained, "ema": self.ema,
            **_fields(self.data), **_given(self.attack), **_given(self.loss), **_fields(self.speed),
            **_fields(self.run), **_optimizer_fields(self.optimizer, ""),
        }
        a = self.attacker
        if a is not None:
            d.update(attacker=a.name, attacker_every=a.every, attacker_width=a.width, attacker_scale=a.scale,
                     attacker_steps=a.steps, grad_norm=a.grad_norm, l2l_update=a.update,
                     **_optimizer_fields(a.optimizer, "attacker_"))
        return d


def _fields(group: Any) -> dict[str, Any]:
    return {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}


def _given(group: Any) -> dict[str, Any]:
    """The fields of an attack or loss group the method uses: None there means it takes none."""
    return {k: v for k, v in _fields(group).items() if v is not None}


def _optimizer_fields(o: OptimizerSettings, prefix: str) -> dict[str, Any]:
    """An optimizer's flat fields; betas and the schedule's gamma are shared (the classifier's);
    the schedule's kind is the classifier's alone (the attacker's is multistep)."""
    d = {f"{prefix}optimizer": o.name, f"{prefix}lr": o.lr, f"{prefix}momentum": o.momentum,
         f"{prefix}weight_decay": o.weight_decay, f"{prefix}lr_milestones": list(o.milestones)}
    return d if prefix else {**d, "betas": list(o.betas), "lr_gamma": o.gamma, "lr_schedule": o.schedule}
