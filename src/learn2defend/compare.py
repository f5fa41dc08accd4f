"""Train several methods under the same settings and tabulate their robustness.

This is the paper's protocol in miniature: a plain classifier is trained first and
every adversarial method starts from it (`--init`), then each run is evaluated on
the validation split under the same attacks. Runs are ordinary run folders, so an
interrupted comparison resumes where it stopped and finished runs are not redone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import METHODS, TrainConfig
from .evaluate import EvalConfig, evaluate
from .train import train


def compare(
    base: TrainConfig,
    methods: list[str] | tuple[str, ...] = METHODS,
    attacks: list[str] | tuple[str, ...] = ("fgsm", "pgd10"),
    out: str | Path = "runs/compare",
    plain_epochs: int | None = None,
    n: int | None = None,
) -> list[dict[str, Any]]:
    """Train (or resume) one run per method in `out/<method>` and evaluate each.

    Returns one row per method: accuracies on the validation split, seconds per epoch.
    """
    out = Path(out)
    plain = dataclasses.replace(base, method="plain", out=str(out / "plain"), epochs=plain_epochs or base.epochs)
    runs = {"plain": train(plain, resume=True)}
    for method in methods:
        if method != "plain":
            cfg = dataclasses.replace(base, method=method, out=str(out / method), init=str(out / "plain"))
            runs[method] = train(cfg, resume=True)
    rows = []
    for method in methods:
        run = runs[method]
        result = evaluate(EvalConfig(checkpoint=str(run.path), attacks=list(attacks), n=n, device=base.device,
                                     data_dir=base.data_dir, progress=False))
        seconds = [r["seconds"] for r in run.history]
        rows.append({"method": method, **result["accuracy"], "eps": result["eps"], "n": result["n"],
                     "epochs": run.epoch, "seconds_per_epoch": sum(seconds) / max(len(seconds), 1)})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    metrics = [k for k in rows[0] if k not in ("method", "eps", "n", "epochs", "seconds_per_epoch")]
    lines = ["| method | " + " | ".join(metrics) + " | s/epoch |", "|---" * (len(metrics) + 2) + "|"]
    for r in rows:
        cells = [f"{100 * r[m]:.1f}" for m in metrics]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {r['seconds_per_epoch']:.1f} |")
    return "\n".join(lines)
