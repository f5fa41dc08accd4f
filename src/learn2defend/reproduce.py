"""Reproduce the paper's experiments: Tables 2-7 and Figures 3-5; and, beyond the paper, the
frontier: AutoAttack accuracy against training cost for every method (`_frontier`).

`reproduce(experiment, preset, out)` trains every run an experiment needs as an ordinary
run folder under `out/runs/` (with `train(..., resume=True)`: finished runs are skipped,
interrupted ones continue; a run another process is training is put off and waited for),
evaluates each run once (results cached as JSON under `out/evals/`, keyed by the run's
epoch and the evaluation settings, so an interrupted table does not redo finished
evaluations), and writes per experiment a markdown table (ours as mean ± std over seeds,
the paper's number beside it), a CSV and a JSON of the raw numbers, and PNG figures.

Runs are shared between experiments: table3/4, fig3/4/5 reuse table2's runs, table7
reuses table5's. The run folder of a configuration depends only on the data set, the
training recipe (SGD for CIFAR as in the paper's 3.2; Adam for SVHN as in its 3.3), the
method, the attacker and the seed; the frontier's also on its eps (`--eps`) when that is not the
data set's default (its plain nets excepted: they do not depend on eps).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .attacks import threat_model
from .config import TrainConfig, default_eps, option
from .errors import UserError
from .evaluate import EvalConfig, build_attacks, check_same_task, eval_data, evaluate, first_n, transfer_accuracy
from .figures import csv_text
from .methods import METHOD_RECORDS, attacker_in_channels
from .runs import FolderLock, RunFolderBusy, build_attacker, load_run, resolve_device
from .train import train

EXPERIMENTS = ("table2", "table3", "table4", "table5", "table6", "table7", "fig3", "fig4", "fig5")
# Beyond the paper (not part of "all"): AutoAttack accuracy against training cost, per method.
EXTRA_EXPERIMENTS = ("frontier",)
PRESETS_PUBLIC = ("paper", "cpu")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
BUSY_WAIT_SECONDS = 20  # a run folder another reproduce is training: look again after this long

# The data sets each experiment uses in the paper (--dataset replaces them).
EXPERIMENT_DATASETS: dict[str, list[str]] = {
    "table2": ["cifar10", "cifar100"], "table3": ["cifar10"], "table4": ["cifar10"], "table5": ["svhn"],
    "table6": ["cifar100"], "table7": ["svhn"], "fig3": ["cifar10"], "fig4": ["cifar10"],
    "fig5": ["cifar10", "cifar100", "svhn"], "frontier": ["cifar10"],
}
# Training recipe per experiment: the paper trains SVHN models with Adam (3.3), CIFAR ones with SGD (3.2).
EXPERIMENT_RECIPE = {"table5": "adam", "table7": "adam"}
# Black-box tables: the attacker network of the targets (Tables 3 and 6: slim; Table 7: wide).
BLACKBOX_ATTACKER = {"table3": "slim", "table6": "slim", "table7": "wide"}
WHITEBOX_COLUMNS = ("clean", "fgsm", "pgm10", "cw")  # the paper's columns; pgm10 is its "PGM10"/PGD
SURROGATES = ("plain", "fgsm", "pgd")
BLACKBOX_ATTACKS = ("fgsm", "pgm10")
# The paper's L2L methods (fgsm-sdi, also with an attacker, is not the paper's).
PAPER_L2L_METHODS = ("naive-l2l", "grad-l2l", "2step-l2l")
ROW_LABELS = {"plain": "Plain Net", "fgsm": "FGSM Net", "pgd": "PGM Net", "naive-l2l": "Naive L2L",
              "grad-l2l": "Grad L2L", "2step-l2l": "2-Step L2L"}


@dataclass(frozen=True)
class Preset:
    """Everything an experiment's size depends on."""

    name: str
    model: str
    plain_epochs: int
    plain_lr: float
    plain_milestones: tuple[int, ...]
    epochs: int  # adversarial epochs (the paper: 40, lr / 10 after 30)
    l2l_lr: float
    l2l_milestones: tuple[int, ...]
    baseline_lr: float  # FGSM/PGM nets: fixed step size (the paper's 0.01, 3.2)
    adam_lr: float  # SVHN recipe (3.3): classifier Adam lr, / 10 at the L2L milestones
    adam_attacker_lr: float  # SVHN recipe: attacker Adam, fixed
    batch_size: int
    seeds: int  # white-box numbers are mean ± std over this many seeds
    n: int | None  # evaluation images (None: the whole validation split)
    train_size: int | None  # training subset for big data sets (None: all)
    attacker_width: float
    autoattack: str  # "autoattack" (standard) or "autoattack-fast" (APGD-CE + APGD-T)
    checks: bool  # run evaluate's sanity checks on the white-box runs
    sweep_steps: tuple[int, ...]  # Figure 3
    sweep_eps: tuple[float, ...]  # Figure 4, as multiples of the data set's eps
    val_robust_n: int
    transfer_seed: int = 1000  # surrogates are trained with another seed (Liu et al.)
    checks_all_seeds: bool = True  # False: seed 0 only (the checks cost several evaluations; the cpu preset saves it)
    subset_small_data: bool = False  # apply train_size to small data sets (digits, fake) too
    label: str = ""  # printed in every title / field
    # Replacements for large data sets (CIFAR, SVHN, MNIST, image folders), e.g. a cheaper model.
    large_data: dict[str, Any] = field(default_factory=dict)
    # The attacker's optimizer in the SGD recipe: "sgd" (the paper: the classifier's lr and
    # schedule) or None (learn2defend's default, Adam 1e-3; see config.ATTACKER_ADAM_LR).
    attacker_optimizer: str | None = None
    frontier_attackers: tuple[str, ...] = ("slim",)  # the L2L attackers on the frontier
    # Width per attacker kind (slim, wide, sdi), where it differs from attacker_width.
    attacker_widths: dict[str, float] = field(default_factory=dict)
    # The frontier only. eps: the l-inf radius (pixels) every run trains and is evaluated at
    # (None: the data set's default); runs at another radius than the default get their own
    # folders and tables. frontier_methods: the row keys (RunSpec.key) to run (empty: all).
    eps: float | None = None
    # The frontier only: the threat model every adversarial run trains and is evaluated under
    # (learn2defend.attacks.threat); runs under another norm than l-inf get their own folders
    # and tables, and methods without a form under it are left out.
    norm: str = "linf"
    frontier_methods: tuple[str, ...] = ()
    from_scratch: bool = False  # adversarial runs start from random weights, not from a plain net
    weight_decay: float | None = None  # None: TrainConfig's default
    amp: str = "off"  # the training step's speed switches (TrainConfig.amp, .channels_last)
    channels_last: bool = False
    # The frontier only: the adversarial runs' --lr-schedule (multistep: the l2l milestones)
    lr_schedule: str = "multistep"

    @property
    def title(self) -> str:
        return f"preset {self.name}" + (f" ({self.label})" if self.label else "")

    def width(self, attacker: str) -> float:
        """The attacker network's width multiplier for `attacker` (slim, wide, sdi)."""
        return self.attacker_widths.get(attacker, self.attacker_width)

    def for_dataset(self, dataset: str) -> Preset:
        """The preset as it applies to `dataset`."""
        return replace(self, **self.large_data, large_data={}) if is_large(dataset) else self


