"""Train several methods under the same settings and tabulate their robustness.

This is the paper's protocol in miniature: a plain classifier is trained first and
every adversarial method starts from it (`--init`), then each run is evaluated on
the validation split under the same attacks. Runs are ordinary run folders, so an
interrupted comparison resumes where it stopped and finished runs are not redone.
Everything (methods, attacks, every method's settings, the runs already in `out`) is
checked before anything is trained. The table is saved as `out/compare.md` and its rows
as `out/compare.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .attacks import threat_model
from .config import METHODS, TrainConfig, load_resolved, option
from .errors import UserError
from .evaluate import EvalConfig, build_attacks, evaluate
from .runs import CONFIG, changed_settings
from .train import RESUMABLE_CHANGES, train

TABLE, ROWS = "compare.md", "compare.json"


@dataclass
class CompareConfig:
    """What `learn2defend compare` compares (besides the training options every run shares)."""

    methods: list[str] = option(default_factory=lambda: list(METHODS), help="comma-separated methods (default: all)")
    attacks: list[str] = option(default_factory=lambda: ["fgsm", "pgd10"], help="attacks to evaluate with")
    plain_epochs: int | None = option(None, help="epochs of the plain run the others start from (default: --epochs)")
    n: int | None = option(None, flag="--n-images", aliases=("--n",), metavar="N",
                           help="evaluate on the first N validation images (default: all)")
    out: str = option("runs/compare", help="folder holding one run folder per method, and the table (compare.md) "
                      "and its rows (compare.json); an interrupted comparison continues there")
    extend: bool = option(False, switch=True, help="let a larger --epochs (or --plain-epochs) train the runs "
                          "already in --out on; without it, runs there must have the epochs asked for")


def plan(
    base: TrainConfig,
    methods: list[str] | tuple[str, ...],
    attacks: list[str] | tuple[str, ...],
    out: Path,
    plain_epochs: int | None = None,
    n: int | None = None,
    *,
    extend: bool = False,
) -> dict[str, TrainConfig]:
    """The configuration of each run of a comparison, by method, plain first; UserError on the
    first bad option, before anything is trained or written.

    A run already in `out` must have been trained with the same settings (those that may
    change on resume aside) and for as many epochs; with `extend`, for fewer epochs, which it
    then trains on to the new number."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise UserError("--methods names no method; give one or more, e.g. --methods plain,fgsm")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method '{unknown[0]}' in --methods; choose from: {', '.join(METHODS)}")
    if plain_epochs is not None and (isinstance(plain_epochs, bool) or not isinstance(plain_epochs, int)
                                     or plain_epochs < 1):
        raise UserError(f"--plain-epochs must be a positive integer, got {plain_epochs}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"--n-images must be a positive integer, got {n}")
    base.validate()
    epochs = base.epochs if plain_epochs is None else plain_epochs
    configs = {"plain": dataclasses.replace(base, method="plain", out=str(out / "plain"), init=None, epochs=epochs)}
    for method in methods:
        if method != "plain":
            # from the plain run, which started from --pretrained where one is given
            configs[method] = dataclasses.replace(base, method=method, out=str(out / method), init=str(out / "plain"),
                                                  pretrained=None)
    for config in configs.values():
        config.validate()
    build_attacks(list(attacks), base.resolve().eps, 1, norm=base.norm)  # unknown attack names fail here
    for method, config in configs.items():
        _check_existing(Path(config.out), config, "--plain-epochs" if method == "plain" and plain_epochs else
                        "--epochs", extend)
    return configs


def _check_existing(folder: Path, config: TrainConfig, epochs_flag: str, extend: bool) -> None:
    """A run already in `folder` must be the one `config` asks for."""
    if not (folder / CONFIG).is_file():
        return
    stored = load_resolved(folder / CONFIG)
    differ = changed_settings(stored, config.resolve(), RESUMABLE_CHANGES - {"batch_size"})
    if differ:
        raise UserError(f"'{folder}' holds a run with other settings: {differ}; use another --out, "
                        "or the settings of the runs there")
    if config.epochs < stored.epochs:
        raise UserError(f"'{folder}' holds a run of {stored.epochs} epochs, and {epochs_flag} asks for "
                        f"{config.epochs}; use another --out")
    if config.epochs > stored.epochs and not extend:
        raise UserError(f"'{folder}' holds a run of {stored.epochs} epochs, and {epochs_flag} asks for "
                        f"{config.epochs}: pass --extend to train the runs there on, or use another --out")


def compare(
    base: TrainConfig,
    methods: list[str] | tuple[str, ...] = METHODS,
    attacks: list[str] | tuple[str, ...] = ("fgsm", "pgd10"),
    out: str | Path = "runs/compare",
    plain_epochs: int | None = None,
    n: int | None = None,
    *,
    extend: bool = False,
) -> list[dict[str, Any]]:
    """Train (or resume) one run per method in `out/<method>` and evaluate each; every option
    is checked first (`plan`). With `extend`, runs already in `out` for fewer epochs train on.

    Returns one row per method: accuracies on the validation split, seconds per epoch; they
    are also written to `out/compare.json`, and the table to `out/compare.md`.
    """
    out = Path(out)
    configs = plan(base, methods, attacks, out, plain_epochs, n, extend=extend)
    runs = {method: train(config, resume=True) for method, config in configs.items()}
    rows = []
    for method in dict.fromkeys(methods):
        run = runs[method]
        result = evaluate(EvalConfig(checkpoint=str(run.path), attacks=list(attacks), n=n, device=base.device,
                                     data_dir=base.data_dir, progress=False))
        seconds = [r["seconds"] for r in run.history]
        rows.append({"method": method, **result["accuracy"], "eps": result["eps"], "norm": result["norm"],
                     "n": result["n"],
                     "epochs": run.epoch, "seconds_per_epoch": sum(seconds) / max(len(seconds), 1)})
    try:
        ckpt.atomic_write_text(out / TABLE, report(base, rows) + "\n")
        ckpt.atomic_write_text(out / ROWS, json.dumps({"rows": rows}, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the table under '{out}': {e}") from None
    return rows


def report(base: TrainConfig, rows: list[dict[str, Any]]) -> str:
    """The table with a line saying what it measured."""
    label = threat_model(rows[0].get("norm")).label
    head = (f"{base.dataset}, {base.model}, {label} eps {rows[0]['eps']:g}, validation split (n={rows[0]['n']}), "
            "accuracy in %:")
    return head + "\n" + markdown_table(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    metrics = [k for k in rows[0] if k not in ("method", "eps", "norm", "n", "epochs", "seconds_per_epoch")]
    lines = ["| method | " + " | ".join(metrics) + " | s/epoch |", "|---" * (len(metrics) + 2) + "|"]
    for r in rows:
        cells = [f"{100 * r[m]:.1f}" for m in metrics]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines)
