"""Typed configuration for training runs.

A `TrainConfig` is what the CLI builds from its flags and what a Python user builds
by hand; it is validated once (`validate`) before anything touches the disk, and it
is stored as `config.json` in every run folder so a run can be resumed, evaluated
and reproduced from its folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attacks.threat import LINF, NORMS, threat_model
from .errors import UserError
from .methods import METHOD_RECORDS
from .settings import (
    AttackerSettings,
    AttackSettings,
    DataSettings,
    LossSettings,
    OptimizerSettings,
    ResolvedConfig,
    RunSettings,
    SpeedSettings,
)

METHODS = tuple(METHOD_RECORDS)
L2L_METHODS = tuple(name for name, m in METHOD_RECORDS.items() if m.has_attacker)
# Methods whose loss carries its own clean term and a KL term weighted by --beta.
KL_METHODS = tuple(name for name, m in METHOD_RECORDS.items() if "beta" in m.options)
OPTIMIZERS = ("sgd", "adam")
# The classifier's learning-rate schedules (learn2defend.optim.schedule): multistep per epoch,
# cosine and onecycle per batch. Runs before the option existed were multistep.
LR_SCHEDULES = ("multistep", "cosine", "onecycle")
GRAD_NORMS = ("sample", "batch", "sign", "none")
L2L_UPDATES = ("joint", "alternating")
ON_BAD_IMAGE = ("skip", "fail")
LOADERS = ("auto", "memory", "stream")
ON_NONFINITE = ("stop", "skip")
AMP_MODES = ("off", "bf16", "fp16")
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
MAX_LR = 1e3  # keeps every rate a float32 can hold, Adam's bias correction included
MAX_ATTACKER_WIDTH = 16.0  # 4096 channels at the widest layer; more is a typo
MAX_IMAGE_SIZE = 4096

# Per-data-set default radius: the paper's 0.03 for CIFAR and 0.05 for SVHN; 0.2 on the
# 8x8 digits, where a plain CNN keeps ~60 % under PGD-10 at 0.1 but ~7 % at 0.2, so 0.2
# is where adversarial training makes a visible difference; 0.3 is the MNIST standard.
# (The l-inf threat model's record holds them: learn2defend.attacks.threat.LINF.)
DEFAULT_EPS = dict(LINF.defaults)

# The attacker's default optimizer: Adam at 1e-3, fixed, no weight decay (the paper's SVHN
# recipe for the attacker, and the yardstick's). The paper's CIFAR recipe (SGD with the
# classifier's schedule, --attacker-optimizer sgd) left Grad L2L on digits at 0.26 under
# autoattack-fast against 0.30 with Adam (3 seeds each; docs/results.md, "Grad L2L ablation").
FALLBACK_EPS = LINF.fallback
ATTACKER_ADAM_LR = 1e-3

MAX_BETA = 1e3
# The largest values a method's own default reaches at eps 1 (n-fgsm's noise 2 eps, FGSM-RS's
# step 1.25 eps): whatever `train` writes into config.json must load back. Images lie in
# [0, 1], so anything past 1 acts as 1.
MAX_NOISE = 2.0
MAX_STEP_SIZE = 2.0
MAX_ATTACKER_EVERY = 10**6


DEVICE_HELP = "auto (CUDA when available, else the CPU) | cpu | cuda | cuda:N"
DATA_DIR_HELP = "where torchvision data sets and decoded-folder caches live"
ATTACKER_WIDTH_HELP = "multiplies the attacker's channel counts"
# The speed switches' help, for train (TrainConfig) and bench (bench.BenchConfig).
SWITCH_HELP = {
    "amp": "mixed precision of the training step: off | bf16 | fp16 (fp16 with a loss scaler over both optimizers); "
           "validation and evaluation attacks always run in float32, since an attack in low precision can "
           "overstate robustness",
    "channels_last": "channels_last (NHWC) memory layout for the networks and batches of the training step",
    "compile": "torch.compile the classifier and the attacker (the first steps are slow: compilation; "
               "on the CPU it needs g++)",
    "tf32": "CUDA: TF32 tensor-core math for the training step's float32 matmuls and convolutions "
            "(--no-tf32: IEEE float32; evaluation is IEEE float32 either way); no effect on the CPU",
    "cudnn_benchmark": "CUDA: let cuDNN time its convolution algorithms and keep the fastest (not bit-reproducible "
                       "between runs); no effect on the CPU",
}


def option(default: Any = dataclasses.MISSING, *, help: str | Callable[[], str], flag: str | None = None,
           aliases: tuple[str, ...] = (), metavar: str | tuple[str, ...] | None = None, nargs: str | int | None = None,
           parse: str | None = None, switch: bool = False, from_cli: Callable[[Any], dict[str, Any]] | None = None,
           positional: bool = False, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is also a command-line option (see `cli.add_config_options`):
    `--field-name` (or `flag`, with further names `aliases`), its `help` (a text, or a
    function giving one when the parser is built), `metavar`, `nargs`, `parse` (the name of
    a cli parser of the value, instead of the one of the field's type), `switch` (a bool
    given as a plain --flag, off by default, instead of --flag/--no-flag; a `bool | None`
    field is --flag/--no-flag, None when neither is given), `from_cli` (the
    parsed value -> the config fields it fills, for an option that fills several) and
    `positional` (an argument named by its place, not a --flag). A field without `help`
    has no option. The default is the field's, for the CLI too."""
    meta = {"help": help, "flag": flag, "aliases": aliases, "metavar": metavar, "nargs": nargs, "parse": parse,
            "switch": switch, "from_cli": from_cli, "positional": positional}
    return field(default=default, default_factory=default_factory, metadata=meta)


