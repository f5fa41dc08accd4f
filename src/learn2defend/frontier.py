"""The frontier, beyond the paper: every method's clean, AutoAttack and worst-case accuracy
against its measured training seconds and its multiply-adds per training step
(`learn2defend reproduce frontier`; `reproduce.reproduce("frontier", ...)` runs `run_frontier`).

Every method trains from scratch (preset paper: from one plain net per seed) for the same
epochs, with validation PGD-10 every epoch (catastrophic overfitting: the
"collapsed" column), and is evaluated as soon as it is trained. Writes
`frontier/frontier-<dataset>[-<norm>][-eps<E>].md|csv|json|png` and `...-val-pgd10.png`; the
notes under the table are written from the runs' own config.json (`frontier_notes`), so they
say what the runs did. The figures draw each method in its own colour and marker
(`learn2defend.figures.run_styles`, from `methods.METHOD_RECORDS`).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .attacks import threat_model
from .config import load_resolved
from .experiments import (
    PRESETS,
    ROW_LABELS,
    Preset,
    Reproduction,
    RunSpec,
    cell,
    dataset_tag,
    mean_std,
    write_outputs,
)
from .figures import _suptitle, run_styles
from .guards import COLLAPSE_FRACTION, COLLAPSE_MIN_DROP
from .methods import METHOD_RECORDS, attacker_in_channels
from .runs import CONFIG, build_attacker, load_run
from .settings import OptimizerSettings, ResolvedConfig

# val_robust_n that validates on every validation image (train.validate takes the smaller of the two).
EVERY_VALIDATION_IMAGE = 10**9

# The frontier's presets: every method from scratch (preset paper: from one plain net per
# seed), the same adversarial epochs, at least 1,000 validation images, validation PGD-10
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
    # Sized for under an hour on a 2-core CPU with two processes: the whole 15-row frontier at
    # 8/255 ran in 43 minutes of wall clock, 58 % of it training and 42 % the evaluation
    # (docs/results.md, "Frontier").
    # Every method from scratch, as TRADES, MART, Madry et al. and the fast-AT papers train (a
    # confident plain net breaks the KL-based methods: docs/results.md, "TRADES and MART from a
    # plain net"), with one learning rate and the fast-AT benchmark's one-cycle schedule for all.
    # Digits: smallcnn, slim attacker at width 0.18, sdi at 0.25; PGD-10 on every validation image.
    "cpu": replace(
        PRESETS["cpu"], epochs=6, attacker_width=0.18, attacker_widths={"sdi": 0.25}, checks=False, n=1000,
        val_robust_n=EVERY_VALIDATION_IMAGE, from_scratch=True, lr_schedule="onecycle",
        label="smallcnn from scratch, 6 epochs, one cycle, 2 seeds, slim attacker width 0.18, sdi 0.25, n<=1000",
        large_data=dict(
            model="smallcnn-pooled", train_size=4000, n=500, attacker_width=0.07,
            attacker_widths={"sdi": 0.11}, val_robust_n=200,
            label="smallcnn-pooled from scratch, 4,000 training images, 6 epochs, one cycle, 2 seeds, "
                  "slim attacker width 0.07, sdi 0.11, n=500")),
    # For when a GPU is lent: the fast-AT papers' setting (PreAct-ResNet-18 from scratch on all
    # of CIFAR-10's training images, batch 128, SGD with weight decay 5e-4, bf16, channels
    # last; OneCycle up to lr 0.1, per batch, as the fast-AT benchmark trains every method: Wong
    # et al.'s cyclic shape, learn2defend.optim.schedule), sized to
    # finish in about 8 minutes on one H200 with the MAC model (bench.step_macs):
    # - per image and step: FGSM-RS 2.78 GMAC (5.0 forwards of 0.555), N-FGSM 2.78 (5.0),
    #   FGSM-SDI 4.13 (7.4, sdi attacker x1 included), FGSM-PGI 3.89 (7.0), LIET 3.89 (7.0; its
    #   class-wise query every 20 batches adds 0.008 forwards), PGD-AT 12.77 (23.0); one epoch
    #   of the 45,000 training images (50,000 less the 10 % validation split): 125 + 125 + 186
    #   + 175 + 175 + 575 = 1,361 TMAC, 54 s at 25 TMAC/s (docs/measurements/doctor-h200.json:
    #   wrn-34-4 at batch 128 trains at 27.5-31.0 TMAC/s under bf16; PreAct-ResNet-18, half its
    #   size, likely less);
    # - validation per epoch and method, in float32 (13 TMAC/s measured): clean on 5,000 images
    #   (2.8 TMAC) and PGD-10 on 500 (5.8 TMAC): 0.7 s, 3.9 s for the six methods;
    # - AutoAttack-fast on 500 images, float32: APGD-CE 100 iterations on ~375 correct images
    #   and APGD-T 9 x 100 on ~225 robust ones, ~480k forward+backward pairs of 2 forwards
    #   (0.27 PMAC): 20.5 s per method, 123 s for six;
    # - E epochs: 58.3 E + 123 s + ~30 s start-up (data, the MAC counts on the CPU) <= 480 s
    #   gives E <= 5.6. TRADES, MART and the PGM net cost PGD-AT's, Grad/2-Step L2L (slim x1:
    #   7.0 and 11.0 forwards) another 8-12 s per epoch. So: FGSM-RS, N-FGSM, FGSM-SDI, FGSM-PGI,
    #   LIET and the PGD-AT reference, 5 epochs, one seed, 500 AutoAttack images (+-2.2 points
    #   at 50 %): predicted 445 s (7.4 min).
    "gpu": replace(
        PRESETS["paper"], name="gpu", model="preact-resnet18", epochs=5, l2l_lr=0.1, l2l_milestones=(3, 4),
        weight_decay=5e-4, batch_size=128, seeds=1, n=500, train_size=None, attacker_width=1.0,
        autoattack="autoattack-fast", checks=False, val_robust_n=500, attacker_optimizer=None,
        frontier_methods=("fgsm-rs", "n-fgsm", "fgsm-sdi-sdi", "fgsm-pgi", "liet", "pgd-at"), from_scratch=True,
        amp="bf16", channels_last=True, lr_schedule="onecycle",
        label="PreAct-ResNet-18 from scratch, every training image, 5 epochs, bf16, channels last, 1 seed, "
              "FGSM-RS, N-FGSM, FGSM-SDI, FGSM-PGI, LIET and PGD-AT, n=500"),
    "tiny": replace(PRESETS["tiny"], val_robust_n=16),
}
FRONTIER_PRESETS_PUBLIC = ("paper", "cpu", "gpu")


FRONTIER_LABELS = {"plain-continued": "Plain Net (continued)", "fgsm-rs": "FGSM-RS", "n-fgsm": "N-FGSM",
                   "pgd": "PGM Net (paper)", "pgd-at": "PGD-AT", "trades": "TRADES", "mart": "MART",
                   "fgsm-sdi-sdi": "FGSM-SDI", "fgsm-sdi-sdi-2step": "FGSM-SDI, 2 steps",
                   "fgsm-sdi-image-sdi": "Learned start, image only, 2 steps",
                   "fgsm-sdi-memory-sdi": "Learned start + memory, 2 steps", "fgsm-pgi": "FGSM-PGI", "liet": "LIET"}


def frontier_specs(preset: Preset) -> list[RunSpec]:
    """Every method of the frontier (those of `preset.frontier_methods`, if it names any), seed by
    seed: each starts from its seed's plain net, or from scratch (`preset.from_scratch`)."""
    specs = []
    for seed in range(preset.seeds):
        specs += [RunSpec("plain", seed, variant="continued"), RunSpec("fgsm", seed, variant="rs"),
                  RunSpec("n-fgsm", seed), RunSpec("pgd", seed), RunSpec("pgd-at", seed), RunSpec("trades", seed),
                  RunSpec("mart", seed)]
        specs += [RunSpec(m, seed, a) for a in preset.frontier_attackers for m in ("grad-l2l", "2step-l2l")]
        specs += [RunSpec("fgsm-sdi", seed, "sdi"), RunSpec("fgsm-sdi", seed, "sdi", "2step"),
                  RunSpec("fgsm-sdi-image", seed, "sdi"), RunSpec("fgsm-sdi-memory", seed, "sdi"),
                  RunSpec("fgsm-pgi", seed), RunSpec("liet", seed)]
    return [s for s in specs if (not preset.frontier_methods or s.key in preset.frontier_methods)
            and preset.norm not in METHOD_RECORDS[s.method].unsupported_norms]


