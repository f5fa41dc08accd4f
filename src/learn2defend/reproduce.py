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
method, the attacker and the seed.
"""

from __future__ import annotations

import csv
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
from .config import TrainConfig, default_eps
from .errors import UserError
from .evaluate import EvalConfig, build_attacks, check_same_task, eval_data, evaluate, first_n, transfer_accuracy
from .methods import attacker_in_channels
from .runs import FolderLock, RunFolderBusy, build_attacker, load_run, resolve_device
from .train import train

EXPERIMENTS = ("table2", "table3", "table4", "table5", "table6", "table7", "fig3", "fig4", "fig5")
# Beyond the paper (not part of "all"): AutoAttack accuracy against training cost, per method.
EXTRA_EXPERIMENTS = ("frontier",)
# The paper's learned attackers: the rows of its tables (fgsm-sdi is not the paper's).
PAPER_L2L = ("naive-l2l", "grad-l2l", "2step-l2l")
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

    @property
    def title(self) -> str:
        return f"preset {self.name}" + (f" ({self.label})" if self.label else "")

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


# The frontier's presets: every method from one plain net per seed, the same adversarial epochs,
# at least 1,000 validation images, and the slim attacker at about 0.35x the classifier's
# multiply-adds, as in the paper (slim 0.37 GMAC against WRN-34-4's 1.07 per 32x32 image).
FRONTIER_PRESETS: dict[str, Preset] = {
    # wrn-34-4 as the paper's table2; both attackers (slim 0.35x, wide 1.67x the classifier);
    # 3 seeds (not 5: nine runs a seed); standard AutoAttack on the whole validation split.
    "paper": replace(PRESETS["paper"], seeds=3, frontier_attackers=("slim", "wide"), checks_all_seeds=False,
                     label="WRN-34-4, 40 adversarial epochs, 3 seeds, slim and wide attackers at width 1, "
                           "every validation image, checks on seed 0"),
    # Sized for about two hours on a 2-core CPU with two processes (docs/results.md, "Frontier").
    # Digits: smallcnn with the slim attacker at width 0.18 (0.36x its multiply-adds).
    "cpu": replace(
        PRESETS["cpu"], attacker_width=0.18, checks=False, n=1000,
        label="smallcnn, 5 adversarial epochs, 2 seeds, slim attacker width 0.18, n<=1000",
        large_data=dict(
            model="smallcnn-pooled", train_size=20000, plain_epochs=10, n=1000, attacker_width=0.07,
            label="smallcnn-pooled, 20,000 training images, 10 plain + 5 adversarial epochs, 2 seeds, "
                  "slim attacker width 0.07, n=1000")),
    "tiny": PRESETS["tiny"],
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: its folder name identifies it."""

    method: str
    seed: int
    attacker: str | None = None  # slim | wide for L2L methods
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
        specs += [RunSpec(m, seed, a) for a in attackers for m in PAPER_L2L]
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
        return self.out / "runs" / f"{_dataset_tag(dataset)}-{recipe}" / spec.name

    def config(self, dataset: str, recipe: str, spec: RunSpec) -> TrainConfig:
        p = self.preset
        common: dict[str, Any] = dict(
            dataset=dataset, data_dir=self.data_dir, download=self.download, model=p.model, seed=spec.seed,
            batch_size=p.batch_size, train_size=p.train_size if is_large(dataset) or p.subset_small_data else None,
            device=self.device,
            val_robust_n=p.val_robust_n, progress=False, out=str(self.run_dir(dataset, recipe, spec)),
        )
        if spec.is_init:  # the same plain schedule for every recipe: it only starts the others
            return TrainConfig(**common, method="plain", epochs=p.plain_epochs, lr=p.plain_lr,
                               lr_milestones=_scaled(p.plain_milestones, p.plain_epochs))
        init = str(self.run_dir(dataset, recipe, RunSpec("plain", spec.seed)))
        common.update(method=spec.method, init=init, epochs=p.epochs)
        if spec.attacker:
            common.update(attacker=spec.attacker, attacker_width=p.attacker_width)
        if spec.method == "pgd" and self.pgm_step(dataset) is not None:
            common.update(step_size=self.pgm_step(dataset))
        milestones = _scaled(p.l2l_milestones, p.epochs)
        if recipe == "frontier" and spec.method not in ("pgd", *PAPER_L2L):
            # The methods the paper has no recipe for train with its L2L schedule (SGD, lr / 10
            # late), the schedule shape of the PGD-AT, TRADES and MART references; FGSM-RS as
            # Wong et al. (adversarial loss only). The PGM and L2L nets keep the paper's recipe.
            if spec.variant == "rs":
                common.update(random_start=True, clean_weight=0.0)
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
        if not spec.is_init:
            held = self._try_train(dataset, recipe, RunSpec("plain", spec.seed))
            if held is not None:
                return held
        cfg = self.config(dataset, recipe, spec)
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
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(raw)
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
    targets = [RunSpec(m, 0) for m in SURROGATES] + [RunSpec(m, 0, attacker) for m in PAPER_L2L]
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

