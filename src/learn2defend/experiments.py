"""What every experiment of `learn2defend reproduce` shares: the presets (`Preset`, `PRESETS`),
the runs (`RunSpec`), one --out folder's run folders, training and cached evaluations
(`Reproduction`), and the writer of its tables (`write_outputs`).

The run folder of a configuration depends only on the data set, the training recipe (SGD for
CIFAR as in the paper's 3.2; Adam for SVHN as in its 3.3; "frontier"), the method, the
attacker and the seed; the frontier's also on its eps and norm when they are not the data
set's default (its plain nets excepted: they depend on neither). The paper's tables are in
`learn2defend.reproduce`, the frontier in `learn2defend.frontier`.
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

from . import checkpoint as ckpt
from .config import TrainConfig, default_eps
from .evaluate import (
    EvalConfig,
    build_attacks,
    check_same_task,
    eval_data,
    evaluate,
    first_n,
    load_attacked,
    transfer_accuracy,
)
from .figures import csv_text
from .runs import FolderLock, RunFolderBusy, resolve_device
from .train import train

BUSY_WAIT_SECONDS = 20  # a run folder another reproduce is training: look again after this long
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
    channels_last: bool | None = None  # None: the device's default (learn2defend.speed.DEVICE_DEFAULTS)
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


def is_large(dataset: str) -> bool:
    """CIFAR-sized data sets: the presets train on a subset of them and may use another model."""
    return dataset.split(":", 1)[0] in ("cifar10", "cifar100", "svhn", "mnist", "folder")


def dataset_tag(dataset: str) -> str:
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
        return self.out / "runs" / f"{dataset_tag(dataset)}-{recipe}{self.eps_suffix(dataset, spec)}" / spec.name

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
            # Wong et al. (adversarial loss only); N-FGSM, FGSM-SDI, FGSM-PGI and LIET with their defaults (the
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
            # From scratch the frontier's one learning rate and schedule: 0.01 is a fine-tuning
            # rate, and from scratch the PGM net keeps 5 % on digits with it (docs/results.md).
            if recipe == "frontier" and p.from_scratch:
                return TrainConfig(**common, lr=p.l2l_lr, lr_milestones=milestones)
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
        started = time.perf_counter()
        try:
            train(cfg, resume=True)
        except RunFolderBusy:
            return path
        self.trained.append(str(path))
        self.log(f"trained {path.name}: {time.perf_counter() - started:.0f} s, validation and saving included")
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
        started = time.perf_counter()
        result = compute()
        seconds = round(time.perf_counter() - started, 1)  # wall clock, for where a reproduction's time goes
        self.log(f"{kind} measurement of {', '.join(p.name for p in paths)}: {seconds:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(path, json.dumps({"key": key, "result": result, "seconds": seconds}, indent=1) + "\n")
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
            s = load_attacked(surrogate, "last", device)
            t = load_attacked(target, "last", device)
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



def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(mean: float | None, std: float | None, paper: float | None, seeds: int, paper_known: bool) -> str:
    ours = "n/a" if mean is None else (f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}")
    if not paper_known:
        return ours
    return f"{ours} (paper {'-' if paper is None else f'{paper:.2f}'})"


def write_outputs(out: Path, stem: str, title: str, header: list[str], lines: list[list[str]],
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