def frontier_row_keys(preset: Preset) -> list[str]:
    """The row keys (RunSpec.key) `preset`'s frontier trains, in its order, each once."""
    return list(dict.fromkeys(s.key for s in frontier_specs(preset)))


def _label(key: str, preset: Preset) -> str:
    """The row's name in tables and figures (the plain row is "continued" only on top of a plain net)."""
    if key == "plain-continued" and preset.from_scratch:
        return "Plain Net"
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


def run_frontier(r: Reproduction, experiment: str, dataset: str) -> dict[str, Any]:
    """Clean, AutoAttack and worst-case accuracy of every method against its measured training
    seconds and its multiply-adds per step; each run is evaluated as soon as it is trained.
    Writes the table (md, csv, json) and two figures; returns their paths, title and raw rows."""
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
    configs: dict[str, list[ResolvedConfig]] = {}
    for spec in specs:
        configs.setdefault(_label(spec.key, p), []).append(load_resolved(r.run_dir(dataset, "frontier", spec) / CONFIG))
    plain_nets = {str(r.run_dir(dataset, "frontier", RunSpec("plain", s))) for s in range(p.seeds)}
    notes = frontier_notes(configs, attack=aa, init_seconds=init_seconds, ratios=ratios, plain_nets=plain_nets)
    out = r.out / experiment
    stem = f"{experiment}-{dataset_tag(dataset)}{r.eps_suffix(dataset)}"
    files = write_outputs(out, stem, title, header, lines, raw,
                          {"experiment": experiment, "preset": p.name, "preset_title": p.title, "dataset": dataset,
                           "points": points, "curves": curves, "attacker_ratio": ratios}, notes)
    files["png"] = str(_save(frontier_figure(points, aa, title), out / f"{stem}.png"))
    per_epoch = title.replace("accuracy (%) against training cost", "validation PGD-10 accuracy (%) per epoch")
    files["epochs_png"] = str(_save(robust_curves_figure(curves, per_epoch), out / f"{stem}-val-pgd10.png"))
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
    validation curves (each with its row's method, which gives its colour and marker)."""
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
        row = [_label(key, p)]
        stats = {}
        for col in ("clean", aa, "worst"):
            stats[col] = mean_std([100 * e[1]["accuracy"][col] for e in entries])
            row.append(cell(*stats[col], None, len(entries), False))
        stats["seconds"] = mean_std([e[1]["seconds"] for e in entries])
        row.append(cell(*stats["seconds"], None, len(entries), False))
        row.append(f"{entries[0][1]['step_macs'] / 1e9:.2f}")
        row.append(_collapse_cell([c[0] for c in collapses]))
        flagged = any(bool(e[1].get("flagged")) for e in entries)
        row.append("FLAGGED" if flagged else ("ok" if any("checks" in e[1] for e in entries) else "not checked"))
        lines.append(row)
        method = entries[0][0].method
        points.append({"label": _label(key, p), "key": key, "method": method, "seconds": stats["seconds"],
                       "autoattack": stats[aa]})
        curve = _robust_curve(histories[key])
        if curve:
            curves.append({"label": _label(key, p), "key": key, "method": method, "val_pgd10": curve})
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


# ---- the notes under the table, from the runs' config.json --------------------------------


def frontier_notes(configs: dict[str, list[ResolvedConfig]], *, attack: str, init_seconds: list[float],
                   ratios: list[str], plain_nets: Collection[str] = ()) -> list[str]:
    """The notes under the frontier's table: what each column measures, and every row's recipe.

    configs: {row label: the resolved config.json of each of its runs (one per seed)}, in the
    table's order; every fact about the training the notes state is read from them. attack:
    the AutoAttack version evaluated; init_seconds: the plain net's training seconds per seed
    (0 from scratch); ratios: the attackers' measured cost against the classifier;
    plain_nets: the plain nets' run folders (an `init` among them reads "its seed's plain net")."""
    every = [c for cs in configs.values() for c in cs]
    epochs = sorted({c.epochs for c in every})
    batches = sorted({c.batch_size for c in every})
    inits = {c.init is not None for c in every}
    start = ("from scratch" if inits == {False} else
             f"on top of the plain net's {statistics.fmean(init_seconds):.0f} s" + ("" if inits == {True} else
                                                                                   " where a run starts from it"))
    epochs_text = (f"the {epochs[0]} adversarial epoch{'s' * (epochs[0] != 1)}" if len(epochs) == 1
                   else "the adversarial epochs")
    notes = [f"training s: wall-clock seconds of {epochs_text} (metrics.jsonl), {start}; measured as the runs "
             "ran (other work on the machine adds noise).",
             "GMAC / step: multiply-adds of one training step of "
             + (f"{batches[0]} images" if len(batches) == 1 else "one batch (its size in the recipes)")
             + ", attack, forwards, backwards and attacker included (torch.utils.flop_counter's formulas).",
             "attacker cost per image, against the classifier's forward: " + (", ".join(ratios) or "no L2L run"),
             f"worst: images that survive both pgd10 and {attack}."]
    watched: dict[str, list[str]] = {}  # validation PGD-10 images -> the rows that record it
    for label, cs in configs.items():
        for n in dict.fromkeys(c.run.val_robust_n for c in cs if c.run.val_robust_n and c.eps > 0):
            watched.setdefault(_validation_images(n), []).append(label)
    on = ("; ".join(f"{images} ({', '.join(rows)})" for images, rows in watched.items()) if len(watched) > 1
          else next(iter(watched), "no validation images"))
    notes.append(f"collapsed: catastrophic overfitting, an epoch whose validation PGD-10 accuracy, on {on}, fell below "
                 f"{COLLAPSE_FRACTION:g} of the epoch before's and by at least {COLLAPSE_MIN_DROP:g} while clean "
                 "accuracy rose (learn2defend.train.collapsed); the evaluated weights are the last epoch's. "
                 "'not measured': no validation PGD-10 in the run's metrics.jsonl.")
    return notes + _recipe_notes(configs, plain_nets)


def _validation_images(n: int) -> str:
    return "every validation image" if n >= EVERY_VALIDATION_IMAGE else f"the first {n:,} validation images"


# What every recipe note states, in this order; the first ones are usually shared by every row
# and stated once ("every run"), the method's own per row.
_SHARED_SLOTS = ("model", "training images", "start", "epochs", "batch", "optimizer", "precision", "label smoothing",
                 "weight averaging")


def _recipe_notes(configs: dict[str, list[ResolvedConfig]], plain_nets: Collection[str]) -> list[str]:
    """Two notes: the settings most rows share (stated once), then each row's own (its attack,
    loss and attacker, and where it departs from the shared ones), from its config.json."""
    rows = {label: _merged([_recipe(c, plain_nets) for c in cs]) for label, cs in configs.items()}
    shared = {}
    for slot in _SHARED_SLOTS:
        counts = Counter(r[slot] for r in rows.values() if slot in r)
        if counts:
            text, n = counts.most_common(1)[0]
            if 2 * n > len(rows):
                shared[slot] = text
    parts = []
    for label, recipe in rows.items():
        own = [recipe[slot] for slot in ("method", "attacker") if slot in recipe]
        own += [text for slot, text in recipe.items() if slot in _SHARED_SLOTS and shared.get(slot) != text]
        parts.append(f"{label}: {'; '.join(own) if own else 'as every run'}")
    head = "every run" if all(all(r.get(s) == t for s, t in shared.items()) for r in rows.values()) else \
        "every run unless its row says otherwise"
    return [f"recipes (from each run's config.json): {head}: {', '.join(shared.values()) or '-'}.",
            "per row: " + ". ".join(parts) + "."]


def _merged(recipes: list[dict[str, str]]) -> dict[str, str]:
    """One row's recipe over its seeds: a setting the seeds differ in lists their values."""
    slots = list(dict.fromkeys(slot for r in recipes for slot in r))
    return {slot: " / ".join(dict.fromkeys(r.get(slot, "-") for r in recipes)) for slot in slots}


def _recipe(c: ResolvedConfig, plain_nets: Collection[str]) -> dict[str, str]:
    """A run's training recipe as phrases, by slot (_SHARED_SLOTS, then "method", "attacker")."""
    d = c.data
    recipe = {
        "model": c.model + (f" ({c.pretrained} weights)" if c.pretrained else ""),
        "training images": "every training image" if d.train_size is None else f"{d.train_size:,} training images",
        "start": "from scratch" if c.init is None else
                 ("from its seed's plain net" if c.init in plain_nets else f"from {c.init}"),
        "epochs": f"{c.epochs} epoch{'s' * (c.epochs != 1)}",
        "batch": f"batch {c.batch_size}",
        "optimizer": _optimizer_text(c.optimizer),
        "precision": "float32" if c.speed.amp == "off" else f"{c.speed.amp} autocast",
        "label smoothing": f"label smoothing {c.loss.label_smoothing:g}" if c.loss.label_smoothing
                           else "no label smoothing",
        "weight averaging": f"weight averaging (decay {c.ema:g})" if c.ema else "no weight averaging",
    }
    method = _method_text(c)
    if method:
        recipe["method"] = method
    if c.attacker is not None:
        a = c.attacker
        parts = [f"{a.name} attacker (width {a.width:g}) updated every "
                 + (f"{a.every} batches" if a.every != 1 else "batch")]
        if a.steps != 1:
            parts.append(f"{a.steps} updates a time")
        if a.update != "joint":
            parts.append(f"{a.update} update")
        recipe["attacker"] = ", ".join([*parts, _optimizer_text(a.optimizer)])
    return recipe


def _method_text(c: ResolvedConfig) -> str:
    """The method's attack and loss: steps and their size (as a multiple of eps), start, noise,
    and the clean term's weight or the KL weight beta."""
    if c.method == "plain":
        return "clean training"
    a, parts = c.attack, []
    if a.step_size is not None:
        steps = a.pgd_steps or 1
        parts.append(f"{steps} step{'s' * (steps != 1)} of {_of_eps(a.step_size, c.eps)}")
    if a.random_start is not None:
        parts.append("random start" if a.random_start else "zero start")
    if a.noise is not None:
        parts.append(f"noise {_of_eps(a.noise, c.eps)}")
    if c.loss.beta is not None:
        parts.append(f"beta {c.loss.beta:g}")
    else:
        w = c.loss.clean_weight
        parts.append(f"clean loss weight {w:g}" if w else "adversarial loss only")
    return ", ".join(parts)


def _of_eps(value: float, eps: float) -> str:
    """A size in pixels as a multiple of eps: "1.25 eps"."""
    if eps <= 0:
        return f"{value:g}"
    k = value / eps
    return "eps" if abs(k - 1) < 1e-9 else f"{k:.3g} eps"


def _optimizer_text(o: OptimizerSettings) -> str:
    """"SGD lr 0.05 (momentum 0.9, weight decay 0.0001), x0.1 after epoch 4"."""
    extra = f"momentum {o.momentum:g}" if o.name == "sgd" else f"betas {o.betas[0]:g}, {o.betas[1]:g}"
    if o.schedule == "onecycle":
        schedule = "one cycle per batch (up, then down to 0)"
    elif o.schedule == "cosine":
        schedule = "cosine per batch to 0"
    else:
        schedule = (f"x{o.gamma:g} after epoch{'s' * (len(o.milestones) > 1)} {', '.join(map(str, o.milestones))}"
                    if o.milestones else "constant lr")
    return f"{o.name.upper() if o.name == 'sgd' else o.name.capitalize()} lr {o.lr:g} ({extra}, weight decay " \
           f"{o.weight_decay:g}), {schedule}"


# ---- the figures ---------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def frontier_figure(points: list[dict[str, Any]], attack: str, title: str) -> Any:
    """AutoAttack accuracy against training seconds, one point per row, ± one std both ways,
    in its method's colour and marker (`figures.run_styles`). Returns a matplotlib Figure."""
    from matplotlib.figure import Figure


    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    styles = run_styles([(pt.get("method", ""), pt["key"]) for pt in points])
    for pt, style in zip(points, styles, strict=True):
        (x, xerr), (y, yerr) = pt["seconds"], pt["autoattack"]
        # no bars where the std is 0 or unknown (one seed): zero-length bars' caps would hide the marker
        ax.errorbar(x, y, xerr=xerr or None, yerr=yerr or None, capsize=3, label=pt["label"], markersize=8,
                    **{**style, "linestyle": "none"})
    ax.set_xlabel("training seconds (adversarial epochs)")
    ax.set_ylabel(f"{attack} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _suptitle(fig, title, 7)
    return fig


def robust_curves_figure(curves: list[dict[str, Any]], title: str) -> Any:
    """Validation PGD-10 accuracy (%) per training epoch, one line per row (mean over seeds) in
    its method's colour and marker: a collapse (catastrophic overfitting) shows as a sudden drop."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator


    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for c, style in zip(curves, run_styles([(c.get("method", ""), c["key"]) for c in curves]), strict=True):
        epochs, values = zip(*c["val_pgd10"], strict=True)
        ax.plot(epochs, values, label=c["label"], **style)
    if not curves:
        ax.text(0.5, 0.5, "no run recorded validation PGD-10", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation PGD-10 accuracy (%)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    _suptitle(fig, title, 7)
    return fig
