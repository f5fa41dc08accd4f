"""Reproduce the paper's experiments: Tables 2-7 and Figures 3-5; and, beyond the paper, the
frontier: AutoAttack accuracy against training cost for every method (`learn2defend.frontier`).

`reproduce(experiment, preset, out)` trains every run an experiment needs as an ordinary
run folder under `out/runs/` (with `train(..., resume=True)`: finished runs are skipped,
interrupted ones continue; a run another process is training is put off and waited for),
evaluates each run once (results cached as JSON under `out/evals/`, keyed by the run's
epoch and the evaluation settings, so an interrupted table does not redo finished
evaluations), and writes per experiment a markdown table (ours as mean ± std over seeds,
the paper's number beside it), a CSV and a JSON of the raw numbers, and PNG figures.

Runs are shared between experiments: table3/4, fig3/4/5 reuse table2's runs, table7
reuses table5's. What the experiments share (presets, run folders, training, cached
evaluations, the table writer) is `learn2defend.experiments`; the names it and
`learn2defend.frontier` define are importable from here as before.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .attacks import threat_model
from .config import TrainConfig, default_eps, option
from .errors import UserError
from .experiments import (  # noqa: F401 (re-exported: importable from learn2defend.reproduce as before)
    BUSY_WAIT_SECONDS,
    PAPER_L2L_METHODS,
    PRESETS,
    ROW_LABELS,
    Preset,
    Reproduction,
    RunSpec,
    cell,
    dataset_tag,
    is_large,
    mean_std,
    write_outputs,
)
from .frontier import (  # noqa: F401 (re-exported)
    EVERY_VALIDATION_IMAGE,
    FRONTIER_LABELS,
    FRONTIER_PRESETS,
    FRONTIER_PRESETS_PUBLIC,
    frontier_notes,
    frontier_row_keys,
    frontier_specs,
    run_frontier,
)

EXPERIMENTS = ("table2", "table3", "table4", "table5", "table6", "table7", "fig3", "fig4", "fig5")
# Beyond the paper (not part of "all"): AutoAttack accuracy against training cost, per method.
EXTRA_EXPERIMENTS = ("frontier",)
PRESETS_PUBLIC = ("paper", "cpu")
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")

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


def white_box_specs(preset: Preset, attackers: tuple[str, ...] = ("slim", "wide")) -> list[RunSpec]:
    """Every method of Table 2, one per seed; L2L methods once per attacker network."""
    specs = []
    for seed in range(preset.seeds):
        specs += [RunSpec(m, seed) for m in SURROGATES]
        specs += [RunSpec(m, seed, a) for a in attackers for m in PAPER_L2L_METHODS]
    return specs


# ---- paper reference data and formatting ----------------------------------------------


def paper_results() -> dict[str, Any]:
    return json.loads(PAPER_RESULTS.read_text())


def _paper_dataset(experiment: str, dataset: str) -> str:
    """Which of the paper's data sets our numbers are put beside: the same one where the
    paper has it, else the experiment's first (labelled as a different data set)."""
    table = paper_results().get(experiment, {})
    return dataset if dataset in table else EXPERIMENT_DATASETS[experiment][0]



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
            mean, std = mean_std([100 * e[1]["accuracy"][col] for e in entries])
            ref = paper[key].get(col) if col in WHITEBOX_COLUMNS else None
            row.append(cell(mean, std, ref, len(entries), col in WHITEBOX_COLUMNS))
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
    files = write_outputs(r.out / experiment, f"{experiment}-{dataset_tag(dataset)}", title, header, lines, raw,
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
                row.append(cell(100 * acc, None, ref, 1, True))
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
    files = write_outputs(r.out / experiment, f"{experiment}-{dataset_tag(dataset)}", title, header, lines, raw,
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
        mean, std = mean_std(secs)
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
    files = write_outputs(r.out / experiment, f"{experiment}-{dataset_tag(dataset)}", title,
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
    stem = f"{experiment}-{dataset_tag(dataset)}"
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


RUNNERS: dict[str, Callable[[Reproduction, str, str], dict[str, Any]]] = {
    "table2": _white_box_table, "table5": _white_box_table, "table3": _black_box_table,
    "table6": _black_box_table, "table7": _black_box_table, "table4": _timing_table,
    "fig3": _figure, "fig4": _figure, "fig5": _figure, "frontier": run_frontier,
}


def with_seeds(preset: Preset, seeds: int) -> Preset:
    """`preset` with seeds 0..seeds-1 per method, its labels saying so ("2 seeds" -> "3 seeds");
    UserError unless `seeds` is a positive integer."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {seeds}")

    def count(text: str) -> str:
        return re.sub(r"\b\d+ seeds?\b", f"{seeds} seed{'s' * (seeds > 1)}", text)

    large = {k: count(v) if k == "label" else v for k, v in preset.large_data.items()}
    return replace(preset, seeds=seeds, label=count(preset.label), large_data=large)


def reproduce(experiment: str, preset: str | Preset, out: str | Path, *, datasets: list[str] | None = None,
              device: str = "auto", data_dir: str = "data", download: bool = False,
              log: Callable[[str], None] | None = None, eps: float | None = None,
              norm: str | None = None, methods: str | None = None, seeds: int | None = None) -> dict[str, Any]:
    """Run one experiment (or "all") of the paper; returns what was written, per data set.

    `eps` (the frontier only): the l-inf radius in pixel units, in [0, 1], every frontier run
    trains and is evaluated at (default: the data set's); at another radius than the default,
    runs and tables go to their own folders and file names, beside those of the default.
    `norm` (the frontier only): "linf" (default) or "l2"; under l2 eps is an l2 radius
    (default: the data set's l2 default, 0.5 on CIFAR-10), runs go to their own folders, and
    methods without an l2 form (N-FGSM) are left out.
    `methods` (the frontier only): comma-separated row keys or shell patterns (e.g.
    "fgsm-pgi,liet" or "*fgsm*"; `frontier_row_keys` lists them): only those rows are trained,
    evaluated and tabled (their plain nets too, where they start from one); UserError when a
    pattern matches no row of the preset.
    `seeds`: seeds 0..seeds-1 per method instead of the preset's count (runs of the seeds both
    have in common are shared); UserError unless a positive integer."""
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
    if methods is not None:
        if experiment != "frontier":
            raise UserError(f"--methods applies to the frontier only, not to {experiment}")
        preset = replace(preset, frontier_methods=select_rows(preset, methods))
    if seeds is not None:
        preset = with_seeds(preset, seeds)
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
    run folder (folders with the same name are told apart by their paths), in its method's colour
    and marker (`figures.run_styles`)."""
    ckpt.check_writable(out)  # before reading anything
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import run_styles

    histories, methods = {}, {}
    for folder, label in curve_labels(run_dirs).items():
        path = folder / "metrics.jsonl"
        try:
            histories[label] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        methods[label] = _run_method(folder)
    styles = dict(zip(histories, run_styles([(methods[label], label) for label in histories]), strict=True))
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
                ax.plot(*zip(*pts, strict=True), label=label, **styles[label])
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


def _run_method(folder: Path) -> str:
    """The method in a run folder's config.json ("" where there is none to read: its curves are
    still drawn, in the style of no method)."""
    try:
        method = json.loads((folder / "config.json").read_text()).get("method", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return method if isinstance(method, str) else ""


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


def select_rows(preset: Preset, patterns: str) -> tuple[str, ...]:
    """The frontier row keys of `preset` (RunSpec.key, e.g. "pgd-at", "fgsm-sdi-sdi-2step")
    that any of the comma-separated shell `patterns` matches, in the frontier's order; a
    pattern that matches none is a UserError naming the keys."""
    keys = frontier_row_keys(replace(preset, frontier_methods=()))
    chosen = set()
    for pattern in (p.strip() for p in patterns.split(",")):
        hits = {k for k in keys if fnmatch.fnmatchcase(k, pattern)}
        if not pattern or not hits:
            raise UserError(f"--methods: '{pattern}' matches no frontier row; the rows: {', '.join(keys)}")
        chosen |= hits
    return tuple(k for k in keys if k in chosen)
