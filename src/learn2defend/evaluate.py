"""Accuracy of a trained run under attacks, with the per-sample worst case; transfer
(black-box) attacks from a surrogate run.

Robust accuracy is only meaningful against the strongest attack tried, so besides
one number per attack we report `worst`: the fraction of images that survive
*every* attack that was run on them.

Attacks run batch by batch, so a data set of any size never sits on the device as
float images at once. A result depends only on the model, the images, the attack and
the seed: not on `--batch-size`, nor on the other attacks or their order (see
`correctness.attack_correct`). AutoAttack is slow
enough to be worth resuming: by default each chunk's progress is saved under
`<run>/eval-state/<key>/`, where the key hashes everything the result depends on
(checkpoint file, data, eps, seed, batch size, attack). An interrupted `eval` run again
with the same arguments picks up where it stopped; a finished one removes its state,
so the next evaluation computes afresh instead of silently reusing old results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .attacks import (
    Attack,
    AutoAttack,
    ThreatModel,
    check_eps,
    check_images,
    check_labels,
    in_model_dtype,
    list_attack_names,
    make_attack,
    threat_model,
)
from .checks import sanity_checks
from .config import DATA_DIR_HELP, DEVICE_HELP, TrainConfig, option, parse_fraction
from .correctness import attack_correct, fraction
from .data import Dataset, ImageData, in_memory, load_dataset
from .errors import UserError, eps_range_error
from .runs import BEST, LAST, Run, load_run, resolve_device
from .speed import evaluation_layout

STATE_DIR = "eval-state"


ATTACK_SEED_HELP = "seed of the attacks' random starts"


def _attack_names_help() -> str:
    """eval --attacks' help, with the attack names registered when the parser is built."""
    return (f"comma-separated; K is a number of iterations: {', '.join(list_attack_names())} "
            "(default: none, clean accuracy only); attacks always run in IEEE float32, whatever "
            "speed switches the run was trained with")


@dataclass(kw_only=True)
class EvalData:
    """What to evaluate and on which data: the options eval, transfer, sweep and show share.
    Each field is also a command-line option (config.option); a subclass's `FLAG_HELP`
    words the help of an inherited option for its command."""

    FLAG_HELP: ClassVar[dict[str, str]] = {}

    dataset: str | None = option(None, help="another data set with the same classes (default: the run's own)")
    split: str = option("val", help="val or test")
    n: int | None = option(None, flag="--n-images", aliases=("--n",), metavar="N",
                           help="use the first N images of the split (default: all)")
    eps: float | None = option(None, help="attack radius (default: the run's training eps; with another --norm "
                               "than the run's, that norm's default for the data set)")
    norm: str | None = option(None, help="threat model of the attacks: linf | l2 (default: the run's own; runs "
                              "trained before --norm are linf)")
    which: str = option("last", help="last or best checkpoint")
    device: str = option("auto", help=DEVICE_HELP)
    data_dir: str | None = option(None, help=DATA_DIR_HELP + " (default: the run's)")
    seed: int = option(0, help=ATTACK_SEED_HELP)


@dataclass(kw_only=True)
class BatchedEvalData(EvalData):
    """EvalData of the commands that attack many images, batch by batch."""

    batch_size: int = option(256, help="images per attack batch")


