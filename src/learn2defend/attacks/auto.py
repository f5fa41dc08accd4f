"""AutoAttack (Croce & Hein, `pyautoattack` 0.2.0) behind our `Attack` interface.

What 0.2.0 gives us and how we use it:
- `pyautoattack.AutoAttack(model, *, attacks=None, device, eps, norm, seed, version)`;
  `run_standard_evaluation(x, y, /, *, batch_size=250, state_path=None)` returns
  `(x_adv, y_adv)`: adversarial images (the clean image where no attack succeeded) and
  the model's prediction on them.
- Its own resume support is broken in 0.2.0: the state file stores the attack set as a
  string, so loading any existing state raises "different set of attacks", and a
  resumed run would hit an unbound `y_adv`. We therefore run the attacks one at a time
  (each on the samples still robust, exactly AutoAttack's cascade) and keep our own
  state file after each attack: adversarial images found so far, robust flags, attacks
  done.
- It reports through the `logging` logger "auto-attack" (progress at DEBUG, sanity
  checks at WARNING) and a few bare `print`s; we collect both, plus Python warnings,
  into `attack.log` / `attack.warnings` so nothing reaches our stdout.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from learn2defend import checkpoint as ckpt
from learn2defend.errors import UserError

from .base import Attack, _check_positive_int, _check_seed, correct_predictions, stream_seed
from .threat import LINF, ThreatModel

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
FAST_ATTACKS = ("apgd-ce", "apgd-t")
# pyautoattack's version="rand", for randomized defenses: APGD-CE and APGD-DLR, one restart,
# each step's gradient averaged over 20 draws of the model (expectation over transformation)
RAND_ATTACKS = ("apgd-ce", "apgd-dlr")
KNOWN_ATTACKS = (*STANDARD_ATTACKS, "apgd-dlr")
GRADIENT_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "apgd-dlr")
# pyautoattack's advice on a model whose outputs vary between calls, and how to follow it here
_RAND_ADVICE = "randomized defense"
RAND_HINT = "evaluate it with eval --attacks autoattack-rand (pyautoattack's version='rand': EOT over 20 draws)"
_STATE_FORMAT = "learn2defend-autoattack-1"
CHUNK = 250  # the default batch_size: pyautoattack's own default


class _Collect(logging.Handler):
    def __init__(self, lines: list[str], warned: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines, self.warned = lines, warned

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.lines.append(msg)
        if record.levelno >= logging.WARNING:
            self.warned.append(msg)


@contextlib.contextmanager
def _captured(lines: list[str], warned: list[str]) -> Iterator[None]:
    """Route AutoAttack's logger, prints and warnings into lists; restore everything."""
    logger = logging.getLogger("auto-attack")
    handler, saved = _Collect(lines, warned), (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    trace = sys.gettrace()  # its dynamic-defense check calls sys.settrace(None)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    warned.append(str(w.message))
                    lines.append(f"warning: {w.message}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        sys.settrace(trace)
        printed = out.getvalue().splitlines()
        lines.extend(printed)
        keys = ("random", "zero grad", "gradient mask", "square", "dynamic")
        warned.extend(ln for ln in printed if any(k in ln.lower() for k in keys))


def _same(key: str, saved: object, ours: object) -> bool:
    if isinstance(ours, Tensor):
        return isinstance(saved, Tensor) and torch.equal(saved, ours)
    if key == "checksum":  # sums may differ in the last bits on another device
        return all(map(math.isclose, saved, ours))
    return saved == ours


# Stages that are undefined below a number of classes (pyautoattack's DLR losses index the
# 3rd and 4th largest logits); everything else needs 2.
MIN_CLASSES = {"apgd-t": 4, "apgd-dlr": 3}


class AutoAttack(Attack):
    """AutoAttack: "standard" (APGD-CE, APGD-T, FAB-T, Square), "fast" (APGD-CE + APGD-T
    with the standard settings: 1 restart, 9 target classes) or "rand" (pyautoattack's
    version for randomized defenses: APGD-CE + APGD-DLR, 1 restart, each gradient an
    expectation over 20 draws of the model), under l-inf (default) or l2 (`norm`;
    pyautoattack's norm="L2": its L2 APGD, FAB-T and Square).

    Each call seeds pyautoattack from `seed` (the call's, else `self.seed`; the global RNG
    is restored afterwards). pyautoattack draws its random starts (APGD) and squares
    (Square) for a whole batch at once, so an image's result depends on the other images
    of its chunk: `learn2defend.correctness.attack_correct` therefore always attacks
    chunks of `batch_size` (`CHUNK`, 250) consecutive images, whatever its own batch size.
    `attack(model, x, y, state_path=p)` checkpoints to p after every attack and resumes
    from it; p must belong to this chunk (same images, labels, eps, attacks, seed).

    After a call: `warnings` (accumulated over calls, unique) holds AutoAttack's sanity
    warnings (randomized or dynamic model, zero gradients, Square succeeding where the
    gradient attacks failed, ...); `log` its progress lines; `robust` the per-sample
    flags (True = survived every attack) of the last call.
    """

    def __init__(
        self,
        eps: float,
        version: str = "standard",
        *,
        attacks: Sequence[str] | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        name: str | None = None,
        norm: str | ThreatModel | None = None,
    ) -> None:
        super().__init__(eps, norm)
        versions = {"standard": STANDARD_ATTACKS, "fast": FAST_ATTACKS, "rand": RAND_ATTACKS}
        if attacks is None:
            if version not in versions:
                raise UserError(f"unknown AutoAttack version {version!r}; use standard, fast or rand")
            attacks = versions[version]
        else:
            version = "custom"
        bad = [a for a in attacks if a not in KNOWN_ATTACKS]
        if bad or not attacks:
            raise UserError(f"AutoAttack attacks must be among {', '.join(KNOWN_ATTACKS)}")
        self.version, self.attacks, self.seed = version, tuple(attacks), _check_seed(seed)
        self.batch_size = _check_positive_int("batch_size", CHUNK if batch_size is None else batch_size)
        self.name = name or ("autoattack" if version == "standard" else f"autoattack-{version}")
        self.warnings: list[str] = []
        self.log: list[str] = []
        self.robust: Tensor | None = None
        self._state_path: Path | None = None
        self._progress: Callable[[str], None] | None = None
        self._unwritable = False  # a progress file could not be written: no more tries

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        seed: int | None = None,
        state_path: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Tensor:
        """As `Attack.__call__`; `state_path` saves progress after every stage and resumes
        from it; `progress(line)` is called after every stage with its robust count."""
        self._state_path = None if state_path is None else Path(state_path)
        self._progress = progress
        try:
            return super().__call__(model, images, labels, seed=seed)
        finally:
            self._state_path = None
            self._progress = None

    @property
    def pyautoattack_seed(self) -> int:
        """The seed given to pyautoattack in the current call: derived from the call's seed
        (the same for every AutoAttack version, so their shared stages agree)."""
        return stream_seed(self._call_seed, "autoattack") % 2**31

    def _fingerprint(self, x: Tensor, y: Tensor) -> dict:
        return {
            "format": _STATE_FORMAT,
            "eps": self.eps,
            "norm": self.threat.name,
            "attacks": list(self.attacks),
            "seed": self.pyautoattack_seed,
            "shape": list(x.shape),
            "labels": y.cpu(),
            "checksum": [float(x.double().sum()), float(x.double().square().sum())],
        }

    def _load(self, path: Path, x: Tensor, y: Tensor) -> dict | None:
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state.setdefault("norm", LINF.name)  # states written before --norm were l-inf
            same = all(_same(k, state[k], v) for k, v in self._fingerprint(x, y).items())
        except Exception as e:  # unreadable or foreign file
            raise UserError(f"cannot read AutoAttack state {path}: {e}; delete it") from e
        if not same:
            raise UserError(
                f"AutoAttack state {path} belongs to another run (other images, labels, eps, norm, "
                "attacks or seed); delete it or use another state_path"
            )
        return state

    def _save(
        self, path: Path, x: Tensor, y: Tensor, adv: Tensor, robust: Tensor, done: list[str]
    ) -> None:
        changed = (adv != x).flatten(1).any(1).nonzero().squeeze(1)
        state = self._fingerprint(x, y) | {
            "done": list(done),
            "robust": robust.cpu(),
            "changed": changed.cpu(),
            "adv": adv[changed].cpu(),
        }
        if self._unwritable:
            return
        try:  # atomic: a kill mid-save leaves the previous state
            ckpt.atomic_write(path, lambda tmp: torch.save(state, tmp), f"AutoAttack progress file {path}")
        except ckpt.WriteFailed as e:  # the evaluation goes on without it, and says so once
            self._unwritable = True
            message = f"{e}; the evaluation goes on without saving its progress (an interrupted run starts over)"
            self.warnings.append(message)

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        import pyautoattack  # heavy import, only needed here

        x, y, path = images, labels, self._state_path
        state = None if path is None else self._load(path, x, y)
        adv = x.clone()
        if state is not None:
            done, robust = list(state["done"]), state["robust"].to(x.device)
            adv[state["changed"].to(x.device)] = state["adv"].to(adv)
        else:
            done = []
            with torch.no_grad():
                preds = [correct_predictions(model(xb), yb) for xb, yb in zip(x.split(self.batch_size),
                                                                                y.split(self.batch_size), strict=True)]
            robust = torch.cat(preds) if preds else torch.zeros_like(y, dtype=torch.bool)
        lines: list[str] = []
        warned: list[str] = []
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with _captured(lines, warned), torch.random.fork_rng(devices=devices):
                aa = pyautoattack.AutoAttack(
                    model,
                    norm=self.threat.pyautoattack_norm,
                    eps=self.eps,
                    version="rand" if self.version == "rand" else "standard",
                    device=x.device,
                    seed=self.pyautoattack_seed,
                )
                # The standard 9 target classes crash APGD-T/FAB-T with fewer than 10 classes.
                n_classes = int(model(x[:1]).shape[1]) if len(x) else 10
                aa.apgd_targeted.n_target_classes = min(9, n_classes - 1)
                aa.fab.n_target_classes = min(9, n_classes - 1)
                for attack in self.attacks:
                    if attack in done:
                        continue
                    if n_classes < MIN_CLASSES.get(attack, 2):
                        warned.append(
                            f"{attack} left out: it needs at least {MIN_CLASSES[attack]} classes "
                            f"(its targeted DLR loss divides by the gap between the 1st and the 3rd/4th "
                            f"largest logits) and this model has {n_classes}; the accuracy is that of "
                            f"the other stages, {', '.join(a for a in self.attacks if a != attack)}"
                        )
                        done.append(attack)
                        continue
                    idx = robust.nonzero().squeeze(1)
                    if len(idx):
                        aa.attacks_to_run = [attack]  # one stage of AutoAttack's cascade
                        x_a, pred = aa.run_standard_evaluation(
                            x[idx], y[idx], batch_size=self.batch_size
                        )
                        broken = pred != y[idx]
                        adv[idx[broken]] = x_a[broken].to(adv)
                        robust[idx[broken]] = False
                        n_broken = int(broken.sum())
                        lines.append(
                            f"{attack}: fooled {n_broken} of {len(idx)} robust samples; "
                            f"robust {int(robust.sum())}/{len(y)}"
                        )
                        if self._progress is not None:
                            self._progress(f"{attack}: robust {int(robust.sum())}/{len(y)}")
                        if (
                            attack == "square"
                            and n_broken
                            and any(a in GRADIENT_ATTACKS for a in self.attacks)
                        ):
                            warned.append(
                                f"Square (gradient-free) fooled {n_broken} samples that the "
                                "gradient attacks did not: gradient masking is likely, the "
                                "gradient-based accuracies overestimate robustness"
                            )
                    done.append(attack)
                    if path is not None:
                        self._save(path, x, y, adv, robust, done)
        finally:
            self.log.extend(lines)
            named = [f"{w}: {RAND_HINT}" if _RAND_ADVICE in w and self.version != "rand" else w for w in warned]
            self.warnings.extend(w for w in dict.fromkeys(named) if w not in self.warnings)
        self.robust = robust.cpu()
        # AutoAttack's images are within eps up to float error; make the contract exact.
        return (x + self.threat.ball(adv - x, self.eps)).clamp(0, 1)