PRESETS: dict[str, Preset] = {
    # Meant for a GPU. The plain net: the paper uses Zagoruyko & Komodakis' recipe (200
    # epochs, lr 0.1 / 5 at 60, 120, 160); we use the common shorter 100-epoch schedule with
    # lr / 10 at 50 and 75, which reaches about the same clean accuracy on CIFAR-10 with a
    # WRN at half the cost (our scheduler has one gamma for every milestone).
    "paper": Preset(
        name="paper", model="wrn-34-4", plain_epochs=100, plain_lr=0.1, plain_milestones=(50, 75),
        epochs=40, l2l_lr=0.1, l2l_milestones=(30,), baseline_lr=0.01, adam_lr=2e-4, adam_attacker_lr=1e-3,
        batch_size=128, seeds=5, n=None, train_size=None, attacker_width=1.0, autoattack="autoattack",
        checks=True, sweep_steps=(1, 2, 5, 10, 20, 50, 100), sweep_eps=(0, 0.5, 1, 1.5, 2, 2.5, 3),
        val_robust_n=1000, label="WRN-34-4, 40 adversarial epochs, 5 seeds", attacker_optimizer="sgd",
    ),
    # Shrunk for a CPU: a small CNN, a few epochs, subsets, 2 seeds, quarter-width attackers.
    "cpu": Preset(
        name="cpu", model="smallcnn", plain_epochs=5, plain_lr=0.05, plain_milestones=(),
        epochs=5, l2l_lr=0.05, l2l_milestones=(4,), baseline_lr=0.01, adam_lr=1e-3, adam_attacker_lr=1e-3,
        batch_size=64, seeds=2, n=500, train_size=5000, attacker_width=0.25, autoattack="autoattack-fast",
        checks=True, sweep_steps=(1, 2, 5, 10, 20, 50), sweep_eps=(0, 0.5, 1, 1.5, 2),
        val_robust_n=0, checks_all_seeds=False,
        label="smallcnn, 5 adversarial epochs, 2 seeds, attacker width 0.25, n<=500, checks on seed 0",
        # 32x32 images cost 16x more per image than 8x8 digits: a 3.7x cheaper CNN, and fewer
        # evaluation images (the sanity checks and AutoAttack's targeted stage dominate the time).
        large_data=dict(model="smallcnn-pooled", n=200, label=(
            "smallcnn-pooled, 5,000 training images, 5 adversarial epochs, 2 seeds, attacker width 0.25, "
            "n=200, checks on seed 0")),
    ),
    # For tests only (not offered by the CLI): one epoch on a handful of images.
    "tiny": Preset(
        name="tiny", model="smallcnn", plain_epochs=1, plain_lr=0.05, plain_milestones=(),
        epochs=1, l2l_lr=0.05, l2l_milestones=(), baseline_lr=0.01, adam_lr=1e-3, adam_attacker_lr=1e-3,
        batch_size=16, seeds=1, n=16, train_size=64, attacker_width=0.25, autoattack="autoattack-fast",
        checks=False, sweep_steps=(0, 1, 2), sweep_eps=(0, 1), val_robust_n=0, label="test size",
        subset_small_data=True,
    ),
}


# val_robust_n that validates on every validation image (train.validate takes the smaller of the two).
EVERY_VALIDATION_IMAGE = 10**9

# The frontier's presets: every method from one plain net per seed (except preset gpu: from
# scratch), the same adversarial epochs, at least 1,000 validation images, validation PGD-10
# every epoch of the adversarial runs (to see catastrophic overfitting: metrics.jsonl's
# "collapsed"), and each attacker kind at the papers' ratio to the classifier's multiply-adds
# per image (learn2defend.bench.forward_macs, one 32x32 or 8x8 image):
# - slim at about 0.35x, as in the paper (slim 0.37 GMAC against WRN-34-4's 1.07);
# - sdi at about 0.14x, as FGSM-SDI (its 0.08 GMAC generator against ResNet-18's 0.56).
# Measured: smallcnn-pooled 10.32 MMAC with slim x0.07 3.46 (0.34x) and sdi x0.11 1.48 (0.14x);
# smallcnn (8x8) 2.38 MMAC with slim x0.18 0.85 (0.36x) and sdi x0.25 0.32 (0.14x);
# preact-resnet18 555 MMAC with sdi x1 81 (0.15x); wrn-34-4 1072 MMAC with sdi x1 81 (0.08x).
FRONTIER_PRESETS: dict[str, Preset] = {
    # wrn-34-4 as the paper's table2; both attackers (slim 0.35x, wide 1.67x the classifier);
    # 3 seeds (not 5: nine runs a seed); standard AutoAttack on the whole validation split.
    "paper": replace(PRESETS["paper"], seeds=3, frontier_attackers=("slim", "wide"), checks_all_seeds=False,
                     label="WRN-34-4, 40 adversarial epochs, 3 seeds, slim, wide and sdi attackers at width 1, "
                           "every validation image, checks on seed 0"),
    # Sized for about two hours on a 2-core CPU with two processes (docs/results.md, "Frontier").
    # Digits: smallcnn, slim attacker at width 0.18, sdi at 0.25; PGD-10 on every validation image.
    "cpu": replace(
        PRESETS["cpu"], attacker_width=0.18, attacker_widths={"sdi": 0.25}, checks=False, n=1000,
        val_robust_n=EVERY_VALIDATION_IMAGE,
        label="smallcnn, 5 adversarial epochs, 2 seeds, slim attacker width 0.18, sdi 0.25, n<=1000",
        large_data=dict(
            model="smallcnn-pooled", train_size=20000, plain_epochs=10, n=1000, attacker_width=0.07,
            attacker_widths={"sdi": 0.11}, val_robust_n=500,
            label="smallcnn-pooled, 20,000 training images, 10 plain + 5 adversarial epochs, 2 seeds, "
                  "slim attacker width 0.07, sdi 0.11, n=1000")),
    # For when a GPU is lent: the fast-AT papers' setting (PreAct-ResNet-18 from scratch on all
    # of CIFAR-10's training images, batch 128, SGD with weight decay 5e-4, bf16, channels
    # last; OneCycle up to lr 0.1, per batch, as the fast-AT benchmark trains every method: Wong
    # et al.'s cyclic shape, learn2defend.train.schedule), sized to
    # finish in about 8 minutes on one H200 with the MAC model (bench.step_macs):
    # - per image and step: FGSM-RS 2.78 GMAC (5.0 forwards of 0.555), N-FGSM 2.78 (5.0),
    #   FGSM-SDI 4.13 (7.4, sdi attacker x1 included), PGD-AT 12.77 (23.0); one epoch of the
    #   45,000 training images (50,000 less the 10 % validation split): 125 + 125 + 186 + 575
    #   = 1,011 TMAC, 40 s at 25 TMAC/s (docs/measurements/doctor-h200.json: wrn-34-4 at batch
    #   128 trains at 27.5-31.0 TMAC/s under bf16; PreAct-ResNet-18, half its size, likely less);
    # - validation per epoch and method, in float32 (13 TMAC/s measured): clean on 5,000 images
    #   (2.8 TMAC) and PGD-10 on 500 (5.8 TMAC): 0.7 s, 2.6 s for the four methods;
    # - AutoAttack-fast on 1,000 images, float32: APGD-CE 100 iterations on ~750 correct images
    #   and APGD-T 9 x 100 on ~450 robust ones, ~960k forward+backward pairs of 2 forwards
    #   (0.53 PMAC): 41 s per method, 164 s for four;
    # - E epochs: 42.6 E + 164 s + ~30 s start-up (data, the MAC counts on the CPU) <= 480 s
    #   gives E <= 6.7. 15 epochs of these four would take ~830 s (15 epochs of PGD-AT alone
    #   345 s of training); TRADES, MART and the PGM net cost PGD-AT's, Grad/2-Step L2L (slim
    #   x1: 7.0 and 11.0 forwards) another 8-12 s per epoch. So: FGSM-RS, N-FGSM, FGSM-SDI and
    #   the PGD-AT reference, 6 epochs, one seed: predicted 422 s (7.0 min).
    "gpu": replace(
        PRESETS["paper"], name="gpu", model="preact-resnet18", epochs=6, l2l_lr=0.1, l2l_milestones=(3, 5),
        weight_decay=5e-4, batch_size=128, seeds=1, n=1000, train_size=None, attacker_width=1.0,
        autoattack="autoattack-fast", checks=False, val_robust_n=500, attacker_optimizer=None,
        frontier_methods=("fgsm-rs", "n-fgsm", "fgsm-sdi-sdi", "pgd-at"), from_scratch=True, amp="bf16",
        channels_last=True, lr_schedule="onecycle",
        label="PreAct-ResNet-18 from scratch, every training image, 6 epochs, bf16, channels last, 1 seed, "
              "FGSM-RS, N-FGSM, FGSM-SDI and PGD-AT, n=1000"),
    "tiny": replace(PRESETS["tiny"], val_robust_n=16),
}
FRONTIER_PRESETS_PUBLIC = ("paper", "cpu", "gpu")