@dataclass(kw_only=True)
class EvalConfig(BatchedEvalData):
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "dataset": "evaluate on another data set with the same classes (default: the run's own)",
        "n": "evaluate the first N images of the split (default: all)",
        "batch_size": "images per attack batch (memory only: the numbers do not depend on it; AutoAttack always "
                      "attacks chunks of 250)",
    }

    checkpoint: str = option(help="run folder, or a model file written by learn2defend export (its data set and "
                             "split as recorded there; AutoAttack's progress is not saved for a file)")
    attacks: list[str] = option(default_factory=list, parse="comma_list", help=_attack_names_help)
    progress: bool = True
    checks: bool = option(False, switch=True,
                          help="sanity checks for gradient masking (Carlini et al. 2019) on the same images")
    surrogate: str | None = option(None, help="run folder: with --checks, compare white-box PGD with PGD "
                                   "transferred from it (default: none, that check is skipped)")
    attack_state: bool = option(True, help="save AutoAttack's progress under DIR/eval-state/ and resume an "
                                "interrupted eval from it")
    pgm_step: float | None = option(None, help="step of the pgmK attacks (default eps/3; the paper: 0.01)")

    def validate(self) -> None:
        if self.norm is not None:
            threat = threat_model(self.norm)
            if self.eps is not None:
                threat.check_eps(self.eps, "--eps")
        elif self.eps is not None and not (isinstance(self.eps, (int, float)) and 0 <= self.eps):
            raise eps_range_error("--eps", self.eps)  # the run's norm decides the upper bound (`norm_and_eps`)
        if self.n is not None and self.n < 1:
            raise UserError(f"--n-images must be a positive integer, got {self.n}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.split not in ("train", "val", "test"):
            raise UserError(f"--split must be val or test (or train), got '{self.split}'")
        if self.which not in ("last", "best"):
            raise UserError(f"--which must be last or best, got '{self.which}'")
        if self.pgm_step is not None and not (0 < self.pgm_step <= 1):
            raise UserError(f"--pgm-step must lie in (0, 1] (pixel units), got {self.pgm_step}")
        if self.surrogate and not self.checks:
            raise UserError("--surrogate is used by --checks; add --checks, or use learn2defend transfer")


def load_attacked(path: str | Path, which: str, device: torch.device | str) -> Run:
    """A run folder's classifier (no attacker) on `device`, to be attacked: in the device's
    training layout (`speed.evaluation_layout`; on the CPU channels_last, 1.2-1.3x faster
    attacks, the same float32 math). UserError as `runs.load_run`."""
    run = load_run(path, which, device, with_attacker=False)
    evaluation_layout(run.model, device)
    return run


def load_evaluated(path: str | Path, which: str, device: torch.device | str, dataset: str | None = None) -> Run:
    """A run folder's classifier, or that of a file written by `learn2defend export`, as a Run
    whose config says what eval needs: the model, method, eps and data settings of the run
    (for a file exported before it recorded its data set, `dataset` must name one)."""
    from .export import load_exported, read_metadata

    path = Path(path)
    if not path.is_file():
        return load_attacked(path, which, device)
    if which != "last":
        raise UserError(f"--which {which} applies to run folders; {path} holds one set of weights")
    meta = read_metadata(path)
    data = dict(meta.get("data") or {})
    if "dataset" not in data and dataset is None:
        raise UserError(f"{path} does not record its data set (exported by an older learn2defend); "
                        "name it with --dataset")
    try:
        config = TrainConfig(model=meta["model"], method=meta["method"], eps=float(meta["eps"]),
                             norm=meta.get("norm", "linf"), **data).resolve()
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{path} has damaged metadata ({e})") from None
    model = evaluation_layout(load_exported(path, device), device)
    shape = {k: meta[k] for k in ("classes", "image_shape", "mean", "std")}
    return Run(path, config, {"dataset": config.data.dataset, **shape}, model, None, 0)


def eval_data(run: Run, dataset: str | None, data_dir: str | None) -> Dataset:
    """The run's own data (same validation split as in training), or another set with the same
    classes; `data_dir` None: the run's own."""
    c = run.config.data
    spec = dataset or c.dataset
    data = load_dataset(
        spec, c.data_dir if data_dir is None else data_dir,
        val_size=c.val_size if c.val_size < 1 else int(c.val_size),
        split_seed=c.split_seed, image_size=c.image_size, on_bad_image=c.on_bad_image,
        loader=_eval_loader(spec, c.loader),
    )
    classes = [str(k) for k in run.meta["classes"]]
    if len(data.classes) != len(classes):
        raise UserError(f"{data.name} has {len(data.classes)} classes but the model was trained on {len(classes)}")
    if list(data.classes) != classes:  # labels are indices: the same names in the same order
        wrong = [i for i, (a, b) in enumerate(zip(data.classes, classes, strict=True)) if a != b]
        shown = ", ".join(f"{i}: '{data.classes[i]}' vs '{classes[i]}'" for i in wrong[:3])
        more = ", ..." if len(wrong) > 3 else ""
        raise UserError(f"{data.name} names its classes differently from the model's run, so its labels would "
                        f"be scored against other classes ({len(wrong)} differ; label {shown}{more}); "
                        "use a data set with the same class names in the same order")
    (c, h, w), (mc, mh, mw) = data.image_shape, run.meta["image_shape"]
    if c != mc:
        raise UserError(f"{data.name} has {c}-channel images but the model takes {mc}-channel ones; "
                        f"evaluate it on a data set with {mc} channel(s)")
    if (h, w) != (mh, mw):
        how = (f"resize its image files to {mh}x{mw}" if data.name.startswith("folder:")
               else "use a data set of that size, e.g. a folder:PATH of resized images")
        raise UserError(f"{data.name} has {h}x{w} images but the model takes {mh}x{mw}; {how}")
    return data


def _eval_loader(spec: str, loader: str) -> str:
    """imagenet:PATH always streams for evaluation: only the N images evaluated are decoded, with
    the eval transform its in-memory form uses too, so the images are the same either way."""
    return "stream" if spec.lower().startswith("imagenet:") else loader


def first_n(data: Dataset, split: str, n: int | None) -> ImageData:
    """The first `n` images of a split (all: None) in memory; of a streamed split only these
    are decoded, with the eval transform (Resize(size / 0.875) + CenterCrop(size))."""
    images = data.split(split)
    if n is not None:
        images = images.head(n)
    if data.name.startswith("imagenet:") and split == "val":
        print("note: --split val is carved from PATH/train (by --split-seed); ImageNet's official validation "
              "images (PATH/val, RobustBench's) are --split test", file=sys.stderr)
    return in_memory(images)


def norm_and_eps(run: Run, norm: str | None, eps: float | None) -> tuple[ThreatModel, float]:
    """The threat model and radius an evaluation of `run` uses: the given ones, else the
    run's own (runs trained before --norm are l-inf); with a norm other than the run's and
    no eps, that norm's default eps for the run's data set. UserError for an eps out of range."""
    threat = threat_model(run.config.norm if norm is None else norm)
    if eps is None:
        eps = run.config.eps if threat.name == run.config.norm else threat.default_eps(run.config.data.dataset)
    return threat, threat.check_eps(eps, "--eps")


def build_attacks(names: list[str], eps: float, batch_size: int, pgm_step: float | None = None,
                  norm: str | ThreatModel | None = None) -> list[Attack]:
    """Attack objects under the threat model `norm` (l-inf by default), duplicates dropped
    (they would count twice); bad names fail here, before any work. `pgm_step` replaces the
    pgmK attacks' default step of eps/3.

    `batch_size` is accepted for compatibility and changes nothing: results must not
    depend on it, so AutoAttack keeps its own chunk of 250 images (see `attack_correct`)."""
    del batch_size
    attacks = []
    for name in dict.fromkeys(names):
        is_pgm = re.fullmatch(r"pgm[0-9]+", name.strip().lower()) is not None
        options = {"step_size": pgm_step} if is_pgm and pgm_step is not None else {}
        attacks.append(make_attack(name, eps, norm, **options))
    return attacks


def check_same_task(a: Run, b: Run, what: str) -> None:
    """Two runs whose models can be compared on the same images (transfer, sweeps)."""
    if list(a.meta["classes"]) != list(b.meta["classes"]):
        raise UserError(f"{what}: {a.path} and {b.path} were trained on different classes "
                        f"({len(a.meta['classes'])} vs {len(b.meta['classes'])}: {a.meta['classes'][:3]}... vs "
                        f"{b.meta['classes'][:3]}...)")
    if list(a.meta["image_shape"]) != list(b.meta["image_shape"]):
        raise UserError(f"{what}: {a.path} takes {a.meta['image_shape']} images but {b.path} takes "
                        f"{b.meta['image_shape']}")


def shard(images: ImageData, rank: int, world: int, block: int = 1) -> ImageData:
    """Rank `rank`'s share of `images` among `world` processes: blocks rank, rank + world, ...
    of `block` consecutive images. With AutoAttack's chunk as the block (250 images, whose
    random numbers it shares), every chunk is the one a single process attacks, so the
    accuracy does not depend on the number of processes; other attacks draw per image."""
    keep = (torch.arange(len(images)) // block) % world == rank
    return ImageData(images.images[keep], images.labels[keep])


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Clean accuracy, accuracy under each attack, and the per-sample worst case; with
    `config.checks`, the sanity checks ("checks", "flagged")."""
    config.validate()
    from . import distributed

    world = distributed.world_size()
    if world > 1 and config.checks:
        raise UserError("--checks do not run under torchrun; run eval --checks as one process")
    device = distributed.local_device(resolve_device(config.device))
    run = load_evaluated(config.checkpoint, config.which, device, config.dataset)
    threat, eps = norm_and_eps(run, config.norm, config.eps)
    if config.checks and not eps > 0:
        raise UserError("--checks attack the model, so they need eps > 0")
    attacks = build_attacks(config.attacks, eps, config.batch_size, config.pgm_step, threat)
    surrogate = load_evaluated(config.surrogate, "last", device, config.dataset) if config.surrogate else None
    if surrogate is not None:
        check_same_task(run, surrogate, "--surrogate")
    data = eval_data(run, config.dataset, config.data_dir)
    images = first_n(data, config.split, config.n)
    n = len(images)
    if world > 1:  # under torchrun each rank attacks its share; the counts are added up
        block = max((a.batch_size for a in attacks if isinstance(a, AutoAttack)), default=1)
        images = shard(images, distributed.rank(), world, block)
    # Only AutoAttack keeps state (the checks may run autoattack-fast); not per rank.
    resumable = world == 1 and run.path.is_dir() and (config.checks or any(isinstance(a, AutoAttack) for a in attacks))
    state = _state_dir(run, config, data, eps, len(images), threat.name) if config.attack_state and resumable else None
    with _state_discarded_on_failure(state), _interruptible(state):
        bad: dict[str, Tensor] = {}
        correct = attack_correct(run.model, images, attacks, config.batch_size, device, config.seed,
                                 config.progress and distributed.is_main(), state, nonfinite=bad)
        if world > 1:
            counts = distributed.sum_counts([int(ok.sum()) for ok in correct.values()] + [int(bad["worst"].sum())])
            accuracy = {name: c / n for name, c in zip(correct, counts[:-1], strict=True)}
            nonfinite = counts[-1]
        else:
            accuracy = {name: fraction(ok) for name, ok in correct.items()}
            nonfinite = int(bad["worst"].sum())
        if not attacks:
            del accuracy["worst"]  # the worst case over no attack is just clean accuracy
        result: dict[str, Any] = {
            "accuracy": accuracy,
            "n": n,
            "dataset": data.name,
            "split": config.split,
            "eps": eps,
            "norm": threat.name,
            "seed": config.seed,  # of the attacks' random starts
            "checkpoint": str(run.path),
            "which": config.which if run.path.is_dir() else None,  # an exported file has one set of weights
            "model": run.config.model,
            "method": run.config.method,
            "nonfinite_logits": nonfinite,
        }
        if config.pgm_step is not None:
            result["pgm_step"] = config.pgm_step
        if config.checks:
            report = sanity_checks(
                run.model, images, eps, device=device, batch_size=config.batch_size, seed=config.seed,
                known=correct, surrogate=surrogate.model if surrogate else None, progress=config.progress,
                state_dir=state, nonfinite=bad.get("worst"), norm=threat,
            )
            result["checks"], result["flagged"] = report["checks"], report["flagged"]
            attacks += report["attacks"]
        warnings = list(dict.fromkeys(w for a in attacks for w in getattr(a, "warnings", [])))
        warnings += nonfinite_warning(nonfinite, n)
        if config.n is not None and config.n > n:
            warnings.append(f"--n-images {config.n}: the {config.split} split has {n} images; all {n} were evaluated")
        if warnings:
            result["warnings"] = warnings
    _discard_state(state)  # finished: the next evaluation starts afresh
    return result


def evaluate_model(
    model: nn.Module,
    images: Tensor | str,
    labels: Tensor | None = None,
    *,
    attacks: Sequence[str | Attack] = (),
    eps: float | None = None,
    norm: str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    checks: bool = False,
    surrogate: nn.Module | None = None,
    split: str = "val",
    n: int | None = None,
    data_dir: str = "data",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate your own model, as `learn2defend eval --json` evaluates a run.

    model: any nn.Module mapping images [B, C, H, W] in [0, 1] to logits [B, K]. A model
        trained on normalized input must normalize inside its forward, e.g.
        `nn.Sequential(learn2defend.models.Normalize(mean, std), net)`.
    images: a floating-point tensor [N, C, H, W] in [0, 1] (on any device), with `labels`
        an integer tensor [N] (any integer dtype) in [0, K); or the name of a learn2defend
        data set ("digits", "cifar10", "folder:PATH", ...), of which the first `n` images of
        `split` ("val", "test" or "train") are used, read from `data_dir` (no download).
    attacks: attack names as in `eval --attacks` ("fgsm", "pgd10", "autoattack", ...) or
        Attack objects; duplicate names count once. Default: none (clean accuracy only).
    eps: the radius in pixel units (e.g. 8/255 under l-inf, 0.5 under l2); required with
        attacks or checks.
    norm: the threat model of the named attacks and the checks: "linf" (default) or "l2"
        (learn2defend.attacks.threat); Attack objects keep their own.
    batch_size: images per attack batch (memory only: the numbers do not depend on it).
    device: where to attack; default the device of the model's first parameter (CPU for a
        model without parameters). The model is not moved: it must already be there.
    seed: the attacks' seed; the result depends only on the model, the images, the
        attacks, eps and the seed. The global torch RNG is neither used nor reseeded.
    checks, surrogate: run the sanity checks of `learn2defend.checks` on the same images
        (`surrogate`, another model, enables the white-box-vs-transfer check).

    Returns {"accuracy": {"clean": float, <attack name>: float, ..., "worst": float (the
    share of images that survive every attack; only with attacks)}, "n": int, "eps":
    float | None, "norm": "linf" | "l2", and with a data set name "dataset" and "split"; with checks "checks" and
    "flagged"; "warnings" (list of str) when an attack had any}. Accuracies are fractions
    in [0, 1]. The model's (and surrogate's) train/eval modes, `requires_grad` flags and
    `.grad`s are restored.

    Raises UserError for bad images, labels (dtype, shape, range against the model's
    number of classes), eps, attack names or options.
    """
    threat = threat_model(norm)
    eps = _checked_eps(batch_size, eps, bool(attacks), checks, threat)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else (images.device if isinstance(images, Tensor) else "cpu")
    device = torch.device(device)
    data, result = _images_to_evaluate(images, labels, split, n, data_dir)
    if data.images.is_floating_point():  # float64/16 or bfloat16 images: the model's dtype
        data = ImageData(in_model_dtype(model, data.images), data.labels)
    attack_objects = _unique_attacks(attacks, eps, batch_size, threat)
    bad: dict[str, Tensor] = {}
    correct = attack_correct(model, data, attack_objects, batch_size, device, seed, progress, nonfinite=bad)
    accuracy = {name: fraction(ok) for name, ok in correct.items()}
    if not attack_objects:
        del accuracy["worst"]
    nonfinite = int(bad["worst"].sum())
    result = {"accuracy": accuracy, "n": len(data), "eps": eps, "norm": threat.name, "seed": seed,
              "nonfinite_logits": nonfinite} | result
    ran = list(attack_objects)
    if checks:
        report = sanity_checks(model, data, eps, device=device, batch_size=batch_size, seed=seed, known=correct,
                               surrogate=surrogate, progress=progress, nonfinite=bad["worst"], norm=threat)
        result["checks"], result["flagged"] = report["checks"], report["flagged"]
        ran += report["attacks"]
    warnings = list(dict.fromkeys(w for a in ran for w in getattr(a, "warnings", [])))
    warnings += nonfinite_warning(nonfinite, len(data))
    if warnings:
        result["warnings"] = warnings
    return result


def _checked_eps(batch_size: int, eps: float | None, attacks: bool, checks: bool,
                 threat: ThreatModel | None = None) -> float | None:
    """evaluate_model's batch size and eps checked; eps as `check_eps` returns it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (attacks or checks) and eps is None:
        raise UserError("eps is required with attacks or checks (pixel units, e.g. 8/255)")
    if eps is not None:
        eps = check_eps(eps, threat)
    if checks and not eps > 0:
        raise UserError("the sanity checks attack the model, so they need eps > 0")
    return eps


def _images_to_evaluate(images: Tensor | str, labels: Tensor | None, split: str, n: int | None,
                        data_dir: str) -> tuple[ImageData, dict[str, Any]]:
    """evaluate_model's images (a tensor with its labels, or the first n of a data set's
    split), checked, and what its result says of them (the data set and split, if named)."""
    result: dict[str, Any] = {}
    if isinstance(images, str):
        if labels is not None:
            raise UserError("labels come with the data set: pass labels only with an images tensor")
        if split not in ("train", "val", "test"):
            raise UserError(f"split must be val, test or train, got {split!r}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise UserError(f"n must be a positive integer, got {n!r}")
        data = first_n(load_dataset(images, data_dir, loader=_eval_loader(images, "auto")), split, n)
        result.update(dataset=images, split=split)
    else:
        check_images(images)
        if labels is None:
            raise UserError("labels are required with an images tensor: an integer tensor [N]")
        labels = check_labels(labels, len(images))
        if n is not None:
            images, labels = images[:n], labels[:n]
        data = ImageData(images.detach(), labels.cpu())
    if not len(data):
        raise UserError("no images to evaluate")
    return data, result


def _unique_attacks(attacks: Sequence[str | Attack], eps: float | None, batch_size: int,
                    threat: ThreatModel | None = None) -> list[Attack]:
    """Attack names built (under `threat`), Attack objects as they are, each name once."""
    attack_objects: list[Attack] = []
    for a in attacks:
        attack = build_attacks([a], eps, batch_size, norm=threat)[0] if isinstance(a, str) else a
        if not isinstance(attack, Attack):
            raise UserError(f"attacks must be attack names or learn2defend Attack objects, got {a!r}")
        if attack.name not in {b.name for b in attack_objects}:  # a duplicate would count twice
            attack_objects.append(attack)
    return attack_objects


def _discard_state(state: Path | None) -> None:
    if state is None:
        return
    shutil.rmtree(state, ignore_errors=True)
    with contextlib.suppress(OSError):
        state.parent.rmdir()  # only if no other evaluation's state is left there


class EvalInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during `evaluate`; the message says how to continue."""


@contextlib.contextmanager
def _interruptible(state: Path | None):
    """SIGTERM is handled as SIGINT (a KeyboardInterrupt: AutoAttack's saved progress is
    kept), and either ends in EvalInterrupted saying how to continue."""
    import signal
    import threading

    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():
        def _term(signum, frame):
            raise KeyboardInterrupt

        previous, installed = signal.signal(signal.SIGTERM, _term), True
    try:
        yield
    except EvalInterrupted:
        raise
    except KeyboardInterrupt as e:
        if state is not None and state.is_dir() and any(state.iterdir()):
            how = (f"AutoAttack's finished stages are saved in {state}; run the same eval command again "
                   "to continue from there")
        else:
            how = "no progress was saved (only AutoAttack's is); run the same eval command again to start over"
        raise EvalInterrupted(f"eval interrupted: {how}") from e
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _state_discarded_on_failure(state: Path | None):
    """AutoAttack's saved progress survives an interruption (KeyboardInterrupt: resume it), not
    a failure, after which it would only mislead the next evaluation."""
    try:
        yield
    except Exception:
        _discard_state(state)
        raise


def attack_accuracy(
    model: nn.Module,
    images: ImageData,
    attacks: list,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """Correct counts: clean, per attack, and `worst` (correct under every attack)."""
    correct = attack_correct(model, images, attacks, batch_size, device, seed, progress)
    return {name: int(ok.sum()) for name, ok in correct.items()}


def transfer_accuracy(
    surrogate: nn.Module,
    target: nn.Module,
    images: ImageData,
    attacks: list,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, int]:
    """Black-box transfer attack (Liu et al. 2016): each attack is computed on the
    surrogate; the counts are the *target's* correct predictions on those images
    (clean: the target on the clean images; worst: correct under every transferred attack)."""
    correct = attack_correct(target, images, attacks, batch_size, device, seed, progress, source=surrogate)
    return {name: int(ok.sum()) for name, ok in correct.items()}


@dataclass(kw_only=True)
class TransferConfig(BatchedEvalData):
    FLAG_HELP: ClassVar[dict[str, str]] = {"eps": "attack radius (default: the target's training eps)",
                                           "norm": "threat model of the attacks: linf | l2 (default: the target's)"}

    surrogate: str = option(help="run folder the attacks are computed on")
    target: str = option(help="run folder that is measured")  # its data set and eps unless given
    attacks: list[str] = option(default_factory=lambda: ["fgsm", "pgd10"],
                                help="comma-separated (default: fgsm,pgd10)")
    progress: bool = True


def transfer(config: TransferConfig) -> dict[str, Any]:
    """Accuracy of the target run on adversarial examples crafted on the surrogate run.

    "accuracy" is the target's; "surrogate_accuracy" the surrogate's own (white-box)
    accuracy on the same examples, which tells a weak transfer from a weak attack.
    """
    EvalConfig(checkpoint=config.target, split=config.split, n=config.n, batch_size=config.batch_size,
               eps=config.eps, norm=config.norm, which=config.which).validate()
    device = resolve_device(config.device)
    target = load_attacked(config.target, config.which, device)
    surrogate = load_attacked(config.surrogate, config.which, device)
    check_same_task(surrogate, target, "transfer")
    threat, eps = norm_and_eps(target, config.norm, config.eps)
    attacks = build_attacks(config.attacks, eps, config.batch_size, norm=threat)
    if not attacks:
        raise UserError("transfer needs at least one attack, e.g. --attacks fgsm,pgd10")
    images = first_n(eval_data(target, config.dataset, config.data_dir), config.split, config.n)
    own: dict[str, Tensor] = {}
    bad: dict[str, Tensor] = {}
    correct = attack_correct(target.model, images, attacks, config.batch_size, device, config.seed,
                             config.progress, source=surrogate.model, source_correct=own, nonfinite=bad)
    n = len(images)
    result: dict[str, Any] = {
        "accuracy": {k: fraction(v) for k, v in correct.items()},
        "surrogate_accuracy": {k: fraction(v) for k, v in own.items()},
        "surrogate": str(surrogate.path),
        "target": str(target.path),
        "n": n,
        "eps": eps,
        "norm": threat.name,
        "seed": config.seed,
        "split": config.split,
        "nonfinite_logits": int(bad["worst"].sum()),
    }
    warnings = list(dict.fromkeys(w for a in attacks for w in getattr(a, "warnings", [])))
    warnings += nonfinite_warning(result["nonfinite_logits"], n)
    if warnings:
        result["warnings"] = warnings
    return result


# ---- helpers -----------------------------------------------------------------------------


def nonfinite_warning(count: int, n: int) -> list[str]:
    """The warning for `count` of `n` images whose logits were not finite (clean or under an
    attack), as a list of zero or one line."""
    if not count:
        return []
    return [f"{count} of {n} images gave non-finite logits (NaN or inf), clean or under an attack; "
            "they are counted as wrong (\"nonfinite_logits\" in --json)"]


def _state_dir(run: Run, config: EvalConfig, data: Dataset, eps: float, n: int, norm: str = "linf") -> Path | None:
    """<run>/eval-state/<key>: the key changes whenever the result could (another
    checkpoint file, data, eps, norm, seed or chunking), so stale state is never reused.
    None when the run folder is read-only: the evaluation then simply is not resumable."""
    ckpt = run.path / (LAST if config.which == "last" else BEST)
    stat = ckpt.stat()
    key = json.dumps([str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns, data.name, config.split, n,
                      config.batch_size, eps, config.seed, norm])
    path = run.path / STATE_DIR / hashlib.sha256(key.encode()).hexdigest()[:16]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if any(path.iterdir()):
        print(f"learn2defend: resuming AutoAttack from {path}", file=sys.stderr)
    return path


__all__ = [
    "EvalConfig", "EvalData", "EvalInterrupted", "TransferConfig", "evaluate", "evaluate_model", "transfer",
    "attack_accuracy",
    "attack_correct",
    "transfer_accuracy", "eval_data", "first_n", "fraction", "build_attacks", "check_same_task", "parse_fraction",
    "load_attacked", "load_evaluated", "norm_and_eps",
]
