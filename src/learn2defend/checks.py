"""Sanity checks of a robustness evaluation (Carlini et al. 2019, "On Evaluating
Adversarial Robustness", section 5; Croce & Hein 2020 for the AutoAttack comparison).

A defense that masks gradients looks robust to gradient attacks without being robust.
None of these checks proves robustness; each one that fails proves the reported numbers
overestimate it. All run on the same images (the evaluation's first n), with the
evaluation's eps and norm (the threat model: learn2defend.attacks.threat).
"Noise" is the binomial sampling error of an accuracy measured on n
images: 2 standard errors plus one sample, `noise(p, n) = 2 sqrt(p (1 - p) / n) + 1/n`,
with p the mean of the two accuracies compared. The checks are the records of
`SANITY_CHECKS`, run in this order:

- `more_steps`: PGD-50 is not more accurate than PGD-10, nor PGD-50 with 3 restarts
  than PGD-50 or PGD-10, beyond noise (more iterations and restarts can only help an
  attack that follows useful gradients).
- `large_eps`: at eps 0.5 under l-inf, 0.5 sqrt(C H W) under l2 (the threat model's
  `gray_eps`; or the evaluation eps, if larger) every image can be turned into the same
  all-gray image, so no model can beat its majority-class share there;
  PGD-20 must leave at most max(10 %, the majority-class share) + noise.
- `iterative_vs_single_step`: PGD-10 is not more accurate than FGSM beyond noise.
- `whitebox_vs_transfer`: white-box PGD-10 is not more accurate than PGD-10 transferred
  from a surrogate model beyond noise (only with a surrogate; a transfer "from the model
  itself with another random start" is just white-box PGD, so without one it is skipped).
- `autoattack_vs_pgd`: AutoAttack (the evaluation's, or the fast version APGD-CE +
  APGD-T) is not more than max(10 points, noise) below the per-sample worst case of the
  PGD runs. A few points are normal (AutoAttack is the stronger attack); a larger gap
  means PGD's gradients mislead it, which is masking.
- `gradients`: the input gradient of the loss is finite and not all zero on more than
  95 % of the images.
- `finite_logits`: the model's logits are finite on every image, clean and under every
  attack run (an image with NaN logits is counted as wrong, never as class 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import PGD, Attack, ThreatModel, make_attack, model_state_kept, threat_model
from .correctness import attack_correct, batches_in_order, fraction
from .data import ImageData
from .errors import UserError

LARGE_EPS = 0.5  # the all-gray image lies within 0.5 of every [0, 1] image
LARGE_EPS_FLOOR = 0.10  # the accuracy bound at LARGE_EPS is max(this, majority-class share)
AUTOATTACK_GAP = 0.10  # PGD above AutoAttack by more than this (and noise) flags masking
BAD_GRADIENT_LIMIT = 0.05  # fraction of images with zero or non-finite input gradients


def noise(p: float, n: int) -> float:
    """Tolerance for an accuracy p measured on n images: 2 standard errors + 1 sample."""
    p = min(max(p, 0.0), 1.0)
    return 2 * math.sqrt(p * (1 - p) / n) + 1 / n


def input_gradient_ok(model: nn.Module, images: ImageData, batch_size: int, device: torch.device) -> Tensor:
    """Per image (bool, CPU): the cross-entropy's input gradient is finite and not all zero.
    The model's modes, `requires_grad` flags and `.grad`s are restored."""
    ok = []
    with model_state_kept(model):
        model.eval()
        for x, y in batches_in_order(images, batch_size, device):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
            g = grad.flatten(1)
            ok.append((torch.isfinite(g).all(1) & (g != 0).any(1)).cpu())
    return torch.cat(ok)


def _check(passed: bool, detail: str, **values: float) -> dict[str, Any]:
    return {"passed": bool(passed), "detail": detail, "values": {k: round(v, 4) for k, v in values.items()}}


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


@dataclass
class Evidence:
    """What the checks read: the evaluated model and images, and the per-sample correctness
    (attack name -> bool tensor) and accuracy of every attack run on them."""

    model: nn.Module
    images: ImageData
    eps: float
    large_eps: float
    batch_size: int
    device: torch.device
    correct: dict[str, Tensor]
    acc: dict[str, float]
    autoattack: str  # "autoattack" or "autoattack-fast", whichever was run
    has_surrogate: bool
    nonfinite: Tensor | None = None  # per image: the logits were not finite, clean or under an attack

    @property
    def n(self) -> int:
        return len(self.images)

    def tol(self, a: float, b: float) -> float:
        """The noise of a difference between two accuracies measured on these images."""
        return noise((a + b) / 2, self.n)


@dataclass(frozen=True)
class SanityCheck:
    """One check: its name (the key of its result), what it checks, the criterion of Carlini
    et al. 2019 (section 5) it implements, and the function that decides it."""

    name: str
    checks: str
    criterion: str
    run: Callable[[Evidence], dict[str, Any]]