@dataclass(frozen=True)
class RunSpec:
    """One training run: its folder name identifies it."""

    method: str
    seed: int
    attacker: str | None = None  # slim | wide for the paper's L2L methods, sdi for fgsm-sdi
    variant: str = ""  # another recipe of the same method (the frontier's "plain-continued", "fgsm-rs")

    @property
    def key(self) -> str:  # the row key of the paper tables
        return "-".join(part for part in (self.method, self.attacker, self.variant) if part)

    @property
    def is_init(self) -> bool:
        """The plain net every other run of its seed starts from."""
        return self.method == "plain" and not self.variant

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"


def white_box_specs(preset: Preset, attackers: tuple[str, ...] = ("slim", "wide")) -> list[RunSpec]:
    """Every method of Table 2, one per seed; L2L methods once per attacker network."""
    specs = []
    for seed in range(preset.seeds):
        specs += [RunSpec(m, seed) for m in SURROGATES]
        specs += [RunSpec(m, seed, a) for a in attackers for m in PAPER_L2L_METHODS]
    return specs


def is_large(dataset: str) -> bool:
    """CIFAR-sized data sets: the presets train on a subset of them and may use another model."""
    return dataset.split(":", 1)[0] in ("cifar10", "cifar100", "svhn", "mnist", "folder")


def _dataset_tag(dataset: str) -> str:
    """A folder-safe short name; folder data sets get a hash of their path."""
    if dataset.startswith("folder:"):
        path = dataset.split(":", 1)[1]
        return f"folder-{Path(path).name or 'root'}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)


def _scaled(milestones: tuple[int, ...], epochs: int) -> list[int]:
    return [m for m in milestones if 0 < m < epochs]