FRONTIER_LABELS = {"plain-continued": "Plain Net (continued)", "fgsm-rs": "FGSM-RS", "pgd": "PGM Net (paper)",
                   "pgd-at": "PGD-AT", "trades": "TRADES", "mart": "MART"}


def frontier_specs(preset: Preset) -> list[RunSpec]:
    """Every method of the frontier, seed by seed: each starts from its seed's plain net."""
    specs = []
    for seed in range(preset.seeds):
        specs += [RunSpec("plain", seed, variant="continued"), RunSpec("fgsm", seed, variant="rs"),
                  RunSpec("pgd", seed), RunSpec("pgd-at", seed), RunSpec("trades", seed), RunSpec("mart", seed)]
        specs += [RunSpec(m, seed, a) for a in preset.frontier_attackers for m in ("grad-l2l", "2step-l2l")]
    return specs


def _label(key: str) -> str:
    if key in FRONTIER_LABELS:
        return FRONTIER_LABELS[key]
    method, attacker = key.rsplit("-", 1)
    return f"{ROW_LABELS[method]} ({attacker[0].upper()})"


def _training_seconds(path: Path) -> float:
    return sum(json.loads(line)["seconds"] for line in (path / "metrics.jsonl").read_text().splitlines()
               if line.strip())


def _frontier(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Clean, AutoAttack and worst-case accuracy of every method against its measured training
    seconds and its multiply-adds per step; each run is evaluated as soon as it is trained."""
    from .bench import forward_macs, step_macs

    p = r.preset
    aa = p.autoattack
    attacks = ["pgd10", aa]
    specs = frontier_specs(p)

    def measure(spec: RunSpec, path: Path) -> dict[str, Any]:
        checks = p.checks and (p.checks_all_seeds or spec.seed == 0)
        result = r.white_box(path, attacks, checks, None)

        def cost() -> dict[str, Any]:
            run = load_run(path, with_attacker=False)
            c, h, w = run.meta["image_shape"]
            macs = {"step_macs": step_macs(run.config, run.meta), "classifier_macs": forward_macs(
                run.model, torch.rand(1, c, h, w))}
            if run.config.is_l2l:
                attacker = build_attacker(run.config, run.meta)
                a = torch.rand(1, attacker_in_channels(run.config.method, c), h, w)
                macs["attacker_macs"] = forward_macs(attacker, a, run.config.eps)
            return macs
        return {**result, **r.cached("macs", [path], {}, cost), "seconds": _training_seconds(path)}

    measured = r.ensure_evaluated(dataset, "frontier", specs, measure)
    init_seconds = [_training_seconds(r.run_dir(dataset, "frontier", RunSpec("plain", s))) for s in range(p.seeds)]
    by_key: dict[str, list[tuple[RunSpec, dict[str, Any]]]] = {}
    for spec, res in zip(specs, measured, strict=True):
        by_key.setdefault(spec.key, []).append((spec, res))
    header = ["method", "clean", aa.replace("autoattack", "AutoAttack"), "worst", "training s", "GMAC / step",
              "flagged"]
    lines, raw, points = [], [], []
    for key, entries in by_key.items():
        row = [_label(key)]
        stats = {}
        for col in ("clean", aa, "worst"):
            stats[col] = _mean_std([100 * e[1]["accuracy"][col] for e in entries])
            row.append(_cell(*stats[col], None, len(entries), False))
        stats["seconds"] = _mean_std([e[1]["seconds"] for e in entries])
        row.append(_cell(*stats["seconds"], None, len(entries), False))
        row.append(f"{entries[0][1]['step_macs'] / 1e9:.2f}")
        flagged = any(bool(e[1].get("flagged")) for e in entries)
        row.append("FLAGGED" if flagged else ("ok" if any("checks" in e[1] for e in entries) else "not checked"))
        lines.append(row)
        points.append({"label": _label(key), "key": key, "seconds": stats["seconds"], "autoattack": stats[aa]})
        for spec, res in entries:
            raw.append({"experiment": experiment, "preset": p.name, "dataset": dataset, "method": spec.method,
                        "attacker": spec.attacker or "", "variant": spec.variant, "seed": spec.seed, "n": res["n"],
                        "eps": res["eps"], **{f"acc_{c}": res["accuracy"].get(c) for c in ("clean", *attacks, "worst")},
                        "training_seconds": res["seconds"], "init_seconds": init_seconds[spec.seed],
                        "step_macs": res["step_macs"], "classifier_macs": res["classifier_macs"],
                        "attacker_macs": res.get("attacker_macs"), "flagged": res.get("flagged"),
                        "run": str(r.run_dir(dataset, "frontier", spec))})
    l2l = [row for row in raw if row["attacker_macs"]]
    ratios = sorted({f"{row['attacker']} {row['attacker_macs'] / row['classifier_macs']:.2f}x" for row in l2l})
    title = (f"frontier: accuracy (%) against training cost on {dataset}, eps {raw[0]['eps']:g}, {p.title}, "
             f"n={raw[0]['n']} validation images, mean ± std over {p.seeds} seed(s)")
    batch = r.config(dataset, "frontier", specs[0]).batch_size
    notes = [f"training s: measured seconds of the {p.epochs} adversarial epochs (metrics.jsonl), on top of the "
             f"shared plain net's {statistics.fmean(init_seconds):.0f} s; measured as the runs ran (two processes "
             "on a shared machine add noise).",
             f"GMAC / step: multiply-adds of one training step of {batch} images, attack, forwards, backwards and "
             "attacker included (torch.utils.flop_counter's formulas).",
             "attacker cost per image, against the classifier's forward: " + (", ".join(ratios) or "no L2L run"),
             f"worst: images that survive both pgd10 and {aa}.",
             "recipes: PGM Net and L2L as the paper (table2); Plain Net (continued), FGSM-RS (random start, "
             "step 1.25 eps, adversarial loss only), PGD-AT, TRADES (beta 6) and MART (beta 5) with the L2L "
             "lr schedule; every run starts from its seed's plain net."]
    out = r.out / experiment
    stem = f"{experiment}-{_dataset_tag(dataset)}"
    files = _write_outputs(out, stem, title, header, lines, raw,
                           {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset,
                            "points": points, "attacker_ratio": ratios}, notes)
    files["png"] = str(_plot_frontier(points, out / f"{stem}.png", aa, title))
    return {"title": title, "files": files, "rows": raw}


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
    fig.savefig(path, dpi=110)
    return path


RUNNERS: dict[str, Callable[[Reproduction, str, str], dict[str, Any]]] = {
    "table2": _white_box_table, "table5": _white_box_table, "table3": _black_box_table,
    "table6": _black_box_table, "table7": _black_box_table, "table4": _timing_table,
    "fig3": _figure, "fig4": _figure, "fig5": _figure, "frontier": _frontier,
}


def reproduce(experiment: str, preset: str | Preset, out: str | Path, *, datasets: list[str] | None = None,
              device: str = "auto", data_dir: str = "data", download: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one experiment (or "all") of the paper; returns what was written, per data set."""
    names = list(EXPERIMENTS) if experiment == "all" else [experiment]
    if experiment != "all" and experiment not in (*EXPERIMENTS, *EXTRA_EXPERIMENTS):
        raise UserError(f"unknown experiment '{experiment}'; choose one of: "
                        f"{', '.join((*EXPERIMENTS, *EXTRA_EXPERIMENTS))}, all")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS_PUBLIC)}")
        preset = (FRONTIER_PRESETS if experiment == "frontier" else PRESETS)[preset]
    if datasets is not None:
        for d in datasets:
            TrainConfig(dataset=d).validate()  # cheap checks only; the data set itself loads at training
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


def plot_curves(run_dirs: list[str], out: str) -> str:
    """Loss and accuracy per epoch (and attack_success for L2L runs) from metrics.jsonl, one curve per
    run folder (folders with the same name are told apart by their paths)."""
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
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return str(target)


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


__all__ = ["PRESETS", "FRONTIER_PRESETS", "EXPERIMENTS", "EXTRA_EXPERIMENTS", "Preset", "RunSpec", "Reproduction",
           "reproduce", "plot_curves",
           "paper_results", "summary"]