def _more_steps(e: Evidence) -> dict[str, Any]:
    acc = e.acc
    pairs = [("pgd50", "pgd10"), ("pgd50x3", "pgd50"), ("pgd50x3", "pgd10")]
    worse = [(m, f) for m, f in pairs if acc[m] > acc[f] + e.tol(acc[m], acc[f])]
    line = f"pgd10 {_pct(acc['pgd10'])}, pgd50 {_pct(acc['pgd50'])}, pgd50 x3 restarts {_pct(acc['pgd50x3'])}"
    return _check(
        not worse,
        line + ("; " + ", ".join(f"{m} above {f} beyond noise" for m, f in worse) if worse else ""),
        pgd10=acc["pgd10"], pgd50=acc["pgd50"], pgd50x3=acc["pgd50x3"],
    )


def _large_eps(e: Evidence) -> dict[str, Any]:
    counts = torch.bincount(e.images.labels.long().cpu())
    limit = max(LARGE_EPS_FLOOR, float(counts.max()) / e.n)
    bound = limit + noise(limit, e.n)
    a = e.acc["large_eps_pgd20"]
    return _check(a <= bound, f"pgd20 at eps {e.large_eps:g}: {_pct(a)} (must be <= {_pct(bound)})",
                  accuracy=a, bound=bound)


def _iterative_vs_single_step(e: Evidence) -> dict[str, Any]:
    a, b = e.acc["pgd10"], e.acc["fgsm"]
    return _check(a <= b + e.tol(a, b), f"pgd10 {_pct(a)} vs fgsm {_pct(b)} (noise {_pct(e.tol(a, b))})",
                  pgd10=a, fgsm=b)


def _whitebox_vs_transfer(e: Evidence) -> dict[str, Any]:
    if not e.has_surrogate:
        return {"passed": None, "skipped": True, "detail": "needs a surrogate model (--surrogate DIR)"}
    a, b = e.acc["pgd10"], e.acc["transfer_pgd10"]
    return _check(
        a <= b + e.tol(a, b), f"white-box pgd10 {_pct(a)} vs transferred pgd10 {_pct(b)} (noise {_pct(e.tol(a, b))})",
        whitebox=a, transfer=b,
    )


def _autoattack_vs_pgd(e: Evidence) -> dict[str, Any]:
    pgd_worst = fraction(e.correct["pgd10"] & e.correct["pgd50"] & e.correct["pgd50x3"])
    aa = e.acc[e.autoattack]
    gap = max(AUTOATTACK_GAP, e.tol(pgd_worst, aa))
    detail = f"{e.autoattack} {_pct(aa)} vs PGD worst case {_pct(pgd_worst)} (allowed gap {_pct(gap)})"
    if pgd_worst - aa > gap:  # say what it means: the cause may be masking or just CE's weak gradients
        detail += "; PGD's cross-entropy gradients mislead it here, so PGD-based accuracies overestimate robustness"
    return _check(pgd_worst - aa <= gap, detail, autoattack=aa, pgd=pgd_worst)


def _gradients(e: Evidence) -> dict[str, Any]:
    bad = 1 - fraction(input_gradient_ok(e.model, e.images, e.batch_size, e.device))
    return _check(
        bad < BAD_GRADIENT_LIMIT,
        f"{_pct(bad)} of the images have an all-zero or non-finite input gradient "
        f"(must be < {_pct(BAD_GRADIENT_LIMIT)})",
        bad_fraction=bad,
    )


def _finite_logits(e: Evidence) -> dict[str, Any]:
    bad = 0 if e.nonfinite is None else int(e.nonfinite.sum())
    return _check(bad == 0, f"{bad} of {e.n} images gave non-finite logits (NaN or inf), clean or under an "
                  "attack (counted as wrong)", count=bad)


# The checks, run in this order (their results keep it).
SANITY_CHECKS: list[SanityCheck] = [
    SanityCheck("more_steps", "PGD-50 is not more accurate than PGD-10, nor PGD-50 with 3 restarts than either, "
                "beyond noise",
                "more iterations and random restarts never make an attack weaker (the attack has converged)",
                _more_steps),
    SanityCheck("large_eps", f"PGD-20 at eps max({LARGE_EPS}, eps) leaves at most max(10 %, the majority-class "
                "share) + noise",
                "an unbounded (large enough) attack reaches 0 % accuracy, or chance", _large_eps),
    SanityCheck("iterative_vs_single_step", "PGD-10 is not more accurate than FGSM beyond noise",
                "iterative attacks are stronger than single-step attacks", _iterative_vs_single_step),
    SanityCheck("whitebox_vs_transfer", "white-box PGD-10 is not more accurate than PGD-10 transferred from "
                "a surrogate beyond noise (skipped without a surrogate)",
                "white-box attacks are stronger than transfer (black-box) attacks", _whitebox_vs_transfer),
    SanityCheck("autoattack_vs_pgd", f"AutoAttack is not more than max({AUTOATTACK_GAP:.0%}, noise) below the "
                "per-sample worst case of the PGD runs",
                "try diverse and stronger attacks than the one the defense was tuned against (here AutoAttack, "
                "Croce & Hein 2020)", _autoattack_vs_pgd),
    SanityCheck("gradients", f"the input gradient is finite and not all zero on more than "
                f"{1 - BAD_GRADIENT_LIMIT:.0%} of the images",
                "gradients are useful: not zero, not NaN or infinite (no obfuscated gradients)", _gradients),
    SanityCheck("finite_logits", "the model's logits are finite on every image, clean and under every attack",
                "a prediction that is NaN is no prediction: argmax would read it as class 0", _finite_logits),
]


