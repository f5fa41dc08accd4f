"""`l2l:DIR`: the attacker network of an L2L run, used as an evaluation attack.

The attacker g was trained to fool *its* classifier; here it is applied, unchanged, to
any model with the same image shape: one forward of g (two for 2step-l2l), and for the
gradient attackers one input-gradient query of the *target* model at x, conditioned
exactly as in training (`methods.attacker_input` / `learned_perturbation`). It is an
amortized attack: cheap, and as a rule weaker than PGD, so it says little about
robustness on its own; it shows what the learned attacker has learned.

For fgsm-sdi runs the attack is the method's own point: the learned start, then its
signed-gradient steps on the target model (`methods.sdi_perturbation`). Each method's
record says which (`Method.perturbation`).

`learn2defend.attacks.make_attack` builds "l2l:DIR" names through `attack_factory`, which
its registry names and imports on first use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks import Attack, ThreatModel, threat_model
from .config import L2L_METHODS
from .errors import UserError
from .methods import METHOD_RECORDS, Method, StepContext
from .runs import load_run


class LearnedAttack(Attack):
    """delta = g(A(x)) from the attacker saved in an L2L run folder, scaled to this eps.

    The attacker's raw output goes into the ball of the run's threat model (its `squash`:
    eps * tanh per pixel under l-inf, a radial tanh under l2), with the evaluation eps in
    place of the training eps, so ||delta|| <= eps holds for any eps. The attack's norm is
    the run's: `norm`, when given, must be it (an attacker trained for one ball says
    nothing about another). Its batch norms use their
    running statistics (eval mode): the perturbation of an image must not depend on the
    other images of its batch.
    """

    def __init__(self, eps: float, run_dir: str | Path, which: str = "last",
                 norm: str | ThreatModel | None = None) -> None:
        if not str(run_dir).strip():
            raise UserError("l2l attacks need a run folder: write l2l:DIR, e.g. l2l:runs/grad-l2l")
        path = Path(run_dir).expanduser()
        if not (path / "config.json").is_file():
            # "l2l attacks need ..." also matches the registry's message for a missing loader.
            raise UserError(
                f"l2l attacks need the run folder of an L2L training run; '{run_dir}' is not a "
                "run folder (no config.json)"
            )
        run = load_run(path, which, "cpu")
        if run.attacker is None:
            raise UserError(
                f"l2l:{run_dir}: that run was trained with --method {run.config.method} and holds "
                f"no attacker network; use a run of {', '.join(L2L_METHODS)}"
            )
        trained = threat_model(run.config.norm)
        super().__init__(eps, trained if norm is None else norm)
        if self.threat is not trained:
            raise UserError(f"l2l:{run_dir} was trained under {trained.label}; its attacker maps into that ball, so "
                            f"it attacks under {trained.label} only (--norm {trained.name}), not {self.threat.label}")
        self.attacker: nn.Module = run.attacker.eval()
        for p in self.attacker.parameters():  # only input gradients are ever needed
            p.requires_grad_(False)
        # The training config decides the method (naive/grad/2step) and the gradient
        # conditioning; eps is the evaluation's.
        self.config = dataclasses.replace(run.config, eps=self.eps)
        self.image_shape = tuple(run.meta["image_shape"])
        self.method = run.config.method
        self.name = f"l2l:{run_dir}"

    @property
    def record(self) -> Method:
        """The record of the training method (naive/grad/2step L2L, FGSM-SDI), which perturbs."""
        return METHOD_RECORDS[self.method]

    def perturb(self, model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise UserError(
                f"{self.name} was trained on {list(self.image_shape)} images; it cannot attack "
                f"images of shape {list(images.shape[1:])}"
            )
        attacker = self.attacker.to(images.device)
        # A StepContext with the *target* model: learned_perturbation then queries its
        # gradients (the 2-step recurrence included) exactly as training did.
        ctx = StepContext(model=model, optimizer=None, config=self.config, attacker=attacker)  # type: ignore[arg-type]
        with torch.enable_grad():
            grad = None
            if "gradient" in self.record.attacker_sees:  # the gradient at x, as in training
                x = images.detach().requires_grad_(True)
                loss = F.cross_entropy(model(x), labels, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x)
            delta = self.record.perturbation(ctx, images, labels, grad)
        return (images + delta.detach()).clamp(0, 1)

    def __repr__(self) -> str:
        return f"LearnedAttack(name={self.name!r}, eps={self.eps:g}, method={self.method!r}{self._norm_repr()})"


def attack_factory(rest: str, eps: float, norm: str | ThreatModel | None = None, **options) -> Attack:
    """`make_attack`'s builder of "l2l:DIR" names (registered in attacks.registry by name)."""
    bad = sorted(set(options) - {"which"})
    if bad:
        raise UserError(f"l2l attacks do not take option(s) {', '.join(bad)}; they take: which")
    return LearnedAttack(eps, rest.strip(), norm=norm, **options)