def parse_fraction(text: str | float) -> float:
    """Parse a number that may be written as a fraction: '0.03' or '8/255'."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read '{text}' as a number (write e.g. 0.03 or 8/255)") from None


def default_eps(dataset: str, norm: str | None = None) -> float:
    """The default radius for a data set under `norm` (l-inf: DEFAULT_EPS; the threat
    model's record otherwise: learn2defend.attacks.threat)."""
    return threat_model(norm).default_eps(dataset)


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults follow the paper where it has one."""

    out: str = "runs/run"
    # data
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = None
    val_size: float = 0.1
    split_seed: int = 0
    train_size: int | None = None  # train on the first N training images only (a random subset)
    augment: bool = True
    flip: bool | None = None  # None: per data set (data.py: folders and CIFAR flip)
    crop_padding: int | None = None  # random-crop padding in pixels; None: per data set
    on_bad_image: str = "skip"  # folder files that cannot be decoded: skip (with a warning) or fail
    loader: str = "auto"  # auto | memory (DeviceLoader) | stream (StreamLoader, from files); data.load_dataset
    workers: int | None = None  # decode workers of a streamed set; None: the CPUs, at most 8
    # model and method
    model: str = "smallcnn"
    method: str = "plain"
    eps: float | None = None  # None: the data set's default (see DEFAULT_EPS; under l2 the threat model's)
    norm: str = "linf"  # the threat model: linf | l2 (learn2defend.attacks.threat); runs before it were linf
    init: str | None = None  # run folder of a trained classifier to start from (the paper always does)
    pretrained: str | None = None  # timm: models: a weights file to start from, or "hub" (timm's download)
    # classifier optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    lr_schedule: str = "multistep"  # multistep | cosine | onecycle (optim.schedule); runs before it: multistep
    # hand-designed attacks used for training (fgsm, pgd)
    # None below: the method's default (its record in learn2defend.methods)
    clean_weight: float | None = None  # 0.5 for fgsm/pgd (Kurakin et al.), 0 for the rest
    pgd_steps: int | None = None  # attack iterations of pgd, pgd-at, trades and mart (10); fgsm-sdi's steps (1)
    step_size: float | None = None  # the attack's step size in pixels
    random_start: bool = False  # fgsm: Fast-AT's FGSM-RS (uniform start, step 1.25 eps)
    beta: float | None = None  # trades, mart: weight of the KL term
    noise: float | None = None  # n-fgsm: half-width of the uniform noise, in pixels (2 eps)
    pgi_lambda: float | None = None  # fgsm-pgi: weight of the MSE between start and final logits (10)
    pgi_decay: float | None = None  # fgsm-pgi: decay of the per-image gradient momentum (0.3)
    pgi_reset: int | None = None  # fgsm-pgi: reset the per-image memory every this many epochs (40)
    label_smoothing: float = 0.0  # of the classifier's training cross-entropy (every method)
    start_every: int | None = None  # liet: refresh its class-wise starts every K batches of an epoch (20)
    js_weight: float | None = None  # liet: weight of the Jensen-Shannon term in the last epoch (100), linear growth
    ema: float | None = None  # decay of an exponential moving average of the classifier's weights (off: None)
    # learned attacker (L2L methods)
    attacker: str | None = None  # slim for the paper's methods, sdi for fgsm-sdi
    attacker_every: int | None = None  # update the attacker every K batches (1; fgsm-sdi 20)
    attacker_width: float = 1.0
    attacker_scale: bool = False  # authors' code: tanh(s * h) with a learnable s starting at 5
    # None below: Adam at lr 1e-3 without weight decay, fixed (learn2defend's default, see
    # ATTACKER_ADAM_LR); with --attacker-optimizer sgd, the classifier's own lr, momentum,
    # weight decay and schedule (the paper's CIFAR recipe).
    attacker_optimizer: str | None = None
    attacker_lr: float | None = None
    attacker_momentum: float | None = None
    attacker_weight_decay: float | None = None
    attacker_lr_milestones: list[int] | None = None
    attacker_steps: int = 1  # attacker updates per classifier update
    grad_norm: str = "sample"  # how the gradient input of the attacker is conditioned
    l2l_update: str = "joint"  # joint: one backward for both; alternating: the authors' code
    # run
    seed: int = 0
    device: str = "auto"
    val_robust_n: int = 512  # validation images attacked with PGD-10 each epoch (0: none)
    checkpoint_every: int = 0  # also save every N steps (0: only at epoch ends)
    progress: bool = True
    on_nonfinite: str = "stop"  # non-finite loss: stop (keep the last good checkpoint) or skip the step
    sync_bn: bool = False  # under torchrun: batch norm with statistics over all processes (SyncBatchNorm)
    tensorboard: bool = False  # each epoch's metrics also to RUN/tensorboard/ (extra: learn2defend[tensorboard])
    # speed switches of the training step (learn2defend.speed). None: the default of the
    # device the run trains on (speed.DEVICE_DEFAULTS, resolved by train when the device is
    # known; config.json holds the value that ran). amp stays opt-in: it changes the numbers.
    # Validation and evaluation attacks ignore them.
    amp: str = "off"  # off | bf16 | fp16: autocast in that dtype (fp16 with a loss scaler)
    channels_last: bool | None = None  # NHWC memory layout for the networks and the batches
    compile: bool | None = None  # torch.compile of the classifier and the attacker
    # CUDA: TF32 matmuls and convolutions (else IEEE float32). On by default: 1.9-2.4x faster
    # steps on an H200 (doctor, wrn-34-4; docs/performance.md), and PyTorch's own default for
    # cuDNN convolutions.
    tf32: bool | None = None
    cudnn_benchmark: bool | None = None  # CUDA: cuDNN picks the fastest convolution algorithms by trying them

    @property
    def is_l2l(self) -> bool:
        """Whether the method trains an attacker network (it has an attacker, its optimizer, ...)."""
        return self.method in L2L_METHODS

    # ---- resolving: every default filled in ---------------------------------------------
    def resolve(self) -> ResolvedConfig:
        """Validate, then fill in every data-set- and method-dependent default (eps from the
        data set, step sizes and the rest from the method's record in learn2defend.methods,
        the attacker's optimizer from ATTACKER_ADAM_LR or the classifier's) and group the
        result. A setting the method does without resolves to None (--pgd-steps and
        --random-start too, which methods without them have always accepted and ignored).
        UserError on the first bad value (`validate`)."""
        self.validate()
        method = METHOD_RECORDS[self.method]
        c = dataclasses.replace(self, eps=default_eps(self.dataset, self.norm) if self.eps is None else self.eps)
        # paths resolved: a run folder works from any directory, and two spellings compare equal
        c.dataset, c.data_dir = resolved_dataset(c.dataset), str(Path(c.data_dir).expanduser().resolve())
        for name, default in method.defaults.items():  # in order: step_size may use pgd_steps
            if getattr(c, name) is None:
                setattr(c, name, default.value(c))
        c.validate()  # the defaults filled in too: what train writes into config.json loads back
        c.pgd_steps = (10 if c.pgd_steps is None else c.pgd_steps) if "pgd_steps" in method.options else None
        c.random_start = c.random_start if "random_start" in method.options else None  # type: ignore[assignment]
        c.clean_weight = 0.0 if c.clean_weight is None else c.clean_weight
        attacker = None
        if method.has_attacker:
            attacker = AttackerSettings(c.attacker, c.attacker_every, c.attacker_width, c.attacker_scale,
                                        c.attacker_steps, c.grad_norm, c.l2l_update, _attacker_optimizer(c))
        return ResolvedConfig(
            model=c.model, method=c.method, eps=c.eps, epochs=c.epochs, batch_size=c.batch_size, init=c.init,
            ema=c.ema, data=_picked(DataSettings, c), attack=_picked(AttackSettings, c), loss=_picked(LossSettings, c),
            optimizer=OptimizerSettings(c.optimizer, c.lr, c.momentum, c.weight_decay, tuple(c.betas),
                                        tuple(c.lr_milestones), c.lr_gamma, c.lr_schedule),
            attacker=attacker, speed=_picked(SpeedSettings, c), run=_picked(RunSettings, c), norm=c.norm,
            pretrained=c.pretrained)

    def validate(self) -> None:
        """Raise UserError on the first bad value, before anything is written."""
        _validate_choices(self)
        _validate_counts(self)
        _validate_optimizers(self)
        _validate_losses(self)
        _validate_data(self)
        _validate_method(self)
        _validate_pretrained(self)

    # ---- storage -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict):
            raise UserError(f"a config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - names
        if unknown:
            raise UserError(f"config has unknown fields {sorted(unknown)} (written by a newer version?)")
        for f in dataclasses.fields(cls):
            if f.name in d and not _has_type(d[f.name], f.type):
                raise UserError(f"config field '{f.name}' should be {f.type}, got {d[f.name]!r:.80}")
        # Written before the switches existed, so trained without them (their defaults now
        # depend on the device).
        c = cls(**{"tf32": False, "channels_last": False, "compile": False, "cudnn_benchmark": False, **d})
        c.betas = tuple(c.betas)
        return c

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_recipe(cls, path: str | Path, overrides: dict[str, Any]) -> TrainConfig:
        """The config of a recipe file (`read_recipe`) with `overrides` (by field name, such
        as the flags given with --config) put in; its values are checked as a config.json's."""
        recipe = read_recipe(path)
        try:
            base = cls.from_dict({"tf32": cls.tf32, **recipe})  # a recipe without tf32 gets today's default
        except UserError as e:
            raise UserError(f"--config {path}: {e}") from None
        return dataclasses.replace(base, **overrides)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A config.json of any version; UserError naming the file if it is not one. Every version
        stored the model, the method and the data set: a file without them is damaged."""
        try:
            d = json.loads(Path(path).read_text())
            missing = [k for k in ("model", "method", "dataset") if isinstance(d, dict) and k not in d]
            if missing:
                raise UserError(f"it names no {' or '.join(missing)}; the file is damaged")
            return cls.from_dict(d)
        except (OSError, ValueError, TypeError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
            raise UserError(f"cannot read run config {path}: {e}") from None
        except UserError as e:
            raise UserError(f"run config {path}: {e}") from None


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A training recipe file as TrainConfig fields: JSON (`.json`, a run's own config.json
    included), TOML (`.toml`, tomllib) or YAML (`.yaml`/`.yml`, needs PyYAML); one table of
    TrainConfig's field names (`lr`, `pgd_steps`, ...; dashes are accepted as in the flags).
    UserError naming the file for anything else."""
    path = Path(path)
    kind = path.suffix.lower()
    try:
        text = path.read_text()
        if kind == ".toml":
            import tomllib

            d = tomllib.loads(text)
        elif kind in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                "or write the recipe as JSON or TOML") from None
            d = yaml.safe_load(text)
        elif kind == ".json":
            d = json.loads(text)
        else:
            raise UserError(f"--config {path}: give a .json, .toml, .yaml or .yml file")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError, and each parser's own error class
        raise UserError(f"cannot read --config {path}: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise UserError(f"--config {path} must hold one table of options, got {type(d).__name__}")
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def resolved_dataset(spec: str) -> str:
    """A data set spec with its path made absolute (folder:PATH, resolved as `data.load_dataset`
    resolves it); other specs unchanged."""
    kind, _, arg = spec.partition(":")
    if kind.lower() == "folder" and arg:
        return f"folder:{Path(arg).expanduser().resolve()}"
    return spec


def load_resolved(path: Path) -> ResolvedConfig:
    """A run's config.json, checked and resolved; UserError naming the file if it is not one
    or holds a value training would refuse."""
    config = TrainConfig.load(path)
    try:
        return config.resolve()
    except UserError as e:
        raise UserError(f"run config {path}: {e}") from None


def _attacker_optimizer(c: TrainConfig) -> OptimizerSettings:
    """Adam at ATTACKER_ADAM_LR without weight decay, fixed (the default), or with
    --attacker-optimizer sgd the classifier's lr, momentum, weight decay and schedule (the
    paper's CIFAR recipe); a given --attacker-lr, -momentum, -weight-decay, -lr-milestones wins.
    Betas and the schedule's gamma are the classifier's. The attacker's schedule stays multistep
    whatever --lr-schedule says: the attacker is no model being annealed to convergence, but
    an adversary that must keep up with the classifier through the whole run."""
    adam = (c.attacker_optimizer or "adam") == "adam"

    def given(value: Any, otherwise: Any) -> Any:
        return otherwise if value is None else value

    return OptimizerSettings(
        name="adam" if adam else "sgd",
        lr=given(c.attacker_lr, ATTACKER_ADAM_LR if adam else c.lr),
        momentum=given(c.attacker_momentum, c.momentum),
        weight_decay=given(c.attacker_weight_decay, 0.0 if adam else c.weight_decay),
        betas=tuple(c.betas),
        milestones=tuple(given(c.attacker_lr_milestones, [] if adam else c.lr_milestones)),
        gamma=c.lr_gamma)


def _picked(cls: type, c: TrainConfig) -> Any:
    """The settings group `cls`, its fields taken from TrainConfig's fields of the same names."""
    return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as 'float | None' or 'list[int]'."""
    for kind in annotation.split(" | "):
        if kind == "None" and value is None:
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue  # JSON true is not a number
        if kind == "int" and isinstance(value, int):
            return True
        if kind == "float" and isinstance(value, (int, float)):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "list[int]" and isinstance(value, list):
            return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if kind == "tuple[float, float]" and isinstance(value, (list, tuple)) and len(value) == 2:
            return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return False


# Method-specific options with no value of their own: giving one to a method that does not
# take it (its record's `options`) is an error. The others (--pgd-steps, --grad-norm, ...)
# have always been accepted and ignored by the methods they do not concern.
_CHECKED_OPTIONS = {"random_start": False, "beta": None, "noise": None, "attacker_every": None,
                    "start_every": None, "js_weight": None, "pgi_lambda": None, "pgi_decay": None, "pgi_reset": None}


def _method_options(c: TrainConfig) -> None:
    method = METHOD_RECORDS[c.method]
    for name, not_given in _CHECKED_OPTIONS.items():
        if getattr(c, name) != not_given and name not in method.options:
            takers = [m for m, r in METHOD_RECORDS.items() if name in r.options]
            raise UserError(f"--{name.replace('_', '-')} applies to --method {', '.join(takers)} only, "
                            f"not {c.method}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise UserError(f"--{name} must be a positive integer, got {value}")


def _non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 0:
        raise UserError(f"--{name} must be a non-negative integer, got {value}")


def _validate_choices(c: TrainConfig) -> None:
    """TrainConfig.validate: the choices: methods, optimizers, modes."""
    _choice("method", c.method, METHODS)
    _choice("norm", c.norm, NORMS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("lr-schedule", c.lr_schedule, LR_SCHEDULES)
    _choice("grad-norm", c.grad_norm, GRAD_NORMS)
    _choice("l2l-update", c.l2l_update, L2L_UPDATES)
    _choice("on-bad-image", c.on_bad_image, ON_BAD_IMAGE)
    _choice("loader", c.loader, LOADERS)
    _choice("on-nonfinite", c.on_nonfinite, ON_NONFINITE)
    _choice("amp", c.amp, AMP_MODES)
    from .models.attackers import ATTACKERS

    if c.attacker is not None:
        _choice("attacker", c.attacker, ATTACKERS)
    if c.attacker_optimizer is not None:
        _choice("attacker-optimizer", c.attacker_optimizer, OPTIMIZERS)


def _validate_counts(c: TrainConfig) -> None:
    """TrainConfig.validate: eps, and the counts and seeds."""
    if c.eps is not None:
        threat_model(c.norm).check_eps(c.eps, "--eps")
    _positive_int("epochs", c.epochs)
    _positive_int("batch-size", c.batch_size)
    if c.pgd_steps is not None:
        _positive_int("pgd-steps", c.pgd_steps)
    _positive_int("attacker-steps", c.attacker_steps)
    if c.workers is not None:
        _non_negative_int("workers", c.workers)
    _non_negative_int("val-robust-n", c.val_robust_n)
    _non_negative_int("checkpoint-every", c.checkpoint_every)
    if c.crop_padding is not None:
        _non_negative_int("crop-padding", c.crop_padding)
    for name in ("seed", "split_seed"):
        value = getattr(c, name)
        if not isinstance(value, int) or not (0 <= value <= MAX_SEED):
            raise UserError(f"--{name.replace('_', '-')} must be an integer in [0, 2^63), got {value}")


def _validate_optimizers(c: TrainConfig) -> None:
    """TrainConfig.validate: the optimizers' numbers: learning rates, momenta, weight decays, schedules."""
    step_top = max(MAX_STEP_SIZE, threat_model(c.norm).eps_max)  # an l2 step may exceed one pixel's range
    for name, top in (("lr", MAX_LR), ("attacker_lr", MAX_LR), ("step_size", step_top)):
        value = getattr(c, name)
        if name == "step_size" and value == 0 and c.eps == 0:
            continue  # eps 0: the attack's step is eps-proportional, so 0 (plain training, same code path)
        if value is not None and not (math.isfinite(value) and 0 < value <= top):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number <= {top:g}, got {value}")
    for name in ("momentum", "attacker_momentum"):
        value = getattr(c, name)
        if value is not None and not (0 <= value < 1):
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1), got {value}")
    for name in ("weight_decay", "attacker_weight_decay"):
        value = getattr(c, name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_LR):
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, {MAX_LR:g}], got {value}")
    if not (0 < c.lr_gamma <= 1):
        raise UserError(f"--lr-gamma must lie in (0, 1], got {c.lr_gamma}")
    if any(not (0 <= b < 1) for b in c.betas) or len(c.betas) != 2:
        raise UserError(f"--betas must be two numbers in [0, 1), got {c.betas}")
    for name in ("lr_milestones", "attacker_lr_milestones"):
        ms = getattr(c, name)
        if ms is not None and (any(m <= 0 for m in ms) or list(ms) != sorted(ms)):
            raise UserError(f"--{name.replace('_', '-')} must be increasing positive epochs")
    if c.lr_milestones and c.lr_schedule != "multistep":
        raise UserError(f"--lr-milestones applies to --lr-schedule multistep only, not {c.lr_schedule}")