class Reproduction:
    """Runs, evaluations and caches of one --out folder for one preset."""

    def __init__(self, preset: Preset, out: str | Path, *, device: str = "auto", data_dir: str = "data",
                 download: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.preset, self.out, self.device, self.data_dir, self.download = preset, Path(out), device, data_dir, download
        self.log = log or (lambda s: None)
        self.trained: list[str] = []  # run folders this process trained or resumed (for tests and logs)
        self._waited_for: set[Path] = set()  # run folders found in use by another process (logged once)

    def pgm_step(self, dataset: str) -> float | None:
        """The paper's PGM step, 0.01 on every data set (its 3.1) for training and evaluation: eps/3
        at CIFAR's 0.03, less than that at SVHN's 0.05. Other presets and data sets keep eps/3."""
        return 0.01 if self.preset.name == "paper" and dataset in ("cifar10", "cifar100", "svhn") else None

    # ---- training -------------------------------------------------------------------
    def run_dir(self, dataset: str, recipe: str, spec: RunSpec) -> Path:
        """The run's folder; runs at a preset eps other than the data set's default get their
        own (the plain nets every run starts from do not depend on eps: they are shared)."""
        return self.out / "runs" / f"{_dataset_tag(dataset)}-{recipe}{self.eps_suffix(dataset, spec)}" / spec.name

    def eps_suffix(self, dataset: str, spec: RunSpec | None = None) -> str:
        """"" at the data set's default l-inf eps and for the plain nets (they depend on neither);
        else "-eps<eps>", led by "-<norm>" under another norm than l-inf."""
        eps, norm = self.preset.eps, self.preset.norm
        if spec is not None and spec.is_init:
            return ""
        lead = "" if norm == "linf" else f"-{norm}"
        if eps is None or eps == default_eps(dataset, norm):
            return lead
        return f"{lead}-eps{eps:.6g}"

    def config(self, dataset: str, recipe: str, spec: RunSpec) -> TrainConfig:
        p = self.preset
        common: dict[str, Any] = dict(
            dataset=dataset, data_dir=self.data_dir, download=self.download, model=p.model, seed=spec.seed,
            batch_size=p.batch_size, train_size=p.train_size if is_large(dataset) or p.subset_small_data else None,
            device=self.device,
            val_robust_n=p.val_robust_n, progress=False, out=str(self.run_dir(dataset, recipe, spec)),
        )
        if recipe == "frontier":
            # Plain nets skip validation PGD-10 (nothing to collapse); eps, weight decay and the
            # speed switches of the preset (the plain net every eps shares keeps the defaults).
            if spec.method == "plain":
                common.update(val_robust_n=0)
            if p.weight_decay is not None:
                common.update(weight_decay=p.weight_decay)
            common.update(amp=p.amp, channels_last=p.channels_last)
            if not spec.is_init and p.eps is not None:
                common.update(eps=p.eps)
            if not spec.is_init:
                common.update(norm=p.norm, lr_schedule=p.lr_schedule)
        if spec.is_init:  # the same plain schedule for every recipe: it only starts the others
            return TrainConfig(**common, method="plain", epochs=p.plain_epochs, lr=p.plain_lr,
                               lr_milestones=_scaled(p.plain_milestones, p.plain_epochs))
        init = None if p.from_scratch else str(self.run_dir(dataset, recipe, RunSpec("plain", spec.seed)))
        common.update(method=spec.method, init=init, epochs=p.epochs)
        if spec.attacker:
            common.update(attacker=spec.attacker, attacker_width=p.width(spec.attacker))
        if spec.method == "pgd" and self.pgm_step(dataset) is not None:
            common.update(step_size=self.pgm_step(dataset))
        per_epoch = common.get("lr_schedule", "multistep") == "multistep"  # cosine, onecycle: no milestones
        milestones = _scaled(p.l2l_milestones, p.epochs) if per_epoch else []
        if recipe == "frontier" and spec.method not in ("pgd", *PAPER_L2L_METHODS):
            # The methods the paper has no recipe for train with its L2L schedule (SGD, lr / 10
            # late), the schedule shape of the PGD-AT, TRADES and MART references; FGSM-RS as
            # Wong et al. (adversarial loss only); N-FGSM and FGSM-SDI with their defaults (the
            # sdi attacker with learn2defend's Adam, updated every 5 batches); "2step": the
            # learned start followed by two signed-gradient steps of eps/2, the best learned-start
            # design measured on digits (docs/results.md). The PGM and the paper's L2L nets keep
            # the paper's recipe.
            if spec.variant == "rs":
                common.update(random_start=True, clean_weight=0.0)
            if spec.variant == "2step":
                common.update(pgd_steps=2)
            return TrainConfig(**common, lr=p.l2l_lr, lr_milestones=milestones)
        if recipe == "adam":  # paper 3.3: Adam (0.9, 0.99), wd 1e-4, lr / 10 after 30 of 40; attacker lr fixed
            extra: dict[str, Any] = dict(optimizer="adam", betas=(0.9, 0.99), lr=p.adam_lr, weight_decay=1e-4,
                                         lr_milestones=milestones)
            if spec.attacker:
                extra.update(attacker_optimizer="adam", attacker_lr=p.adam_attacker_lr, attacker_lr_milestones=[])
            return TrainConfig(**common, **extra)
        if spec.method in ("fgsm", "pgd"):  # paper 3.2: fixed step size 0.01; clean weight 0.5 (the default)
            return TrainConfig(**common, lr=p.baseline_lr)
        # L2L, paper 3.2: SGD 0.1 then 0.01 after 30 epochs, the attacker with the same schedule
        # (preset paper); the other presets keep learn2defend's default attacker optimizer.
        return TrainConfig(**common, lr=p.l2l_lr, lr_milestones=milestones, attacker_optimizer=p.attacker_optimizer)

    def ensure(self, dataset: str, recipe: str, spec: RunSpec) -> Path:
        """Train (or resume, or skip when finished) the run and the plain run it starts from;
        a run another process is training (another reproduce on the same --out) is waited for."""
        return self.ensure_all(dataset, recipe, [spec])[0]

    def ensure_all(self, dataset: str, recipe: str, specs: list[RunSpec]) -> list[Path]:
        """ensure() every run, in order, except that runs another process is training are put
        off until the others are done: two reproduce commands on one --out share the training."""
        self.ensure_evaluated(dataset, recipe, specs, None)
        return [self.run_dir(dataset, recipe, spec) for spec in specs]

    def ensure_evaluated(self, dataset: str, recipe: str, specs: list[RunSpec],
                         measure: Callable[[RunSpec, Path], dict[str, Any]] | None) -> list[dict[str, Any]]:
        """ensure_all, with each run measured (`measure(spec, run folder)`, cached by the caller)
        as soon as it is trained, holding the run folder's lock meanwhile: two reproduce commands
        on one --out then share the evaluations as they share the training."""
        results: dict[RunSpec, dict[str, Any]] = {}
        pending = list(dict.fromkeys(specs))
        while pending:
            busy = []
            for spec in pending:
                held = self._try_train(dataset, recipe, spec)
                if held is None and measure is not None:
                    held = self._try_measure(dataset, recipe, spec, measure, results)
                if held is not None:
                    busy.append(spec)
                    if held not in self._waited_for:
                        self.log(f"another process is training or evaluating {held}; coming back to it")
                        self._waited_for.add(held)
            if busy:
                time.sleep(BUSY_WAIT_SECONDS)
            pending = busy
        return [results.get(spec, {}) for spec in specs]

    def _try_measure(self, dataset: str, recipe: str, spec: RunSpec, measure: Callable[[RunSpec, Path], dict[str, Any]],
                     results: dict[RunSpec, dict[str, Any]]) -> Path | None:
        path = self.run_dir(dataset, recipe, spec)
        lock = FolderLock(path)  # train's run-folder lock: one process works on a run at a time
        try:
            lock.acquire()
        except RunFolderBusy:
            return path
        try:
            results[spec] = measure(spec, path)
        finally:
            lock.release()
        return None

    def _try_train(self, dataset: str, recipe: str, spec: RunSpec) -> Path | None:
        """Make sure the run (and its plain run) is trained; the folder another process holds, if any."""
        cfg = self.config(dataset, recipe, spec)
        if cfg.init is not None and not spec.is_init:
            held = self._try_train(dataset, recipe, RunSpec("plain", spec.seed))
            if held is not None:
                return held
        path = Path(cfg.out)
        if _finished(path, cfg.epochs):
            return None
        if path not in self._waited_for:
            self.log(f"training {path}")
        try:
            train(cfg, resume=True)
        except RunFolderBusy:
            return path
        self.trained.append(str(path))
        return None

    # ---- evaluation (cached) --------------------------------------------------------
    def _cache(self, kind: str, paths: list[Path], settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        stamp = {str(p): _epochs_done(p) for p in paths}  # a run trained further invalidates its results
        key = {"kind": kind, "runs": stamp, **settings}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        name = "__".join(p.name for p in paths)
        return self.out / "evals" / paths[0].parent.name / f"{name}__{kind}__{digest}.json", key

    def cached(self, kind: str, paths: list[Path], settings: dict[str, Any],
               compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path, key = self._cache(kind, paths, settings)
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == key:
                    return stored["result"]
            except (OSError, ValueError):
                pass  # a broken cache entry is recomputed
        result = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(path, json.dumps({"key": key, "result": result}, indent=1) + "\n")
        return result

    def white_box(self, path: Path, attacks: list[str], checks: bool, pgm_step: float | None) -> dict[str, Any]:
        settings = {"attacks": attacks, "n": self.preset.n, "checks": checks}
        if pgm_step is not None:
            settings["pgm_step"] = pgm_step

        def compute() -> dict[str, Any]:
            self.log(f"evaluating {path} under {', '.join(attacks)}{' + checks' if checks else ''}")
            return evaluate(EvalConfig(checkpoint=str(path), attacks=attacks, n=self.preset.n, device=self.device,
                                       data_dir=self.data_dir, progress=False, checks=checks, pgm_step=pgm_step))
        return self.cached("white", [path], settings, compute)

    def transfer(self, surrogate: Path, target: Path, attacks: list[str], pgm_step: float | None) -> dict[str, Any]:
        settings: dict[str, Any] = {"attacks": attacks, "n": self.preset.n}
        if pgm_step is not None:
            settings["pgm_step"] = pgm_step

        def compute() -> dict[str, Any]:
            self.log(f"transferring {', '.join(attacks)} from {surrogate} to {target}")
            device = resolve_device(self.device)
            s = load_run(surrogate, device=device, with_attacker=False)
            t = load_run(target, device=device, with_attacker=False)
            check_same_task(s, t, "transfer")
            images = first_n(eval_data(t, None, self.data_dir), "val", self.preset.n)
            counts = transfer_accuracy(s.model, t.model, images, build_attacks(attacks, t.config.eps, 256, pgm_step),
                                       256, device)
            return {"accuracy": {k: v / len(images) for k, v in counts.items()}, "n": len(images),
                    "eps": t.config.eps}
        return self.cached("transfer", [surrogate, target], settings, compute)


def _epochs_done(path: Path) -> int:
    try:
        return sum(1 for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _finished(path: Path, epochs: int) -> bool:
    """A run whose every epoch is in metrics.jsonl and whose checkpoint exists: nothing to do.
    (train(resume=True) would also notice, but only after loading the data set.)"""
    return (path / "last.safetensors").is_file() and (path / "config.json").is_file() and _epochs_done(path) >= epochs


# ---- paper reference data and formatting ----------------------------------------------


def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text())


def _paper_dataset(experiment: str, dataset: str) -> str:
    """Which of the paper's data sets our numbers are put beside: the same one where the
    paper has it, else the experiment's first (labelled as a different data set)."""
    table = paper_results().get(experiment, {})
    return dataset if dataset in table else EXPERIMENT_DATASETS[experiment][0]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(mean: float | None, std: float | None, paper: float | None, seeds: int, paper_known: bool) -> str:
    ours = "n/a" if mean is None else (f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}")
    if not paper_known:
        return ours
    return f"{ours} (paper {'-' if paper is None else f'{paper:.2f}'})"


def _write_outputs(out: Path, stem: str, title: str, header: list[str], lines: list[list[str]],
                   raw: list[dict[str, Any]], meta: dict[str, Any], notes: list[str]) -> dict[str, str]:
    """PREFIX.md (the table), PREFIX.csv (raw rows), PREFIX.json (raw rows + meta)."""
    out.mkdir(parents=True, exist_ok=True)
    md = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in lines]
    md += [""] + [f"- {n}" for n in notes]
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    ckpt.atomic_write_text(paths["md"], "\n".join(md) + "\n")
    columns = list(dict.fromkeys(k for r in raw for k in r))
    ckpt.atomic_write(paths["csv"], csv_text(raw, columns))
    ckpt.atomic_write_text(paths["json"], json.dumps({**meta, "title": title, "rows": raw}, indent=1) + "\n")
    return {k: str(v) for k, v in paths.items()}


# ---- experiments ------------------------------------------------------------------------


def _white_box_table(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Tables 2 and 5: every method, clean / FGSM / PGM10 / CW, plus AutoAttack, worst case, checks."""
    p = r.preset
    recipe = EXPERIMENT_RECIPE.get(experiment, "sgd")
    aa = p.autoattack
    attacks = ["fgsm", "pgm10", "cw", aa]
    specs = white_box_specs(p)
    results: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {}
    for spec, path in zip(specs, r.ensure_all(dataset, recipe, specs), strict=True):
        checks = p.checks and (p.checks_all_seeds or spec.seed == 0)
        results.setdefault(spec.key, []).append((spec, r.white_box(path, attacks, checks, r.pgm_step(dataset))))
    paper_ds = _paper_dataset(experiment, dataset)
    same = paper_ds == dataset
    paper = paper_results()[experiment][paper_ds]
    columns = [*WHITEBOX_COLUMNS, aa, "worst"]
    header = ["method", "clean", "FGSM", "PGM10", "CW", aa.replace("autoattack", "AutoAttack"), "worst", "flagged"]
    lines, raw = [], []
    for key, entries in results.items():
        method, attacker = (key.rsplit("-", 1) if key.endswith(("-slim", "-wide")) else (key, None))
        label = ROW_LABELS[method] + (f" ({attacker[0].upper()})" if attacker else "")
        row = [label]
        for col in columns:
            mean, std = _mean_std([100 * e[1]["accuracy"][col] for e in entries])
            ref = paper[key].get(col) if col in WHITEBOX_COLUMNS else None
            row.append(_cell(mean, std, ref, len(entries), col in WHITEBOX_COLUMNS))
        flags = [e[1].get("flagged") for e in entries]
        flagged = any(bool(f) for f in flags)
        failed = sorted({name for e in entries for name, c in e[1].get("checks", {}).items() if c["passed"] is False})
        row.append(("FLAGGED: " + ", ".join(failed)) if flagged else ("ok" if p.checks else "not checked"))
        lines.append(row)
        for spec, res in entries:
            raw.append({"experiment": experiment, "preset": p.name, "dataset": dataset, "method": spec.method,
                        "attacker": spec.attacker or "", "seed": spec.seed, "n": res["n"], "eps": res["eps"],
                        **{f"acc_{c}": res["accuracy"].get(c) for c in columns},
                        "flagged": res.get("flagged"), "run": str(r.run_dir(dataset, recipe, spec)),
                        **{f"paper_{c}": paper[key].get(c) for c in WHITEBOX_COLUMNS}})
    eps = raw[0]["eps"]
    title = (f"{experiment}: white-box accuracy (%) on {dataset}, eps {eps:g}, {p.title}, "
             f"n={raw[0]['n']} validation images, mean ± std over {p.seeds} seed(s); "
             f"paper: {paper_ds}{'' if same else ' (a different data set: compare trends only)'}")
    notes = [f"{aa}: beyond the paper ({'APGD-CE + APGD-T only' if aa.endswith('fast') else 'standard version'}); "
             "worst: images that survive every attack of the row, the number to quote.",
             f"flagged: evaluate's sanity checks for gradient masking (learn2defend.checks) failed on "
             f"{'some seed' if p.checks_all_seeds else 'seed 0 (the only seed checked at this preset)'}; "
             "the row's robust accuracies then likely overestimate robustness.",
             f"PGM10: the paper's PGD (10 steps of {r.pgm_step(dataset) or 'eps/3'}, zero start); "
             "CW: the paper's CW-linf (100 iterations)."]
    files = _write_outputs(r.out / experiment, f"{experiment}-{_dataset_tag(dataset)}", title, header, lines, raw,
                           {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset,
                            "paper_dataset": paper_ds}, notes)
    return {"title": title, "files": files, "rows": raw}


def _black_box_table(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Tables 3, 6, 7: targets (seed 0) x surrogates trained with another seed x {FGSM, PGM10}."""
    p = r.preset
    recipe = EXPERIMENT_RECIPE.get(experiment, "sgd")
    attacker = BLACKBOX_ATTACKER[experiment]
    targets = [RunSpec(m, 0) for m in SURROGATES] + [RunSpec(m, 0, attacker) for m in PAPER_L2L_METHODS]
    surrogate_specs = [RunSpec(m, p.transfer_seed) for m in SURROGATES]
    trained = r.ensure_all(dataset, recipe, surrogate_specs + targets)
    surrogates = dict(zip(SURROGATES, trained[: len(SURROGATES)], strict=True))
    paper_ds = _paper_dataset(experiment, dataset)
    paper = paper_results()[experiment][paper_ds]
    header = ["target"] + [f"{ROW_LABELS[s]} → {a.upper()}" for s in SURROGATES for a in BLACKBOX_ATTACKS]
    lines, raw = [], []
    for spec in targets:
        path = r.run_dir(dataset, recipe, spec)
        row = [ROW_LABELS[spec.method] + (f" ({attacker[0].upper()})" if spec.attacker else "")]
        for s in SURROGATES:
            res = r.transfer(surrogates[s], path, list(BLACKBOX_ATTACKS), r.pgm_step(dataset))
            for a in BLACKBOX_ATTACKS:
                ref = paper[spec.method][f"{s}/{a}"]
                acc = res["accuracy"][a]
                row.append(_cell(100 * acc, None, ref, 1, True))
                raw.append({"experiment": experiment, "preset": p.name, "dataset": dataset, "target": spec.method,
                            "attacker": spec.attacker or "", "surrogate": s, "attack": a, "accuracy": acc,
                            "target_clean": res["accuracy"]["clean"], "n": res["n"], "eps": res["eps"],
                            "paper": ref})
        lines.append(row)
    title = (f"{experiment}: black-box (transfer) accuracy (%) on {dataset}, eps {raw[0]['eps']:g}, {p.title}, "
             f"n={raw[0]['n']}; surrogates trained with seed {p.transfer_seed}, targets seed 0, "
             f"{attacker} attackers; paper: {paper_ds}"
             f"{'' if paper_ds == dataset else ' (a different data set: compare trends only)'}")
    notes = ["Each cell: the target's accuracy on adversarial images computed on the surrogate (Liu et al. 2016)."]
    files = _write_outputs(r.out / experiment, f"{experiment}-{_dataset_tag(dataset)}", title, header, lines, raw,
                           {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset,
                            "paper_dataset": paper_ds}, notes)
    return {"title": title, "files": files, "rows": raw}


def _timing_table(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Table 4: seconds per training epoch of every method, from the runs' metrics.jsonl."""
    p = r.preset
    paper_ds = _paper_dataset(experiment, dataset)
    paper = paper_results()["table4"][paper_ds]
    by_key: dict[str, list[float]] = {}
    specs = white_box_specs(p)
    for spec, path in zip(specs, r.ensure_all(dataset, "sgd", specs), strict=True):
        by_key.setdefault(spec.key, []).extend(
            json.loads(line)["seconds"] for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip())
    lines, raw = [], []
    plain_mean = statistics.fmean(by_key["plain"])
    for key, secs in by_key.items():
        mean, std = _mean_std(secs)
        method, attacker = (key.rsplit("-", 1) if key.endswith(("-slim", "-wide")) else (key, None))
        label = ROW_LABELS[method] + (f" ({attacker[0].upper()})" if attacker else "")
        ratio, paper_ratio = mean / plain_mean, paper[key] / paper["plain"]
        lines.append([label, f"{mean:.2f} ± {std:.2f} (paper {paper[key]:.2f})",
                      f"{ratio:.2f} (paper {paper_ratio:.2f})"])
        raw.append({"experiment": experiment, "preset": p.name, "dataset": dataset, "method": method,
                    "attacker": attacker or "", "seconds_mean": mean, "seconds_std": std, "epochs": len(secs),
                    "ratio_to_plain": ratio, "paper_seconds": paper[key], "paper_ratio_to_plain": paper_ratio})
    title = (f"table4: seconds per training epoch on {dataset}, {p.title} (device {r.device}); paper: CIFAR-10, "
             "WRN on one GPU - only the ratios to the plain net are comparable")
    notes = ["Mean ± std over every epoch of every seed. The plain net's epochs start from scratch; the adversarial "
             "runs' from the plain net. Measured on a shared machine: noisy."]
    files = _write_outputs(r.out / experiment, f"{experiment}-{_dataset_tag(dataset)}", title,
                           ["method", "s / epoch", "÷ plain"], lines, raw,
                           {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset},
                           notes)
    return {"title": title, "files": files, "rows": raw}


def _figure(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Figures 3 and 4 (figures.sweep over the seed-0 runs), Figure 5 (figures.show)."""
    from .figures import ShowConfig, SweepConfig, plot_sweep, show, sweep

    p = r.preset
    out = r.out / experiment
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{experiment}-{_dataset_tag(dataset)}"
    eps = default_eps(dataset)
    title = f"{experiment} on {dataset} - {p.title}"
    if experiment == "fig5":  # the paper shows FGSM Net, PGM Net, Grad L2L
        files = {}
        for spec in (RunSpec("fgsm", 0), RunSpec("pgd", 0), RunSpec("grad-l2l", 0, "slim")):
            path = r.ensure(dataset, "sgd", spec)
            png = out / f"{stem}-{spec.name}.png"
            show(ShowConfig(checkpoint=str(path), out=str(png), attacks=["fgsm", "pgm10"], n=6, device=r.device,
                            data_dir=r.data_dir, title=f"{title} - {spec.name}"))
            files[spec.name] = str(png)
        return {"title": f"fig5 on {dataset}, {p.title}", "files": files}
    specs = [RunSpec("plain", 0), RunSpec("fgsm", 0), RunSpec("pgd", 0), RunSpec("grad-l2l", 0, "slim"),
             RunSpec("grad-l2l", 0, "wide")]
    if experiment == "fig4":  # the difference panel is against the first run: PGM Net, as in the paper
        specs = [specs[2], specs[0], specs[1], specs[3], specs[4]]
    paths = [str(path) for path in r.ensure_all(dataset, "sgd", specs)]
    if experiment == "fig3":
        config = SweepConfig(checkpoints=paths, over="pgd-steps", values=[float(v) for v in p.sweep_steps],
                             out=str(out / stem), n=p.n, device=r.device, data_dir=r.data_dir, progress=False)
    else:
        config = SweepConfig(checkpoints=paths, over="eps", values=[round(f * eps, 6) for f in p.sweep_eps],
                             out=str(out / stem), n=p.n, device=r.device, data_dir=r.data_dir, progress=False)
    key = {"values": config.values, "n": p.n}
    result = r.cached(experiment, [Path(x) for x in paths], key, lambda: sweep(config))
    # Drawn again from the numbers every time (cheap): the picture always carries this preset's title.
    plot_sweep(result["rows"], result["over"], result["attacks"], Path(result["png"]), result["eps"], title)
    return {"title": f"{experiment} on {dataset}, {p.title}", "files": {"csv": result["csv"], "png": result["png"]},
            "rows": result["rows"]}


# ---- the frontier: robustness against training cost ---------------------------------------

FRONTIER_LABELS = {"plain-continued": "Plain Net (continued)", "fgsm-rs": "FGSM-RS", "n-fgsm": "N-FGSM",
                   "pgd": "PGM Net (paper)", "pgd-at": "PGD-AT", "trades": "TRADES", "mart": "MART",
                   "fgsm-sdi-sdi": "FGSM-SDI", "fgsm-sdi-sdi-2step": "FGSM-SDI, 2 steps"}


def frontier_specs(preset: Preset) -> list[RunSpec]:
    """Every method of the frontier (those of `preset.frontier_methods`, if it names any), seed by
    seed: each starts from its seed's plain net, or from scratch (`preset.from_scratch`)."""
    specs = []
    for seed in range(preset.seeds):
        specs += [RunSpec("plain", seed, variant="continued"), RunSpec("fgsm", seed, variant="rs"),
                  RunSpec("n-fgsm", seed), RunSpec("pgd", seed), RunSpec("pgd-at", seed), RunSpec("trades", seed),
                  RunSpec("mart", seed)]
        specs += [RunSpec(m, seed, a) for a in preset.frontier_attackers for m in ("grad-l2l", "2step-l2l")]
        specs += [RunSpec("fgsm-sdi", seed, "sdi"), RunSpec("fgsm-sdi", seed, "sdi", "2step")]
    return [s for s in specs if (not preset.frontier_methods or s.key in preset.frontier_methods)
            and preset.norm not in METHOD_RECORDS[s.method].unsupported_norms]


def _label(key: str) -> str:
    if key in FRONTIER_LABELS:
        return FRONTIER_LABELS[key]
    method, attacker = key.rsplit("-", 1)
    return f"{ROW_LABELS[method]} ({attacker[0].upper()})"


def _history(path: Path) -> list[dict[str, Any]]:
    """The run's epoch records (metrics.jsonl)."""
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _training_seconds(path: Path) -> float:
    return sum(record["seconds"] for record in _history(path))


def _collapse(history: list[dict[str, Any]]) -> tuple[bool | None, int | None]:
    """(whether any epoch record says "collapsed": true, the first such epoch); (None, None)
    when no record has validation PGD-10 accuracy (collapse was not measured)."""
    if not any("val_pgd10_acc" in record for record in history):
        return None, None
    epochs = [record.get("epoch", i + 1) for i, record in enumerate(history) if record.get("collapsed")]
    return bool(epochs), (epochs[0] if epochs else None)


def _collapse_cell(flags: list[bool | None]) -> str:
    """The table's collapsed column: yes / no over the seeds, 'not measured' without PGD-10 records."""
    measured = [f for f in flags if f is not None]
    if not measured:
        return "not measured"
    hits = sum(measured)
    if not hits:
        return "no"
    return "yes" if len(flags) == 1 else f"yes ({hits}/{len(flags)} seeds)"


def _robust_curve(histories: list[list[dict[str, Any]]]) -> list[tuple[int, float]]:
    """Validation PGD-10 accuracy (%) per epoch, mean over the runs that recorded it that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for history in histories:
        for i, record in enumerate(history):
            if "val_pgd10_acc" in record:
                by_epoch.setdefault(record.get("epoch", i + 1), []).append(100 * record["val_pgd10_acc"])
    return [(epoch, statistics.fmean(values)) for epoch, values in sorted(by_epoch.items())]


def _frontier(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Clean, AutoAttack and worst-case accuracy of every method against its measured training
    seconds and its multiply-adds per step; each run is evaluated as soon as it is trained."""
    p = r.preset
    aa = p.autoattack
    specs = frontier_specs(p)

    def measure(spec: RunSpec, path: Path) -> dict[str, Any]:
        checks = p.checks and (p.checks_all_seeds or spec.seed == 0)
        result = r.white_box(path, ["pgd10", aa], checks, None)
        return {**result, **r.cached("macs", [path], {}, lambda: _frontier_macs(path)),
                "seconds": _training_seconds(path)}

    measured = r.ensure_evaluated(dataset, "frontier", specs, measure)
    init_seconds = [0.0 if p.from_scratch else _training_seconds(r.run_dir(dataset, "frontier", RunSpec("plain", s)))
                    for s in range(p.seeds)]
    header = ["method", "clean", aa.replace("autoattack", "AutoAttack"), "worst", "training s", "GMAC / step",
              "collapsed", "flagged"]
    lines, raw, points, curves = _frontier_rows(r, experiment, dataset, specs, measured, init_seconds)
    l2l = [row for row in raw if row["attacker_macs"]]
    ratios = sorted({f"{row['attacker']} {row['attacker_macs'] / row['classifier_macs']:.2f}x" for row in l2l})
    title = (f"frontier: accuracy (%) against training cost on {dataset}, {threat_model(p.norm).label} eps "
             f"{raw[0]['eps']:g}, {p.title}, "
             f"n={raw[0]['n']} validation images, mean ± std over {p.seeds} seed(s)")
    notes = _frontier_notes(p, r.config(dataset, "frontier", specs[0]).batch_size, init_seconds, ratios)
    out = r.out / experiment
    stem = f"{experiment}-{_dataset_tag(dataset)}{r.eps_suffix(dataset)}"
    files = _write_outputs(out, stem, title, header, lines, raw,
                           {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset,
                            "points": points, "curves": curves, "attacker_ratio": ratios}, notes)
    files["png"] = str(_plot_frontier(points, out / f"{stem}.png", aa, title))
    per_epoch = title.replace("accuracy (%) against training cost", "validation PGD-10 accuracy (%) per epoch")
    files["epochs_png"] = str(_plot_robust_curves(curves, out / f"{stem}-val-pgd10.png", per_epoch))
    return {"title": title, "files": files, "rows": raw}


def _frontier_macs(path: Path) -> dict[str, Any]:
    """Multiply-adds of a run's training step, of its classifier's forward and (L2L) its attacker's."""
    from .bench import forward_macs, step_macs

    run = load_run(path, with_attacker=False)
    c, h, w = run.meta["image_shape"]
    # Counted on the CPU in float32: the speed switches change the time, not the work.
    plain_math = replace(run.config, speed=replace(run.config.speed, amp="off", channels_last=False, compile=False))
    macs = {"step_macs": step_macs(plain_math, run.meta), "classifier_macs": forward_macs(
        run.model, torch.rand(1, c, h, w))}
    if run.config.attacker is not None:
        attacker = build_attacker(run.config, run.meta)
        a = torch.rand(1, attacker_in_channels(run.config.method, c), h, w)
        macs["attacker_macs"] = forward_macs(attacker, a, run.config.eps)
    return macs


def _frontier_rows(r: Reproduction, experiment: str, dataset: str, specs: list[RunSpec],
                   measured: list[dict[str, Any]], init_seconds: list[float]) -> tuple[list, list, list, list]:
    """The frontier's table lines (one per method), raw rows (one per run), plotted points and
    validation curves."""
    p = r.preset
    aa = p.autoattack
    by_key: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {}
    histories: dict[str, list[list[dict[str, Any]]]] = {}
    for spec, res in zip(specs, measured, strict=True):
        by_key.setdefault(spec.key, []).append((spec, res))
        histories.setdefault(spec.key, []).append(_history(r.run_dir(dataset, "frontier", spec)))
    lines, raw, points, curves = [], [], [], []
    for key, entries in by_key.items():
        collapses = [_collapse(h) for h in histories[key]]
        row = [_label(key)]
        stats = {}
        for col in ("clean", aa, "worst"):
            stats[col] = _mean_std([100 * e[1]["accuracy"][col] for e in entries])
            row.append(_cell(*stats[col], None, len(entries), False))
        stats["seconds"] = _mean_std([e[1]["seconds"] for e in entries])
        row.append(_cell(*stats["seconds"], None, len(entries), False))
        row.append(f"{entries[0][1]['step_macs'] / 1e9:.2f}")
        row.append(_collapse_cell([c[0] for c in collapses]))
        flagged = any(bool(e[1].get("flagged")) for e in entries)
        row.append("FLAGGED" if flagged else ("ok" if any("checks" in e[1] for e in entries) else "not checked"))
        lines.append(row)
        points.append({"label": _label(key), "key": key, "seconds": stats["seconds"], "autoattack": stats[aa]})
        curve = _robust_curve(histories[key])
        if curve:
            curves.append({"label": _label(key), "key": key, "val_pgd10": curve})
        for (spec, res), (collapsed, collapsed_epoch) in zip(entries, collapses, strict=True):
            raw.append({"experiment": experiment, "preset": p.name, "dataset": dataset, "method": spec.method,
                        "attacker": spec.attacker or "", "variant": spec.variant, "seed": spec.seed, "n": res["n"],
                        "eps": res["eps"],
                        **{f"acc_{c}": res["accuracy"].get(c) for c in ("clean", "pgd10", aa, "worst")},
                        "training_seconds": res["seconds"], "init_seconds": init_seconds[spec.seed],
                        "step_macs": res["step_macs"], "classifier_macs": res["classifier_macs"],
                        "attacker_macs": res.get("attacker_macs"), "collapsed": collapsed,
                        "collapsed_epoch": collapsed_epoch, "flagged": res.get("flagged"),
                        "run": str(r.run_dir(dataset, "frontier", spec))})
    return lines, raw, points, curves


def _frontier_notes(p: Preset, batch: int, init_seconds: list[float], ratios: list[str]) -> list[str]:
    """The notes under the frontier's table: what each column measures, and the recipes."""
    aa = p.autoattack
    start = ("from scratch" if p.from_scratch else
             f"on top of the shared plain net's {statistics.fmean(init_seconds):.0f} s")
    return [f"training s: measured seconds of the {p.epochs} adversarial epochs (metrics.jsonl), {start}; "
            "measured as the runs ran (two processes on a shared machine add noise).",
            f"GMAC / step: multiply-adds of one training step of {batch} images, attack, forwards, backwards and "
            "attacker included (torch.utils.flop_counter's formulas).",
            "attacker cost per image, against the classifier's forward: " + (", ".join(ratios) or "no L2L run"),
            f"worst: images that survive both pgd10 and {aa}.",
            "collapsed: catastrophic overfitting, an epoch whose validation PGD-10 accuracy (first "
            f"{p.val_robust_n if p.val_robust_n < EVERY_VALIDATION_IMAGE else 'all'} validation images) collapsed "
            "while clean accuracy rose (learn2defend.train.collapsed); the evaluated weights are the last epoch's. "
            "'not measured': no validation PGD-10 in the run's metrics.jsonl.",
            "recipes: PGM Net and L2L as the paper (table2); Plain Net (continued), FGSM-RS (random start, "
            "step 1.25 eps, adversarial loss only), N-FGSM (noise 2 eps, step eps), FGSM-SDI (sdi attacker, "
            "updated every 20 batches), PGD-AT, TRADES (beta 6) and MART (beta 5) with the L2L lr schedule; "
            + ("every run starts from random weights." if p.from_scratch else
               "every run starts from its seed's plain net.")
            + " No label smoothing or weight averaging for any method."]


def _plot_frontier(points: list[dict[str, Any]], path: Path, attack: str, title: str) -> Path:
    """AutoAttack accuracy against training seconds, one point per method, ± one std both ways."""
    from matplotlib.figure import Figure

    from .figures import _suptitle

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for pt in points:
        (x, xerr), (y, yerr) = pt["seconds"], pt["autoattack"]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=pt["label"])
    ax.set_xlabel("training seconds (adversarial epochs)")
    ax.set_ylabel(f"{attack} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _suptitle(fig, title, 7)
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def _plot_robust_curves(curves: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Validation PGD-10 accuracy (%) per training epoch, one line per method (mean over seeds):
    a collapse (catastrophic overfitting) shows as a sudden drop."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .figures import _suptitle

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for c in curves:
        epochs, values = zip(*c["val_pgd10"], strict=True)
        ax.plot(epochs, values, marker="o", label=c["label"])
    if not curves:
        ax.text(0.5, 0.5, "no run recorded validation PGD-10", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PGD-10 accuracy (%)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    _suptitle(fig, title, 7)
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


RUNNERS: dict[str, Callable[[Reproduction, str, str], dict[str, Any]]] = {
    "table2": _white_box_table, "table5": _white_box_table, "table3": _black_box_table,
    "table6": _black_box_table, "table7": _black_box_table, "table4": _timing_table,
    "fig3": _figure, "fig4": _figure, "fig5": _figure, "frontier": _frontier,
}


def reproduce(experiment: str, preset: str | Preset, out: str | Path, *, datasets: list[str] | None = None,
              device: str = "auto", data_dir: str = "data", download: bool = False,
              log: Callable[[str], None] | None = None, eps: float | None = None,
              norm: str | None = None) -> dict[str, Any]:
    """Run one experiment (or "all") of the paper; returns what was written, per data set.

    `eps` (the frontier only): the l-inf radius in pixel units, in [0, 1], every frontier run
    trains and is evaluated at (default: the data set's); at another radius than the default,
    runs and tables go to their own folders and file names, beside those of the default.
    `norm` (the frontier only): "linf" (default) or "l2"; under l2 eps is an l2 radius
    (default: the data set's l2 default, 0.5 on CIFAR-10), runs go to their own folders, and
    methods without an l2 form (N-FGSM) are left out."""
    names = list(EXPERIMENTS) if experiment == "all" else [experiment]
    if experiment != "all" and experiment not in (*EXPERIMENTS, *EXTRA_EXPERIMENTS):
        raise UserError(f"unknown experiment '{experiment}'; choose one of: "
                        f"{', '.join((*EXPERIMENTS, *EXTRA_EXPERIMENTS))}, all")
    if isinstance(preset, str):
        table, public = ((FRONTIER_PRESETS, FRONTIER_PRESETS_PUBLIC) if experiment == "frontier"
                         else (PRESETS, PRESETS_PUBLIC))
        if preset not in table:
            only = " (gpu: the frontier only)" if preset in FRONTIER_PRESETS else ""
            raise UserError(f"unknown preset '{preset}' for {experiment}{only}; choose one of: {', '.join(public)}")
        preset = table[preset]
    if norm is not None:
        if experiment != "frontier":
            raise UserError(f"--norm applies to the frontier only, not to {experiment} (the paper's is l-inf)")
        preset = replace(preset, norm=threat_model(norm).name)
    if eps is not None:
        if experiment != "frontier":
            raise UserError(f"--eps applies to the frontier only, not to {experiment} (the paper's eps is fixed)")
        threat = threat_model(preset.norm)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 <= eps <= threat.eps_max):
            raise UserError(f"--eps must lie in [0, {threat.eps_max:g}] (pixel units, {threat.label}), got {eps}")
        preset = replace(preset, eps=float(eps))
    if datasets is not None:
        for d in datasets:
            TrainConfig(dataset=d).validate()  # cheap checks only; the data set itself loads at training
    ckpt.check_writable(out, folder=True)  # before any run trains into it
    report: dict[str, Any] = {"preset": preset.name, "preset_title": preset.title, "out": str(out), "experiments": {},
                              "trained": []}
    for name in names:
        for dataset in datasets or EXPERIMENT_DATASETS[name]:
            r = Reproduction(preset.for_dataset(dataset), out, device=device, data_dir=data_dir, download=download,
                             log=log)
            started = time.perf_counter()
            result = RUNNERS[name](r, name, dataset)
            result["seconds"] = time.perf_counter() - started
            report["experiments"].setdefault(name, {})[dataset] = result
            report["trained"] += r.trained
    return report


# ---- training curves --------------------------------------------------------------------


def curve_labels(run_dirs: list[str]) -> dict[Path, str]:
    """{resolved run folder: legend label}, one per distinct folder in the given order; a label is
    the folder's shortest trailing part of its path that no other folder shares (runs/p, other/p)."""
    paths = list(dict.fromkeys(Path(d).resolve() for d in run_dirs))
    labels = {}
    for path in paths:
        for k in range(1, len(path.parts) + 1):
            tail = path.parts[-k:]
            if all(other.parts[-k:] != tail for other in paths if other != path):
                break
        labels[path] = "/".join(tail) if tail[0] != path.anchor else str(path)
    return labels


@dataclass
class PlotConfig:
    """What `learn2defend plot` draws: the training curves of these run folders, into one PNG."""

    runs: list[str] = option(positional=True, nargs="+", metavar="DIR", help="run folders (their metrics.jsonl)")
    out: str = option(help="PNG file to write")


def plot_curves(run_dirs: list[str], out: str) -> str:
    """Loss and accuracy per epoch (and attack_success for L2L runs) from metrics.jsonl, one curve per
    run folder (folders with the same name are told apart by their paths)."""
    ckpt.check_writable(out)  # before reading anything
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {}
    for folder, label in curve_labels(run_dirs).items():
        path = folder / "metrics.jsonl"
        try:
            histories[label] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    keys = ["train_loss", "train_acc", "attack_success"]
    panels = [k for k in keys if any(k in rec for h in histories.values() for rec in h)]
    val = [k for k in ("val_clean_acc", "val_pgd10_acc") if any(k in rec for h in histories.values() for rec in h)]
    panels += val
    if not panels:
        raise UserError("the metrics.jsonl files hold no loss or accuracy to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for label, hist in histories.items():
            pts = [(rec.get("epoch", i + 1), rec[key]) for i, rec in enumerate(hist) if key in rec]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        title, ylabel = CURVE_LABELS.get(key, (key, key))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = Path(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write(target, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return str(target)


# The panels of `plot`: metrics.jsonl key -> (title, y axis label).
CURVE_LABELS = {
    "train_loss": ("training loss", "loss (mean per image)"),
    "train_acc": ("training accuracy", "accuracy on the training batches"),
    "attack_success": ("attack success (training)", "share of training images fooled"),
    "val_clean_acc": ("validation clean accuracy", "accuracy"),
    "val_pgd10_acc": ("validation PGD-10 accuracy", "accuracy under PGD-10"),
}


def summary(report: dict[str, Any]) -> str:
    """The markdown of every table written, for printing."""
    parts = []
    for per_ds in report["experiments"].values():
        for res in per_ds.values():
            md = res["files"].get("md")
            parts.append(Path(md).read_text() if md else f"### {res['title']}\n" + "\n".join(
                f"- {k}: {v}" for k, v in res["files"].items()))
            parts.append(f"({res['seconds']:.0f} s)\n")
    return "\n".join(parts)


__all__ = ["PRESETS", "FRONTIER_PRESETS", "FRONTIER_PRESETS_PUBLIC", "EXPERIMENTS", "EXTRA_EXPERIMENTS", "Preset",
           "RunSpec", "Reproduction", "reproduce", "plot_curves", "paper_results", "summary"]
