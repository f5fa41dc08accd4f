"""The paper's evaluation figures: accuracy sweeps (Figures 3 and 4) and a grid of
adversarial examples (Figure 5).

- `sweep`: accuracy against the number of PGD iterations at a fixed eps (Figure 3), or
  against eps for FGSM and PGD (Figure 4); with several runs, a second row of panels
  shows each run's accuracy minus the first run's (the paper's "Grad L2L minus PGM Net").
  Writes PREFIX.csv (one row per run, attack and value) and PREFIX.png.
- `show`: clean images, their perturbations and the adversarial images, with true and
  predicted class names.

The sweep attacks: "pgm" is the paper's PGM (zero start, step eps/3: its 0.01 at 0.03),
the default, as in the paper's figures; "pgd" is Madry's (random start, step 2.5 eps/K);
"fgsm" one step of size eps. An eps sweep uses K = `steps` (10) iterations; eps 0 and 0
iterations are the clean accuracy. Every point uses the same images and seed.

Plots are drawn on a bare matplotlib Figure (Agg canvas): no pyplot, no global backend
switch, nothing needs a display.
"""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import checkpoint as ckpt
from .attacks import Attack, ThreatModel, make_attack, threat_model
from .attacks.threat import LINF
from .config import option, parse_fraction
from .data import DeviceLoader
from .errors import UserError
from .evaluate import (
    BatchedEvalData,
    EvalConfig,
    EvalData,
    attack_correct,
    build_attacks,
    check_same_task,
    eval_data,
    first_n,
    fraction,
    load_attacked,
    norm_and_eps,
)
from .methods import method_styles
from .runs import Run, resolve_device

SWEEP_OVER = ("pgd-steps", "eps")
SWEEP_ATTACKS = ("fgsm", "pgd", "pgm")
CSV_COLUMNS = ("label", "checkpoint", "method", "attack", "eps", "steps", "accuracy", "n")
MAX_SWEEP_STEPS = 10_000
_TITLES = {"fgsm": "FGSM", "pgd": "PGD (random start, step 2.5 eps/K)", "pgm": "PGM (zero start, step eps/3)"}
_SHORT = {"fgsm": "FGSM", "pgd": "PGD", "pgm": "PGM"}


def _suptitle(fig: Any, text: str, width_inches: float) -> None:
    """A figure title wrapped to the figure's width (about 12 characters per inch at 9 pt)."""
    fig.suptitle(textwrap.fill(text, width=max(30, int(12 * width_inches))), fontsize=9)


# How the runs of one method in one figure are told apart (its colour and marker stay): the
# first run's line and marker, then the second's, and so on (cycled).
_LINESTYLES = ("-", "--", ":", "-.")
_FILLSTYLES = ("full", "none", "left", "bottom")
UNKNOWN_METHOD_STYLE = ("black", "o")  # a run whose method no record names (a folder without config.json)