def _validate_losses(c: TrainConfig) -> None:
    """TrainConfig.validate: the clean loss's weight and the attacker's width."""
    if c.clean_weight is not None and not (0 <= c.clean_weight <= 1):
        raise UserError(f"--clean-weight must lie in [0, 1], got {c.clean_weight}")
    if c.is_l2l and c.clean_weight is not None and c.clean_weight >= 1:
        raise UserError("--clean-weight 1 leaves the learned attacker nothing to learn; use < 1")
    if not (math.isfinite(c.attacker_width) and 0 < c.attacker_width <= MAX_ATTACKER_WIDTH):
        raise UserError(f"--attacker-width must lie in (0, {MAX_ATTACKER_WIDTH:g}], got {c.attacker_width}")


def _validate_data(c: TrainConfig) -> None:
    """TrainConfig.validate: the data options: image size, training subset, validation split."""
    if c.image_size is not None:
        _positive_int("image-size", c.image_size)
        if c.image_size > MAX_IMAGE_SIZE:
            raise UserError(f"--image-size must be at most {MAX_IMAGE_SIZE}, got {c.image_size}")
    if c.train_size is not None:
        _positive_int("train-size", c.train_size)
    if not math.isfinite(c.val_size) or c.val_size <= 0 or (c.val_size >= 1 and c.val_size != int(c.val_size)):
        raise UserError(f"--val-size must be a fraction in (0, 1) or a count >= 1, got {c.val_size}")