def _wanted_attacks(eps: float, large_eps: float, batch_size: int, aa_name: str,
                    correct: dict[str, Tensor], threat: ThreatModel | None = None) -> list[Attack]:
    """The attacks the checks read that `correct` lacks, each named as the checks read it."""
    threat = threat_model(threat)
    wanted: dict[str, Attack] = {
        "fgsm": make_attack("fgsm", eps, threat),
        "pgd10": make_attack("pgd10", eps, threat),
        "pgd50": make_attack("pgd50", eps, threat),
        "pgd50x3": make_attack("pgd50", eps, threat, restarts=3),
        "large_eps_pgd20": PGD(large_eps, steps=20, norm=threat),
    }
    if aa_name not in correct:
        wanted[aa_name] = make_attack(aa_name, eps, threat, batch_size=batch_size)
    missing = []
    for name, attack in wanted.items():
        attack.name = name  # e.g. the restarted PGD-50 is "pgd50x3", not "pgd50"
        if name not in correct:
            missing.append(attack)
    return missing


def sanity_checks(
    model: nn.Module,
    images: ImageData,
    eps: float,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    known: dict[str, Tensor] | None = None,
    surrogate: nn.Module | None = None,
    progress: bool = False,
    state_dir: Path | None = None,
    nonfinite: Tensor | None = None,
    norm: str | ThreatModel | None = None,
) -> dict[str, Any]:
    """Run the checks (`SANITY_CHECKS`, in order) on `model` (an nn.Module taking [0, 1]
    images) and the given images, under the threat model `norm` (l-inf by default).

    `known`: per-sample correctness the evaluation already computed on the same images
    (attack name -> bool tensor, as `correctness.attack_correct` returns it); attacks found
    there are not run again. `nonfinite`: per image, whether that evaluation saw non-finite
    logits (its `nonfinite["worst"]`); the attacks run here add theirs.
    Returns {"checks": {name: {"passed": bool | None,
    "detail": str, "values": {...}}}, "flagged": bool, "accuracy": {attack: accuracy},
    "attacks": [the Attack objects run, for their warnings]}. The models' modes,
    `requires_grad` flags and `.grad`s are restored; the global torch RNG is not touched
    (the attacks draw from their own generators seeded with `seed`).
    """
    if not eps > 0:
        raise UserError("the sanity checks attack the model, so they need eps > 0")
    device = torch.device(device)
    correct = dict(known or {})
    threat = threat_model(norm)
    large_eps = max(threat.gray_eps(images.images[0].numel()) if len(images.images) else LARGE_EPS, eps)
    aa_name = next((a for a in ("autoattack", "autoattack-fast") if a in correct), "autoattack-fast")
    missing = _wanted_attacks(eps, large_eps, batch_size, aa_name, correct, threat)
    bad = torch.zeros(len(images), dtype=torch.bool) if nonfinite is None else nonfinite.cpu().clone()
    seen: dict[str, Tensor] = {}
    if missing:
        correct.update(attack_correct(model, images, missing, batch_size, device, seed, progress, state_dir,
                                      nonfinite=seen))
        bad |= seen["worst"]
    if surrogate is not None:
        transfer = make_attack("pgd10", eps, threat)
        transfer.name = "transfer_pgd10"
        missing.append(transfer)
        correct.update(attack_correct(model, images, [transfer], batch_size, device, seed, progress,
                                      source=surrogate, nonfinite=seen))
        bad |= seen["worst"]
    acc = {name: fraction(ok) for name, ok in correct.items() if name != "worst"}
    evidence = Evidence(model, images, eps, large_eps, batch_size, device, correct, acc, aa_name,
                        surrogate is not None, bad)
    checks = {check.name: check.run(evidence) for check in SANITY_CHECKS}
    flagged = any(c["passed"] is False for c in checks.values())
    return {"checks": checks, "flagged": flagged, "accuracy": acc, "attacks": missing}