def run_styles(entries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """matplotlib keyword arguments (color, marker, linestyle, fillstyle) for each (method,
    variant) entry of one figure, e.g. [("fgsm-sdi", ""), ("fgsm-sdi", "2step"), ("pgd-at", "")].
    Every entry gets its method's colour and marker (`methods.method_styles`, the same in every
    figure); entries of one method with different variants (another attacker, recipe or run)
    get, in order of first appearance, a solid line and filled marker, then a dashed line and
    hollow marker, then dotted and half-filled, ...; equal entries get equal styles."""
    styles = method_styles()
    variants: dict[str, list[str]] = {}
    out = []
    for method, variant in entries:
        seen = variants.setdefault(method, [])
        if variant not in seen:
            seen.append(variant)
        k = seen.index(variant)
        colour, marker = styles.get(method, UNKNOWN_METHOD_STYLE)
        out.append({"color": colour, "marker": marker, "linestyle": _LINESTYLES[k % len(_LINESTYLES)],
                    "fillstyle": _FILLSTYLES[k % len(_FILLSTYLES)]})
    return out


def _over_and_values(over: list[str]) -> dict[str, Any]:
    """--over WHAT VALUES: what to vary, and its comma-separated values."""
    what, text = over
    return {"over": what, "values": [parse_fraction(v) for v in text.split(",") if v.strip()]}


@dataclass(kw_only=True)
class SweepConfig(BatchedEvalData):
    FLAG_HELP: ClassVar[dict[str, str]] = {
        "eps": "radius of a pgd-steps sweep (default: the first run's training eps)",
    }

    checkpoints: list[str] = option(flag="--checkpoint", nargs="+", metavar="CHECKPOINT",
                                    help="run folder(s); differences are to the first")
    over: str = option(nargs=2, metavar=("pgd-steps|eps", "VALUES"), from_cli=_over_and_values,
                       help="what to vary and its comma-separated values, e.g. --over pgd-steps 1,2,5,10,20,50")
    values: list[float]  # set by --over with `over`: "pgd-steps" (Figure 3) or "eps" (Figure 4)
    out: str = option(help="file prefix: writes PREFIX.csv and PREFIX.png")
    # None: ["pgm"] over pgd-steps, ["fgsm", "pgm"] over eps
    attacks: list[str] | None = option(None, flag="--attack", metavar="ATTACK",
                                       help="fgsm, pgd (random start), pgm (paper: zero start, step eps/3); "
                                       "default: pgm over pgd-steps, fgsm,pgm over eps")
    steps: int = option(10, help="PGD/PGM iterations of an eps sweep (default: 10)")
    progress: bool = True
    title: str | None = None  # a line above the panels (e.g. the experiment and its settings)

    def resolved_attacks(self) -> list[str]:
        if self.attacks:
            return list(dict.fromkeys(self.attacks))
        return ["pgm"] if self.over == "pgd-steps" else ["fgsm", "pgm"]

    def validate(self) -> None:
        EvalConfig(checkpoint="", split=self.split, n=self.n, batch_size=self.batch_size, eps=self.eps,
                   norm=self.norm, which=self.which).validate()
        if not self.checkpoints:
            raise UserError("sweep needs at least one --checkpoint run folder")
        if self.over not in SWEEP_OVER:
            raise UserError(f"--over must be one of {', '.join(SWEEP_OVER)}, got '{self.over}'")
        if not self.values:
            raise UserError(f"--over {self.over} needs values, e.g. 1,2,5,10 (steps) or 0,0.05,0.1 (eps)")
        top = threat_model(self.norm).eps_max  # without --norm, l-inf's 1 (an l2 sweep past 1 needs --norm l2)
        for v in self.values:
            if self.over == "eps" and not (math.isfinite(v) and 0 <= v <= top):
                raise threat_model(self.norm).eps_error("sweep eps values", v)
            if self.over == "pgd-steps" and not (v == int(v) and 0 <= v <= MAX_SWEEP_STEPS):
                raise UserError(f"sweep step counts must be integers in [0, {MAX_SWEEP_STEPS}], got {v:g}")
        for a in self.resolved_attacks():
            if a not in SWEEP_ATTACKS:
                raise UserError(f"unknown sweep attack '{a}'; choose from {', '.join(SWEEP_ATTACKS)}")
        if self.over == "pgd-steps" and "fgsm" in self.resolved_attacks():
            raise UserError("fgsm has one step; sweep it --over eps (pgd-steps takes --attack pgd or pgm)")
        if not (isinstance(self.steps, int) and 1 <= self.steps <= MAX_SWEEP_STEPS):
            raise UserError(f"--steps must be an integer in [1, {MAX_SWEEP_STEPS}], got {self.steps}")
        _writable_prefix(self.out)


def _writable_prefix(out: str) -> Path:
    prefix = Path(out)
    if not prefix.name or prefix.name in (".", ".."):
        raise UserError(f"--out '{out}' must name a file prefix, e.g. figures/fig3")
    parent = next((p for p in (prefix.parent.absolute(), *prefix.parent.absolute().parents) if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise UserError(f"cannot write under '{prefix.parent}': '{parent}' is not a folder")
    ckpt.check_writable(prefix)  # checked before the attacks run, not after
    return prefix


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder '{folder}': {e.strerror or e}") from None


def csv_text(rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...]) -> str:
    """`rows` as CSV text with a header line, for `checkpoint.atomic_write`."""
    import io

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _sweep_attack(kind: str, over: str, value: float, eps: float, steps: int,
                  norm: ThreatModel | None = None) -> Attack | None:
    """The attack of one sweep point under `norm` (l-inf by default); None where it is the
    identity (eps 0 or 0 steps)."""
    e, k = (value, steps) if over == "eps" else (eps, int(value))
    if e == 0 or k == 0:
        return None
    attack = make_attack("fgsm" if kind == "fgsm" else f"{kind}{k}", e, norm)
    attack.name = f"{kind}@{value:g}"
    return attack


def run_labels(runs: list[Run]) -> list[str]:
    """The run folder names; parent/name where names repeat; full paths as a last resort."""
    for make in (lambda r: r.path.name, lambda r: f"{r.path.parent.name}/{r.path.name}", lambda r: str(r.path)):
        labels = [make(r) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}: {r.path}" for i, r in enumerate(runs)]


def sweep(config: SweepConfig) -> dict[str, Any]:
    """Accuracy of each run at each sweep value; writes PREFIX.csv and PREFIX.png."""
    config.validate()
    device = resolve_device(config.device)
    runs = [load_attacked(c, config.which, device) for c in config.checkpoints]
    for other in runs[1:]:
        check_same_task(runs[0], other, "sweep")
    threat, eps = norm_and_eps(runs[0], config.norm, config.eps)
    if config.over == "pgd-steps" and eps == 0:
        raise UserError("a pgd-steps sweep at eps 0 is just clean accuracy; give --eps > 0")
    images = first_n(eval_data(runs[0], config.dataset, config.data_dir), config.split, config.n)
    kinds = config.resolved_attacks()
    labels = run_labels(runs)
    rows: list[dict[str, Any]] = []
    for run, label in zip(runs, labels, strict=True):
        points = {(k, v): _sweep_attack(k, config.over, v, eps, config.steps, threat)
                  for k in kinds for v in config.values}
        attacks = [a for a in points.values() if a is not None]
        correct = attack_correct(run.model, images, attacks, config.batch_size, device, config.seed, config.progress)
        for (kind, value), attack in points.items():
            ok = correct["clean" if attack is None else attack.name]
            e, k = (value, config.steps) if config.over == "eps" else (eps, int(value))
            rows.append({
                "label": label, "checkpoint": str(run.path), "method": run.config.method, "attack": kind,
                "eps": e, "steps": 0 if (attack is None) else (1 if kind == "fgsm" else k),
                "accuracy": fraction(ok), "n": len(images),
            })
    prefix = _writable_prefix(config.out)
    _make_folder(prefix.parent)
    csv_path, png_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".png")
    ckpt.atomic_write(csv_path, csv_text(rows, CSV_COLUMNS))
    title = config.title if config.title is not None or threat is LINF else f"{threat.label} threat model"
    plot_sweep(rows, config.over, kinds, png_path, eps if config.over == "pgd-steps" else None, title)
    return {"csv": str(csv_path), "png": str(png_path), "over": config.over, "attacks": kinds,
            "eps": eps if config.over == "pgd-steps" else None, "norm": threat.name, "n": len(images), "rows": rows}


def plot_sweep(rows: list[dict[str, Any]], over: str, kinds: list[str], path: Path, eps: float | None = None,
               title: str | None = None) -> None:
    """Accuracy panels (one per attack) and, with several runs, difference panels below;
    `rows` as in sweep's CSV (the runs in order of first appearance)."""
    fig = sweep_figure(rows, over, kinds, eps, title)
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def sweep_figure(rows: list[dict[str, Any]], over: str, kinds: list[str], eps: float | None = None,
                 title: str | None = None) -> Any:
    """plot_sweep's matplotlib Figure: each run in its method's colour and marker (`run_styles`)."""
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(r["label"] for r in rows))
    method = {r["label"]: r.get("method", "") for r in rows}
    style = dict(zip(labels, run_styles([(method[label], label) for label in labels]), strict=True))
    diff = len(labels) > 1
    fig = Figure(figsize=(4.5 * len(kinds), 3.6 * (2 if diff else 1)), layout="constrained")
    if title:
        _suptitle(fig, title, 4.5 * len(kinds))
    axes = fig.subplots(2 if diff else 1, len(kinds), squeeze=False)
    x_key, x_label = ("eps", "eps (pixel units)") if over == "eps" else ("steps", "PGD iterations")

    def series(label: str, kind: str) -> tuple[list[float], list[float]]:
        pts = [r for r in rows if r["label"] == label and r["attack"] == kind]
        xs = [r[x_key] if over == "eps" else r["steps"] for r in pts]
        return xs, [100 * r["accuracy"] for r in pts]

    for j, kind in enumerate(kinds):
        ax = axes[0][j]
        for label in labels:  # one style per run in both rows
            xs, ys = series(label, kind)
            ax.plot(xs, ys, label=label, **style[label])
        title = _TITLES[kind] + (f", eps {eps:g}" if eps is not None else "")
        ax.set(title=title, xlabel=x_label, ylabel="accuracy (%)", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if diff:
            ax = axes[1][j]
            _, base = series(labels[0], kind)
            for label in labels[1:]:
                xs, ys = series(label, kind)
                ax.plot(xs, [y - b for y, b in zip(ys, base, strict=True)], label=f"{label} - {labels[0]}",
                        **style[label])
            ax.axhline(0, color="gray", lw=0.8)
            ax.set(title=f"{_SHORT[kind]}: difference to {labels[0]}", xlabel=x_label,
                   ylabel="accuracy difference (points)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    return fig


# ---- Figure 5 ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class ShowConfig(EvalData):
    checkpoint: str = option(help="run folder")
    out: str = option(help="PNG file to write")
    attacks: list[str] = option(default_factory=lambda: ["fgsm", "pgd10"],
                                help="comma-separated (default: fgsm,pgd10)")
    n: int = option(6, flag="--n-images", aliases=("--n",), metavar="N",
                    help="show the first N images of the split (default: 6)")
    title: str | None = None  # above the grid; None: the run folder's name

    def validate(self) -> None:
        EvalConfig(checkpoint=self.checkpoint, split=self.split, n=self.n, eps=self.eps, norm=self.norm,
                   which=self.which).validate()
        if self.n > 64:
            raise UserError(f"--n-images {self.n} is too many images for one picture; use at most 64")
        if not self.attacks:
            raise UserError("show needs at least one attack, e.g. --attacks fgsm,pgd10")
        _writable_prefix(self.out)


def show(config: ShowConfig) -> dict[str, Any]:
    """A PNG grid like the paper's Figure 5: per column an image; rows: the clean image,
    then per attack its perturbation (0.5 + delta / (2 eps), gray = unchanged) and the
    adversarial image, each titled with true and predicted class names."""
    config.validate()
    device = resolve_device(config.device)
    run = load_attacked(config.checkpoint, config.which, device)
    threat, eps = norm_and_eps(run, config.norm, config.eps)
    attacks = build_attacks(config.attacks, eps, config.n, norm=threat)
    images = first_n(eval_data(run, config.dataset, config.data_dir), config.split, config.n)
    classes = [str(c) for c in run.meta["classes"]]
    x, y = next(iter(DeviceLoader(images, len(images), device, shuffle=False, drop_last=False)))
    model = run.model.eval()
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    advs, preds = {}, {}
    for attack in attacks:
        advs[attack.name] = attack(model, x, y, seed=config.seed)
        with torch.no_grad():
            preds[attack.name] = model(advs[attack.name]).argmax(1)
    out = Path(config.out)
    _make_folder(out.parent)
    _plot_grid(x.cpu(), y.cpu(), clean_pred.cpu(), {k: v.cpu() for k, v in advs.items()},
               {k: v.cpu() for k, v in preds.items()}, classes, eps, config.title or run.path.name, out, threat)
    table = []
    for i in range(len(y)):
        entry = {"index": i, "label": classes[int(y[i])], "clean": classes[int(clean_pred[i])]}
        entry.update({name: classes[int(p[i])] for name, p in preds.items()})
        table.append(entry)
    return {"out": str(out), "checkpoint": str(run.path), "eps": eps, "norm": threat.name, "n": len(y),
            "attacks": [a.name for a in attacks], "images": table}


def _as_image(t: torch.Tensor):
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def _plot_grid(x, y, clean_pred, advs, preds, classes, eps, title, path: Path, threat: ThreatModel = LINF) -> None:
    from matplotlib.figure import Figure

    n, names = len(y), list(advs)
    rows = 1 + 2 * len(names)
    fig = Figure(figsize=(1.7 * n + 0.6, 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, n, squeeze=False)
    gray = {"cmap": "gray", "vmin": 0, "vmax": 1} if x.shape[1] == 1 else {}

    def cell(ax, img, text, color="black", ylabel=None):
        ax.imshow(_as_image(img.clamp(0, 1)), interpolation="nearest", **gray)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(text, fontsize=8, color=color)
        if ylabel:
            ax.set_ylabel(ylabel, fontsize=8)

    for i in range(n):
        true = classes[int(y[i])]
        ok = bool(clean_pred[i] == y[i])
        cell(axes[0][i], x[i], f"true {true}\npred {classes[int(clean_pred[i])]}", "green" if ok else "red",
             "clean" if i == 0 else None)
        for j, name in enumerate(names):
            delta = advs[name][i] - x[i]
            shown = 0.5 + delta / (2 * eps) if eps > 0 else torch.full_like(delta, 0.5)
            size = float(threat.norms(delta[None])[0])
            cell(axes[1 + 2 * j][i], shown, f"{threat.label} |delta| {size:.3f}", "black",
                 f"{name}\nperturbation" if i == 0 else None)
            ok = bool(preds[name][i] == y[i])
            cell(axes[2 + 2 * j][i], advs[name][i], f"true {true}\npred {classes[int(preds[name][i])]}",
                 "green" if ok else "red", f"{name}\nadversarial" if i == 0 else None)
    _suptitle(fig, f"{title}: {threat.label} eps {eps:g} (perturbations shown as 0.5 + delta / (2 eps))",
              1.7 * n + 0.6)
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