def _validate_pretrained(c: TrainConfig) -> None:
    """TrainConfig.validate: --pretrained goes with a timm: model, and not with --init. Whether
    the file exists is checked where it is read (a resumed run does not read it again)."""
    if c.pretrained is None:
        return
    if not c.pretrained.strip():
        raise UserError("--pretrained needs a weights file (.safetensors, .pth) or 'hub'")
    if not c.model.startswith("timm:"):
        raise UserError(f"--pretrained applies to timm: models only, not --model {c.model} "
                        "(use --init RUN to start from a trained run)")
    if c.init is not None:
        raise UserError("--pretrained and --init both give starting weights; give one of them")


def _validate_method(c: TrainConfig) -> None:
    """TrainConfig.validate: the method's own options, and whether it has a form under --norm."""
    reason = METHOD_RECORDS[c.method].unsupported_norms.get(c.norm)
    if reason is not None:
        raise UserError(f"--method {c.method} has no {threat_model(c.norm).label} form: {reason}")
    _method_options(c)
    if c.noise is not None and not (math.isfinite(c.noise) and 0 <= c.noise <= MAX_NOISE):
        raise UserError(f"--noise must lie in [0, {MAX_NOISE:g}] (pixel units), got {c.noise}")
    if not (isinstance(c.label_smoothing, (int, float)) and 0 <= c.label_smoothing < 1):
        raise UserError(f"--label-smoothing must lie in [0, 1), got {c.label_smoothing}")
    if c.ema is not None and not (isinstance(c.ema, (int, float)) and 0 < c.ema < 1):
        raise UserError(f"--ema must be a decay in (0, 1), e.g. 0.999, got {c.ema}")
    if c.attacker_every is not None:
        _positive_int("attacker-every", c.attacker_every)
        if c.attacker_every > MAX_ATTACKER_EVERY:
            raise UserError(f"--attacker-every must be at most {MAX_ATTACKER_EVERY}, got {c.attacker_every}")
    if c.beta is not None and not (math.isfinite(c.beta) and 0 <= c.beta <= MAX_BETA):
        raise UserError(f"--beta must lie in [0, {MAX_BETA:g}], got {c.beta}")
    if c.start_every is not None:
        _positive_int("start-every", c.start_every)
        if c.start_every > MAX_ATTACKER_EVERY:
            raise UserError(f"--start-every must be at most {MAX_ATTACKER_EVERY}, got {c.start_every}")
    if c.js_weight is not None and not (isinstance(c.js_weight, (int, float)) and math.isfinite(c.js_weight)
                                        and 0 <= c.js_weight <= MAX_BETA):
        raise UserError(f"--js-weight must lie in [0, {MAX_BETA:g}], got {c.js_weight}")
    _validate_pgi(c)
    if c.clean_weight and c.method in KL_METHODS:
        raise UserError(f"--clean-weight does not apply to --method {c.method}: its loss has its own clean "
                        "term, weighted against the KL term by --beta")


def _validate_pgi(c: TrainConfig) -> None:
    """TrainConfig.validate: fgsm-pgi's consistency weight, momentum decay and reset period."""
    if c.pgi_lambda is not None and not (math.isfinite(c.pgi_lambda) and 0 <= c.pgi_lambda <= MAX_BETA):
        raise UserError(f"--pgi-lambda must lie in [0, {MAX_BETA:g}], got {c.pgi_lambda}")
    if c.pgi_decay is not None and not (math.isfinite(c.pgi_decay) and 0 <= c.pgi_decay <= 1):
        raise UserError(f"--pgi-decay must lie in [0, 1], got {c.pgi_decay}")
    if c.pgi_reset is not None:
        _positive_int("pgi-reset", c.pgi_reset)
