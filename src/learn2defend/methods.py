"""One training step per method, all sharing the loop in `learn2defend.train`.

Each step takes a batch of [0, 1] images, builds the images the classifier trains
on, updates the parameters and returns batch metrics as device tensors (summed over
the batch, never `.item()`-ed here: the loop reads them once per epoch).

The learned-attacker (L2L) methods play the paper's minmax game with a single
backward pass: the perturbation passes through a gradient-reversal layer on its way
into the classifier, so one `loss.backward()` gives the classifier the gradient of
the adversarial loss and the attacker its negative. Both optimizers then *minimize*,
which makes the classifier descend and the attacker ascend the same loss.

Every backward that feeds an optimizer and every optimizer step goes through
`step_optimizers`, so that under `--amp fp16` the loss scaler (`StepContext.scaler`)
covers all of them: the joint update, the alternating one and the extra attacker steps.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .attacks import correct_predictions, fgsm_delta, kl_pgd_delta, pgd_delta
from .attacks.threat import ThreatModel, threat_model
from .memory import PerturbationMemory
from .settings import ResolvedConfig

Metrics = dict[str, Tensor]
Grads = list[Tensor | None]  # one entry per classifier parameter, in optimizer order


@dataclass
class StepContext:
    """What a training step needs; built once by the training loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: ResolvedConfig  # the run's: every default filled in, grouped (learn2defend.config)
    attacker: nn.Module | None = None
    attacker_optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None  # --amp fp16 (learn2defend.speed)
    step_index: int = 0  # global batches trained before this one (the loop sets it): --attacker-every
    batches_per_epoch: int = 0  # steps of one epoch (the loop sets it; 0 outside a training loop, e.g. bench)
    # A method's state besides its networks (liet: its class-wise starts), on the step's device;
    # the loop checkpoints it and puts it back on resume, so a resumed run computes what an
    # uninterrupted one would.
    state: dict[str, Tensor] = field(default_factory=dict)
    # Methods with a per-image memory (their record's `per_image_memory`): the loop makes the
    # memory and sets, before each step, the batch's indices in the training split (int64 [B]).
    memory: PerturbationMemory | None = None
    indices: Tensor | None = None

    @property
    def threat(self) -> ThreatModel:
        """The run's threat model (--norm): its projection, step direction and attacker head."""
        return threat_model(self.config.norm)

    @property
    def attacker_due(self) -> bool:
        """Whether the attacker is updated on this batch (every --attacker-every batches)."""
        return self.step_index % self.config.attacker.every == 0


# ---- shared pieces -------------------------------------------------------------------


def update(ctx: StepContext, loss: Tensor, clean_grads: Grads | None = None, attacker: bool = True) -> None:
    """One backward and one step of every optimizer that has gradients to apply.

    `clean_grads`: the classifier's gradients of the clean term, when
    `clean_forward_with_grad` already took them; they are added before the step.
    `attacker`: False leaves the attacker out (a batch it does not learn from).
    """
    optimizers = [ctx.optimizer] + ([ctx.attacker_optimizer] if ctx.attacker_optimizer and attacker else [])
    step_optimizers(ctx, loss, optimizers, clean_grads)


def step_optimizers(ctx: StepContext, loss: Tensor, optimizers: list[torch.optim.Optimizer],
                    clean_grads: Grads | None = None) -> None:
    """Backward of `loss` into the parameters of `optimizers` (only theirs), then a step of each.

    `clean_grads` (classifier parameters) are added before the step. Under fp16 the loss
    is multiplied by the scaler's factor first, so that small gradients survive the
    half-precision backward; the scaler divides them again in its `step`, skips the step
    if any overflowed, and adapts the factor in `update`. (There are no `clean_grads`
    then: `clean_forward_with_grad` leaves the clean term to this scaled backward.)
    """
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    params = [p for opt in optimizers for p in _params(opt)]
    scaler = ctx.scaler
    (loss if scaler is None else scaler.scale(loss)).backward(inputs=params)  # inputs=: no gradient for the images
    _add_grads(_params(ctx.optimizer), clean_grads)
    for opt in optimizers:
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
    if scaler is not None:
        scaler.update()


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _add_grads(params: list[Tensor], grads: Grads | None) -> None:
    if grads is None:
        return
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


def mixed_loss(ctx: StepContext, logits_adv: Tensor, y: Tensor, logits_clean: Tensor | None) -> Tensor:
    """(1 - w) * CE(adversarial) + w * CE(clean), Kurakin et al.'s clean-batch trick; both
    cross-entropies with --label-smoothing (the training loss only: attacks use plain CE)."""
    w, smoothing = ctx.config.loss.clean_weight, ctx.config.loss.label_smoothing
    loss = F.cross_entropy(logits_adv, y, label_smoothing=smoothing)
    if w:
        loss = (1 - w) * loss + w * F.cross_entropy(logits_clean, y, label_smoothing=smoothing)
    return loss


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, back in its previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batch_metrics(loss: Tensor, logits: Tensor, y: Tensor, adversarial: bool) -> Metrics:
    correct = correct_predictions(logits, y).sum()
    metrics = {"loss": loss.detach() * len(y), "correct": correct}
    if adversarial:
        metrics["attack_success"] = len(y) - correct
    return metrics


def clean_forward_with_grad(
    ctx: StepContext, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Grads | None]:
    """Logits of the clean batch (detached), the input gradient of its summed loss and,
    when the clean loss is trained on (clean_weight w > 0), the classifier's gradients of
    its share w * CE(clean): one forward and one backward serve the attack and the clean
    term.

    Taking the weight gradients here, together with the input gradient, walks the clean
    graph back once instead of twice (once for the attack, again in the final backward)
    and frees it before the adversarial forward: an FGSM step costs ~6 classifier forwards
    instead of ~7 (measured ~15 % faster; docs/performance.md).
    """
    x = x.detach().requires_grad_(True)
    logits = ctx.model(x)
    loss = F.cross_entropy(logits, y, reduction="sum")
    w = ctx.config.loss.clean_weight
    if not w:  # input gradient only
        (grad,) = torch.autograd.grad(loss, x)
        return logits.detach(), grad, None
    if ctx.scaler is not None or ctx.config.loss.label_smoothing:
        # fp16: the weight gradients of the clean term come from the final backward, where
        # the loss is scaled (this backward is not: its input gradient feeds the attack, and
        # a scaled one could overflow into it); one more backward of the clean graph.
        # --label-smoothing: the clean term is trained on the smoothed cross-entropy, while
        # the attack follows the plain one; they differ, so the same.
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        return logits, grad, None
    grad, *param_grads = torch.autograd.grad(loss, [x, *_params(ctx.optimizer)], allow_unused=True)
    scale = w / len(y)  # gradient of w * mean CE from that of the summed CE
    return logits.detach(), grad, [None if g is None else g.mul_(scale) for g in param_grads]


# ---- hand-designed attacks ---------------------------------------------------------------


def plain_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    logits = ctx.model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=ctx.config.loss.label_smoothing)
    update(ctx, loss)
    return batch_metrics(loss, logits, y, adversarial=False)


def fgsm_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    eps, a = ctx.config.eps, ctx.config.attack
    clean_grads = None
    if a.random_start:  # FGSM-RS (Wong et al. 2020): the gradient is taken at a random point
        delta = fgsm_delta(ctx.model, x, y, eps, step_size=a.step_size, random_start=True, norm=ctx.threat)
        logits_clean = ctx.model(x) if ctx.config.loss.clean_weight else None
    else:  # the gradient at x comes from the clean forward we train on anyway
        logits_clean, grad, clean_grads = clean_forward_with_grad(ctx, x, y)
        delta = ctx.threat.ball(a.step_size * ctx.threat.direction(grad), eps)
    logits = ctx.model((x + delta).clamp(0, 1))
    loss = mixed_loss(ctx, logits, y, logits_clean)
    update(ctx, loss, clean_grads)
    return batch_metrics(loss, logits, y, adversarial=True)


def pgd_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """The paper's PGM net: PGD from zero (or --random-start), step eps/3, clean weight 0.5.
    The attack sees the classifier in train mode (batch statistics), as it always has here."""
    a = ctx.config.attack
    delta = pgd_delta(
        ctx.model, x, y, ctx.config.eps, steps=a.pgd_steps, step_size=a.step_size, random_start=a.random_start,
        norm=ctx.threat,
    )
    return _train_on(ctx, x, y, delta)


def pgd_at_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """Madry et al. 2018: PGD-10 from a uniform random start, step eps/4 (their 2/255 at
    8/255), trained on the adversarial loss only (clean weight 0 by default).

    The attack runs with the classifier in eval mode, as MadryLab's `robustness` library
    does (AttackerModel switches to eval for the attack) and TRADES' and MART's reference
    code do: batch norm then normalizes with its running statistics and the ten attack
    forwards leave those untouched. (locuslab/robust_overfitting attacks in train mode.)
    """
    a = ctx.config.attack
    with eval_mode(ctx.model):
        delta = pgd_delta(ctx.model, x, y, ctx.config.eps, steps=a.pgd_steps, step_size=a.step_size, random_start=True,
                          norm=ctx.threat)
    return _train_on(ctx, x, y, delta)


def _train_on(ctx: StepContext, x: Tensor, y: Tensor, delta: Tensor) -> Metrics:
    """One update on mixed_loss at x + delta (adversarial forward first, then the clean one)."""
    logits = ctx.model(x + delta)
    logits_clean = ctx.model(x) if ctx.config.loss.clean_weight else None
    loss = mixed_loss(ctx, logits, y, logits_clean)
    update(ctx, loss)
    return batch_metrics(loss, logits, y, adversarial=True)


# ---- TRADES and MART: a clean term plus beta x a KL term ------------------------------------


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float,
                label_smoothing: float = 0.0) -> Tensor:
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(p(x) || p(x')), the KL summed over classes
    and averaged over the batch (the reference's sum / batch size). The gradient flows
    through both distributions, as in the reference code."""
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_clean, dim=1),
                  reduction="batchmean", log_target=True)
    return F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing) + beta * kl


def mart_loss(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float,
              label_smoothing: float = 0.0) -> Tensor:
    """Wang et al. 2020: boosted CE at x' plus beta * KL(p(x) || p(x')) weighted per image
    by 1 - p_y(x), averaged over the batch, computed as MART's reference code computes it
    (github.com/YisenWang/MART, mart.py).

    Boosted CE = CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x')): the margin term pushes the
    strongest wrong class down (the 1.0001 keeps its log finite). The KL takes the log of the
    adversarial probabilities as log(p(x') + 1e-12), as the reference does: each class's
    -log p_k(x') is capped at 27.6 nats and passes no gradient once p_k(x') is far below
    1e-12, which bounds the term on a confident net (a log-softmax has neither bound: a
    prediction flipped between logits 40 apart gives 40 nats there, 27.6 here). The weight is
    1.0000001 - p_y(x), not detached (the reference detaches neither it nor p(x)).
    """
    p_adv = F.softmax(logits_adv, dim=1)
    strongest_wrong = p_adv.scatter(1, y[:, None], 0.0).amax(dim=1)
    boosted_ce = (F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)
                  - torch.log(1.0001 - strongest_wrong).mean())
    p_clean = F.softmax(logits_clean, dim=1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(dim=1)
    misclassified = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted_ce + beta * (kl * misclassified).mean()


def trades_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """x' from 10 steps of PGD on the KL (0.001 Gaussian start), the attack in eval mode as
    in TRADES' reference code; then one update on trades_loss in train mode."""
    a = ctx.config.attack
    with eval_mode(ctx.model):
        delta = kl_pgd_delta(ctx.model, x, ctx.config.eps, steps=a.pgd_steps, step_size=a.step_size, start_std=0.001,
                             norm=ctx.threat)
    return _kl_update(ctx, x, y, delta, trades_loss)


def mart_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """x' from 10 steps of PGD on CE (0.001 Gaussian start), the attack in eval mode as in
    MART's reference code; then one update on mart_loss in train mode."""
    a = ctx.config.attack
    with eval_mode(ctx.model):
        delta = pgd_delta(ctx.model, x, y, ctx.config.eps, steps=a.pgd_steps, step_size=a.step_size, start_std=0.001,
                          norm=ctx.threat)
    return _kl_update(ctx, x, y, delta, mart_loss)


def _kl_update(ctx: StepContext, x: Tensor, y: Tensor, delta: Tensor,
               loss_fn: Callable[..., Tensor]) -> Metrics:
    logits_clean = ctx.model(x)
    logits_adv = ctx.model(x + delta)
    loss = loss_fn(logits_clean, logits_adv, y, ctx.config.loss.beta, ctx.config.loss.label_smoothing)
    update(ctx, loss)
    return batch_metrics(loss, logits_adv, y, adversarial=True)


# ---- learned attackers -------------------------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def reverse_gradient(x: Tensor, scale: float = 1.0) -> Tensor:
    return _ReverseGradient.apply(x, scale)


def condition_gradient(grad: Tensor, mode: str) -> Tensor:
    """Bring the raw input gradient to a fixed scale before the attacker sees it.

    Raw gradients are tiny (1e-4..1e-2) and their scale drifts as the classifier
    trains, which a network with batch norm on its input tolerates badly. "sample"
    divides each image's gradient by its own largest magnitude (values in [-1, 1],
    direction kept per sample); "batch" divides by the largest magnitude over the
    whole batch (the authors' code); "sign" keeps only the sign, FGSM's direction.
    """
    if mode == "sample":
        return grad / grad.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    if mode == "batch":
        return grad / grad.abs().amax().clamp_min(1e-12)
    if mode == "sign":
        return grad.sign()
    return grad


def attacker_input(ctx: StepContext, x: Tensor, grad: Tensor | None) -> Tensor:
    if grad is None:  # naive attacker: the image alone
        return x
    return torch.cat([x, condition_gradient(grad, ctx.config.attacker.grad_norm)], dim=1)


def run_attacker(g: nn.Module, a: Tensor, eps: float | Tensor, threat: ThreatModel) -> Tensor:
    """The attacker `g` on its input `a` [B, C_in, H, W]: a perturbation [B, C, H, W] in the
    eps-ball of `threat`. Under the default threat model (l-inf, an attacker's own ball) it is called as
    g(a, eps), the contract user-registered attackers were written for; under another
    threat model as g(a, eps, threat.squash)."""
    return g(a, eps) if threat is threat_model(None) else g(a, eps, threat.squash)


def learned_perturbation(
    ctx: StepContext, x: Tensor, y: Tensor, grad_at_x: Tensor | None
) -> Tensor:
    """delta = g(A(x)) for naive/grad L2L; the paper's length-two recurrence for 2-step.

    The gradients fed to the attacker are constants (detached): the attacker learns
    from how its output changes the classifier's loss, not through the gradient query.
    The attacker's raw output goes into the run's ball through the threat model's `squash`
    (l-inf: eps * tanh per pixel; l2: eps * tanh(||h||) h / ||h|| per image).
    """
    c, g, threat = ctx.config, ctx.attacker, ctx.threat
    delta = run_attacker(g, attacker_input(ctx, x, grad_at_x), c.eps, threat)
    if c.method == "2step-l2l":  # the recurrence of length two (paper, section 3.1)
        x1 = (x + delta).clamp(0, 1)
        x1_query = x1.detach().requires_grad_(True)
        loss1 = F.cross_entropy(ctx.model(x1_query), y, reduction="sum")
        (grad1,) = torch.autograd.grad(loss1, x1_query)
        delta = threat.ball(delta + run_attacker(g, attacker_input(ctx, x1, grad1), c.eps, threat), c.eps)
    return delta


def _extra_attacker_updates(ctx: StepContext, x: Tensor, y: Tensor, grad: Tensor | None) -> None:
    """Attacker-only ascent steps (--attacker-steps > 1), classifier weights untouched."""
    for _ in range(ctx.config.attacker.steps - 1):
        delta = learned_perturbation(ctx, x, y, grad)
        loss = F.cross_entropy(ctx.model((x + delta).clamp(0, 1)), y)
        step_optimizers(ctx, -loss, [ctx.attacker_optimizer])  # descending -CE ascends CE


def l2l_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    c = ctx.config
    if METHOD_RECORDS[c.method].attacker_sees == "image":  # naive: no gradient query
        grad = clean_grads = None
        logits_clean = ctx.model(x) if c.loss.clean_weight else None
    else:
        logits_clean, grad, clean_grads = clean_forward_with_grad(ctx, x, y)
    if c.attacker.steps > 1 and ctx.attacker_due:
        _extra_attacker_updates(ctx, x, y, grad)
    delta = learned_perturbation(ctx, x, y, grad)

    if c.attacker.update == "alternating":
        return _alternating_update(ctx, x, y, delta, logits_clean, clean_grads)

    # The clean term does not depend on the attacker, so the attacker's gradient is
    # (1 - w) * dL_adv/dphi; the reversal scale undoes that factor.
    scale = 1.0 / (1.0 - c.loss.clean_weight)
    logits = ctx.model((x + _toward_attacker(ctx, delta, scale)).clamp(0, 1))
    loss = mixed_loss(ctx, logits, y, logits_clean)
    update(ctx, loss, clean_grads, attacker=ctx.attacker_due)
    return batch_metrics(loss, logits, y, adversarial=True)


def _toward_attacker(ctx: StepContext, delta: Tensor, scale: float) -> Tensor:
    """delta with its gradient reversed into the attacker on the batches the attacker learns
    from (--attacker-every); detached on the others, so no backward reaches the attacker."""
    return reverse_gradient(delta, scale) if ctx.attacker_due else delta.detach()


def _alternating_update(
    ctx: StepContext, x: Tensor, y: Tensor, delta: Tensor, logits_clean: Tensor | None,
    clean_grads: Grads | None = None,
) -> Metrics:
    """The authors' public code: classifier step on the detached perturbation, then an
    attacker step on -CE with the classifier's batch norm frozen (eval mode)."""
    logits = ctx.model((x + delta.detach()).clamp(0, 1))
    loss = mixed_loss(ctx, logits, y, logits_clean)
    step_optimizers(ctx, loss, [ctx.optimizer], clean_grads)

    if ctx.attacker_due:
        with eval_mode(ctx.model):
            attacker_loss = -F.cross_entropy(ctx.model((x + delta).clamp(0, 1)), y)
            step_optimizers(ctx, attacker_loss, [ctx.attacker_optimizer])
    return batch_metrics(loss, logits, y, adversarial=True)


# ---- learned start + signed-gradient steps (FGSM-SDI) and N-FGSM -------------------------


def fgsm_sdi_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """FGSM-SDI (Jia et al. 2022, "Boosting Fast Adversarial Training with Learnable
    Adversarial Initialization", section 3): a learned, per-image start, then FGSM from it.

    1. the clean input gradient g at x (one forward and input backward);
    2. the start delta0 = g_phi([x, sign g]) = eps * tanh(.), inside the eps-ball;
    3. --pgd-steps signed-gradient steps of --step-size from delta0 (default one step of eps),
       each projected to the eps-ball and to [0, 1]: x' = x + delta;
    4. the classifier descends CE(f(x'), y) (with --label-smoothing); the attacker ascends the
       same loss through its start (the steps' signs are constants; the projection passes the
       gradient where it does not clip), every --attacker-every batches.

    As the authors' code (github.com/jiaxiaojunQAQ/FGSM-SDI): the attacker's input is the image
    and the sign of the clean gradient; its output is eps * tanh; Adam at 1e-3 updates it every
    K batches (their --att_num 20; the default here is 5, measured). Where this differs:
    - one backward serves both networks (the gradient-reversal layer of the L2L methods), where
      their attacker update is a separate forward on every K-th batch, with the attacker in
      train mode there and in eval mode for the classifier's batches; here it stays in train mode;
    - x' is clipped to [0, 1] (their code, in normalized space, does not clip);
    - label smoothing is an option (--label-smoothing, their factor 0.9 is 0.111 here), not
      built in, so that every method can be compared with and without it;
    - their Adam also decays the attacker's weights (5e-4); here --attacker-weight-decay (0).
    """
    logits_clean, grad, clean_grads = clean_forward_with_grad(ctx, x, y)
    with torch.set_grad_enabled(ctx.attacker_due):  # no attacker graph on the batches it skips
        delta = sdi_perturbation(ctx, x, y, grad)
    logits = ctx.model(x + _toward_attacker(ctx, delta, 1.0 / (1.0 - ctx.config.loss.clean_weight)))
    loss = mixed_loss(ctx, logits, y, logits_clean)
    update(ctx, loss, clean_grads, attacker=ctx.attacker_due)
    return batch_metrics(loss, logits, y, adversarial=True)


def sdi_perturbation(ctx: StepContext, x: Tensor, y: Tensor, grad: Tensor) -> Tensor:
    """FGSM-SDI's point: the learned start g([x, sign grad]) in the eps-ball, then --pgd-steps
    signed-gradient steps of --step-size from it, each projected to the ball and to [0, 1].
    Returns delta [B, C, H, W] (x + delta in [0, 1], ||delta|| <= eps), with the attacker's graph
    through the start; the steps' directions are constants. `grad`: the clean input gradient.
    Under l2 the start is the attacker's output mapped into the l2 ball (the threat model's
    `squash`), the steps go along g / ||g||; the attacker still sees sign(grad), its input
    feature in the authors' code, under both norms."""
    eps, a, threat = ctx.config.eps, ctx.config.attack, ctx.threat
    start = run_attacker(ctx.attacker, torch.cat([x, grad.sign()], dim=1), eps, threat)
    delta = threat.project(start, x, eps)  # into [0, 1] too: the first query must see a real image
    for _ in range(a.pgd_steps):
        query = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(x + query), y, reduction="sum"), query)
        delta = threat.project(delta + a.step_size * threat.direction(g), x, eps)
    return delta


def n_fgsm_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """N-FGSM (de Jorge et al. 2022, "Make Some Noise", Algorithm 1): uniform noise in
    [-noise, noise] (default 2 eps), one FGSM step of --step-size (default eps) from the noisy
    point, and no projection back to the eps-ball: |x' - x| <= noise + step (3 eps), then
    clipped to [0, 1]. As their code, the noisy point is clipped to [0, 1] before the query."""
    a = ctx.config.attack
    noisy = (x + torch.empty_like(x).uniform_(-a.noise, a.noise)).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(noisy), y, reduction="sum"), noisy)
    x_adv = (noisy.detach() + a.step_size * g.sign()).clamp(0, 1)
    return _train_on(ctx, x, y, x_adv - x)


# ---- LIET: class-wise starts, shared by every image of a class -----------------------------

# The share of a start's pixels replaced by uniform noise is drawn per batch in this range
# (the authors' CIFAR-10 8/255 config: min_mask_ratio 0.1, max_mask_ratio 0.5).
LIET_MASK_RATIO = (0.1, 0.5)
LIET_STATE = "liet_class_starts"  # its key in StepContext.state (and in checkpoints' method_state)


def liet_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """LIET ("Mitigating Catastrophic Overfitting in Fast Adversarial Training via Label
    Information Elimination", ICCV 2025; the authors' code, github.com/fzjcdt/LIET main.py,
    and its copy in the fast-AT benchmark, fzjcdt/FastAT_Benchmark fast_at/liet.py):

    1. every --start-every batches of an epoch (the 1st, the K+1st, ...; default 20), the
       class-wise starts: one input gradient of CE(f(g), k) at the constant grey image g (0.5
       everywhere) per class k, the classifier in eval mode; start_k = eps * sign(grad)
       (`liet_class_starts`); kept in ctx.state, checkpointed, and rank 0's under torchrun;
    2. each image takes its class's start; a share r of its pixels, r ~ U(0.1, 0.5) drawn once
       per batch, is replaced by uniform noise in [-eps, eps]; the whole batch's perturbation
       is negated with probability 1/2; x0 = clip(x +- delta, 0, 1), inside the eps-ball
       (`liet_start`);
    3. one signed-gradient step of --step-size (eps) from x0, the gradient taken in train
       mode, projected to the eps-ball around x and to [0, 1]: x';
    4. loss = CE(f(x'), y) (with --label-smoothing; --clean-weight mixes in the clean CE) +
       lambda_e * JS(p(x0), p(x')), the Jensen-Shannon divergence between the predictions at
       the start and at the final point, the gradient flowing through both; lambda_e =
       --js-weight * (e + 1) / epochs in epoch e (0-based): linear growth to --js-weight
       (default 100) in the last epoch (`liet_js_weight`).

    Where this differs from the authors' code:
    - the gradient queries (class-wise and at x0) use plain cross-entropy, as every attack here
      does; theirs use the training loss, label smoothing 0.6 with random off-class mass (here
      --label-smoothing, uniform, applies to the training CE only, off by default);
    - above 8/255 their code draws the noise in [-2 eps, 2 eps] and does not project x' back to
      the eps-ball (and their 16/255 config uses mask ratios in [0, 1], lambda 20, smoothing 0.4
      and K 10 on CIFAR-10); here the start and x' always stay in the eps-ball at every eps, with
      the 8/255 config's settings;
    - the JS term is computed from log-softmaxes (finite where a probability underflows; theirs
      takes the log of the clamped mixture);
    - their refresh also accumulates the query's weight gradients, which their next zero_grad
      drops: here the query takes input gradients only.
    l-inf only (per-pixel signed starts and noise). Under --compile the step's forwards run
    eagerly (the start's graph is taken backward twice). Cost: 7 classifier forwards per image
    (`_liet_forwards`), 0.30x PGD-AT's.
    """
    eps, threat = ctx.config.eps, ctx.threat
    # The start's forward (train mode) keeps its graph for the JS term: two backwards through it,
    # which a compiled backward refuses (donated buffers), and a compiled forward's batch-norm
    # updates in between would invalidate it; so under --compile LIET's step runs eagerly.
    model = _eager(ctx.model)
    x0 = liet_start(ctx, x, y).requires_grad_(True)
    logits_start = model(x0)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_start, y, reduction="sum"), x0, retain_graph=True)
    delta = threat.project(x0.detach() - x + ctx.config.attack.step_size * threat.direction(g), x, eps)
    logits = model(x + delta)
    logits_clean = model(x) if ctx.config.loss.clean_weight else None
    loss = mixed_loss(ctx, logits, y, logits_clean) + liet_js_weight(ctx) * js_divergence(logits_start, logits)
    update(ctx, loss)
    return batch_metrics(loss, logits, y, adversarial=True)


# ---- a remembered start (FGSM-PGI) ----------------------------------------------------------


def fgsm_pgi_step(ctx: StepContext, x: Tensor, y: Tensor) -> Metrics:
    """FGSM-PGI (Jia et al., ECCV 2022, "Prior-Guided Adversarial Initialization for Fast
    Adversarial Training"): each image starts from the perturbation its last visit left.

    With a per-image memory (`StepContext.memory`, rows = the batch's `StepContext.indices`):
    1. start delta0 = the image's remembered perturbation, projected to the eps-ball and to
       [0, 1] for this view of the image;
    2. one forward at x + delta0 and the input gradient g of its cross-entropy;
    3. the momentum m <- g / ||g||_1 + --pgi-decay (0.3) x m, the L1 norm over the whole
       batch, as in the authors' code;
    4. the training point delta = proj(delta0 + --step-size (eps) x sign g), and the next
       visit's start proj(delta0 + --step-size x sign m): both written back with m;
    5. the classifier descends CE(f(x + delta), y) (with --label-smoothing) + --pgi-lambda (10)
       x MSE(f(x + delta), f(x + delta0)), the mean squared difference of the logits, its
       gradient flowing through both forwards (the start's graph is kept for it).
    The memory starts at eps x sign(noise), a random corner of the ball, momentum 0, and is
    reset so every --pgi-reset (40) epochs (`pgi_epoch_start`).

    Cost: 7 classifier forwards per image (query forward, input backward, training forward,
    a backward through both forwards), 0.30x PGD-AT's 23; memory 2 x N x C x H x W floats
    on the training device (learn2defend.memory).

    As the authors' code (github.com/jiaxiaojunQAQ/FGSM-PGI, FGSM_MEP.py) and the FastAT
    benchmark's transcription (fzjcdt/FastAT_Benchmark, fast_at/fgsm_pgi.py): step eps from the
    remembered start, the batch-wide L1 normalisation, decay 0.3, lambda 10, reset every 40
    epochs, the MSE on logits. Where this differs:
    - the gradient query takes the plain cross-entropy (every attack here does); theirs takes
      the label-smoothed training loss. Without --label-smoothing the two are the same;
    - the remembered start is projected to [0, 1] for the current view before the query (the
      benchmark clips x + delta0 to [0, 1] for the query only, the authors' normalized-space
      code not at all); both then clip the training point to the ball and to [0, 1];
    - label smoothing is an option (--label-smoothing), not built in: the authors' factor 0.6
      is 0.444 here, the benchmark uses 0.4;
    - under --norm l2 the same recipe with the l2 threat model's pieces: the start is a random
      point on the sphere of radius eps, the steps go along g / ||g||_2 and m / ||m||_2, and
      the projection is onto the l2 ball (the authors define it for l-inf only);
    - under torchrun the rows are merged across ranks at epoch ends and checkpoints
      (learn2defend.memory) and the L1 norm is over each rank's batch; the authors train in
      one process (DataParallel), their norm over the whole batch.
    As theirs, the memory follows the image index, not the augmentation: a random crop or flip
    of the image gets the perturbation of its last view unmoved.
    """
    eps, a, threat = ctx.config.eps, ctx.config.attack, ctx.threat
    memory, idx = _pgi_rows(ctx, x)
    remembered, momentum = memory.read(idx)
    start = threat.project(remembered, x, eps).requires_grad_(True)
    logits_start = ctx.model(x + start)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_start, y, reduction="sum"), start, retain_graph=True)
    g = g.float()
    momentum = g / g.abs().sum().clamp_min(torch.finfo(g.dtype).tiny) + a.pgi_decay * momentum
    start = start.detach()
    delta = threat.project(start + a.step_size * threat.direction(g), x, eps)
    memory.write(idx, threat.project(start + a.step_size * threat.direction(momentum), x, eps), momentum)
    logits = ctx.model(x + delta)
    logits_clean = ctx.model(x) if ctx.config.loss.clean_weight else None
    loss = mixed_loss(ctx, logits, y, logits_clean) + ctx.config.loss.pgi_lambda * F.mse_loss(
        logits.float(), logits_start.float())
    update(ctx, loss)
    return batch_metrics(loss, logits, y, adversarial=True)


def _eager(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (its OptimizedModule keeps it as `_orig_mod`), else `model`."""
    return getattr(model, "_orig_mod", model)


def liet_start(ctx: StepContext, x: Tensor, y: Tensor) -> Tensor:
    """LIET's starting point x0 [B, C, H, W] for images x with labels y: each image's class-wise
    start (refreshed here on the batches due, `liet_refresh_due`), a per-batch random share of
    its pixels replaced by uniform noise in [-eps, eps], a random sign for the whole batch,
    clipped to [0, 1]; |x0 - x| <= eps. Random draws on x's device, no host sync."""
    if liet_refresh_due(ctx) or LIET_STATE not in ctx.state:
        ctx.state[LIET_STATE] = liet_class_starts(ctx, x)
    eps, (low, high) = ctx.config.eps, LIET_MASK_RATIO
    delta = ctx.state[LIET_STATE].to(x.dtype)[y]
    ratio = low + (high - low) * torch.rand((), device=x.device)
    replaced = torch.rand_like(x) < ratio
    delta = torch.where(replaced, torch.empty_like(x).uniform_(-eps, eps), delta)
    sign = torch.where(torch.rand((), device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
    return (x + sign * delta).clamp(0, 1).detach()


def liet_refresh_due(ctx: StepContext) -> bool:
    """Whether this batch refreshes the class-wise starts: every --start-every batches of an
    epoch, counted from its first batch (as the authors' `idx % li_update == 0`)."""
    within = ctx.step_index % ctx.batches_per_epoch if ctx.batches_per_epoch else ctx.step_index
    return within % ctx.config.attack.start_every == 0


def liet_js_weight(ctx: StepContext) -> float:
    """The JS term's weight in this step's epoch e (0-based): --js-weight * (e + 1) / epochs."""
    c = ctx.config
    epoch = ctx.step_index // ctx.batches_per_epoch if ctx.batches_per_epoch else 0
    return c.loss.js_weight * min(epoch + 1, c.epochs) / c.epochs


@torch.no_grad()
def liet_class_starts(ctx: StepContext, like: Tensor) -> Tensor:
    """The class-wise starts [K, C, H, W]: row k = eps * sign of the input gradient of CE(f(g), k)
    at the grey image g (0.5 everywhere; C, H, W those of `like`), the classifier in eval mode
    (running batch-norm statistics, left untouched). K, the number of classes, is read from the
    classifier's output. The grey images go through in chunks of at most --batch-size. Under
    torchrun every rank takes rank 0's (ranks' batch-norm statistics differ between syncs)."""
    c, h, w = like.shape[1:]
    grey = like.new_full((1, c, h, w), 0.5)
    chunks, model = [], _eager(ctx.model)  # as the step: eager under --compile
    with eval_mode(model):
        classes = ctx.state[LIET_STATE].shape[0] if LIET_STATE in ctx.state else model(grey).shape[1]
        labels = torch.arange(classes, device=like.device)
        for first in range(0, classes, ctx.config.batch_size):
            k = labels[first:first + ctx.config.batch_size]
            query = grey.expand(len(k), c, h, w).clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(F.cross_entropy(model(query), k, reduction="sum"), query)
            chunks.append(g.sign())
    starts = ctx.config.eps * torch.cat(chunks).float()
    distributed.broadcast_tensors([starts])
    return starts


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence between softmax(logits_p) and softmax(logits_q) [B, K], in
    nats, averaged over the batch: (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2. In float32
    from log-softmaxes, so finite where a probability underflows; the gradient flows into both."""
    log_p, log_q = F.log_softmax(logits_p.float(), dim=1), F.log_softmax(logits_q.float(), dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=1)
    return ((kl_pm + kl_qm) / 2).mean()


def _liet_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # the start's forward (its graph kept for the JS term) and input backward, the final forward,
    # one backward through both graphs; the clean term's forward and backward. Left out: the
    # class-wise query every K batches, 2 x classes forwards for the whole batch (10 classes,
    # K 20, batch 128: 0.008 forwards per image).
    return 7.0 + 3 * _w(c), 0.0


def _pgi_rows(ctx: StepContext, x: Tensor) -> tuple[PerturbationMemory, Tensor]:
    """The step's memory and the batch's rows in it. Without a training loop around the step
    (bench, a direct call) the batch is taken for the whole set: a memory of len(x) rows,
    made at the first call and started as the loop starts it."""
    if ctx.memory is None:
        ctx.memory = PerturbationMemory(len(x), tuple(x.shape[1:]), x.device)
        pgi_epoch_start(ctx, 0)
    if ctx.indices is None:
        return ctx.memory, torch.arange(len(x), device=x.device)
    return ctx.memory, ctx.indices


def pgi_epoch_start(ctx: StepContext, epoch: int) -> None:
    """At the start of epoch `epoch` (0-based; the loop calls it before the epoch's first
    batch): every --pgi-reset epochs, the memory back to its start, each row eps x sign(noise)
    under l-inf (a random corner of the ball, the authors' eps x sign(uniform)), eps x
    noise / ||noise||_2 under l2, momentum zero. The noise comes from a generator seeded by
    (--seed, epoch) on the CPU, so the start is the same on any device and rank, and on resume."""
    if epoch % ctx.config.attack.pgi_reset:
        return
    memory = ctx.memory
    gen = torch.Generator().manual_seed(ctx.config.run.seed * 1_000_003 + epoch)
    noise = torch.randn(memory.delta.shape, generator=gen).to(memory.delta.device)
    memory.reset(ctx.config.eps * ctx.threat.direction(noise))


# ---- the method records ------------------------------------------------------------------


@dataclass(frozen=True)
class Default:
    """A method's default for a config field left at None: `value(config)`, where config is
    the learn2defend.config.TrainConfig being resolved (eps already filled in)."""

    value: Callable[[Any], Any]
    text: str  # for --help, e.g. "eps/4"


@dataclass(frozen=True)
class Method:
    """Everything that makes a training method what it is; config, the CLI, bench, the
    run folder and the l2l: attack all read it from here (`METHOD_RECORDS`).

    attacker_sees: "" (no attacker), "image" or "image+gradient" (channels: 1x or 2x the image's).
    perturbation: for methods with an attacker, the perturbation it makes (used by `l2l:DIR`).
    defaults: config fields left at None and what they become for this method.
    options: the method-specific options (config field names) it takes; giving one of them to
    another method is an error.
    forwards: (classifier forwards, attacker forwards) per image of an average step: the MAC
    cost model (learn2defend.bench.step_forwards). A backward costs 2 forwards (input and
    weight gradients), 1 when only input gradients are taken.
    colour, marker: how every figure draws the method (a matplotlib colour and filled marker;
    `method_styles`); "" takes the first of STYLE_COLOURS / STYLE_MARKERS no record holds.
    """

    name: str
    step: Callable[[StepContext, Tensor, Tensor], Metrics]
    help: str
    forwards: Callable[[ResolvedConfig], tuple[float, float]]
    attacker_sees: str = ""
    # The learned attack alone, perturbation(ctx, x, y, grad at x or None) -> delta: what the
    # `l2l:DIR` evaluation attack applies to another model.
    perturbation: Callable[[StepContext, Tensor, Tensor, Tensor | None], Tensor] | None = None
    defaults: dict[str, Default] = field(default_factory=dict)
    options: frozenset[str] = frozenset()
    # Threat models (learn2defend.attacks.threat names) the method has no form for, each with
    # the reason; training under one of them is refused before anything is written.
    unsupported_norms: dict[str, str] = field(default_factory=dict)
    colour: str = ""
    marker: str = ""
    # A per-image memory (learn2defend.memory): the loop makes one for the training split,
    # passes each batch's indices (StepContext.indices), checkpoints it and merges it across
    # ranks; `epoch_start(ctx, epoch)` runs before each epoch's first batch.
    per_image_memory: bool = False
    epoch_start: Callable[[StepContext, int], None] | None = None

    @property
    def has_attacker(self) -> bool:
        return bool(self.attacker_sees)


_L2L = frozenset({"attacker_every", "attacker_steps"})
_PAPER_L2L = _L2L | {"l2l_update"}


def _eps_times(k: float, text: str) -> Default:
    return Default(lambda c: k * c.eps, text)


def _w(c: ResolvedConfig) -> float:
    return 1.0 if c.loss.clean_weight else 0.0


def _split_clean(c: ResolvedConfig) -> float:
    """An input backward more when the clean term's weight gradients cannot come with the
    gradient query (methods.clean_forward_with_grad: fp16 or label smoothing)."""
    return 1.0 if (c.speed.amp == "fp16" or c.loss.label_smoothing) and c.loss.clean_weight else 0.0


def _fgsm_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # FGSM-RS queries at a random point, so the clean term needs its own pass
    return (5.0 + 3 * _w(c), 0.0) if c.attack.random_start else (5.0 + _w(c) + _split_clean(c), 0.0)


def _l2l_forwards(c: ResolvedConfig) -> tuple[float, float]:
    two_step, due = c.method == "2step-l2l", 1.0 / c.attacker.every  # share of batches the attacker learns on
    if c.method == "naive-l2l":  # attacker, adversarial forward and backward, attacker backward; clean term apart
        cls, att = 3.0 + 3 * _w(c), 1.0 + 2 * due
    else:  # + the gradient query (forward, input backward; weight gradients of the clean term with it)
        cls, att = 5.0 + _w(c) + _split_clean(c), 1.0 + 2 * due
    if two_step:  # a second query and a second attacker pass, backward through both
        cls, att = cls + 2, att + 1 + 2 * due
    if c.attacker.update == "alternating":  # the attacker's step: one more forward and input backward
        cls += 2 * due
    extra = (c.attacker.steps - 1) * due  # each: the perturbation, forward, input backward, attacker backward
    return cls + extra * (4.0 if two_step else 2.0), att + extra * (6.0 if two_step else 3.0)


def _sdi_forwards(c: ResolvedConfig) -> tuple[float, float]:
    # the clean query, a forward and input backward per step, the trained forward and backward
    return 2.0 + _w(c) + _split_clean(c) + 2.0 * c.attack.pgd_steps + 3.0, 1.0 + 2.0 / c.attacker.every


# Per-method defaults. Step sizes follow each method's reference: the paper's PGM 0.01 at
# 0.03 (eps/3), Madry's 2/255 at 8/255 (eps/4), TRADES' and MART's 0.007 at 0.031.
KL_METHOD_STEP = 0.007 / 0.031
_KL_DEFAULTS = {"step_size": _eps_times(KL_METHOD_STEP, "0.007/0.031 eps")}
_L2L_DEFAULTS = {"attacker": Default(lambda c: "slim", "slim"), "attacker_every": Default(lambda c: 1, "1")}

METHOD_RECORDS: dict[str, Method] = {m.name: m for m in [
    Method("plain", plain_step, "clean training", lambda c: (3.0, 0.0), colour="tab:gray", marker="o"),
    Method("fgsm", fgsm_step, "FGSM training (Goodfellow et al.); with --random-start FGSM-RS (Wong et al. 2020)",
           _fgsm_forwards, defaults={
               "clean_weight": Default(lambda c: 0.5, "0.5"),
               "step_size": Default(lambda c: 1.25 * c.eps if c.random_start else c.eps,
                                    "eps, 1.25 eps with --random-start")},
           options=frozenset({"random_start"}), colour="tab:orange", marker="v"),
    Method("n-fgsm", n_fgsm_step, "N-FGSM (de Jorge et al. 2022): noise of 2 eps, an FGSM step of eps, no projection",
           lambda c: (5.0 + 3 * _w(c), 0.0),
           defaults={"step_size": _eps_times(1.0, "eps"), "noise": _eps_times(2.0, "2 eps")},
           options=frozenset({"noise"}),
           unsupported_norms={"l2": "de Jorge et al. define N-FGSM for l-inf only (per-pixel noise of 2 eps, a "
                                    "signed step, no projection); use fgsm-sdi or pgd-at under l2"},
           colour="tab:olive", marker="<"),
    Method("pgd", pgd_step, "the paper's PGM net: PGD-10 from zero, step eps/3, clean weight 0.5",
           lambda c: (2.0 * c.attack.pgd_steps + 3 + 3 * _w(c), 0.0),
           defaults={"clean_weight": Default(lambda c: 0.5, "0.5"), "step_size": _eps_times(1 / 3, "eps/3")},
           options=frozenset({"random_start", "pgd_steps"}), colour="tab:brown", marker="s"),
    Method("pgd-at", pgd_at_step, "PGD-AT (Madry et al. 2018): PGD-10 from a random start, step eps/4",
           lambda c: (2.0 * c.attack.pgd_steps + 3 + 3 * _w(c), 0.0),
           defaults={"step_size": _eps_times(1 / 4, "eps/4")}, options=frozenset({"pgd_steps"}),
           colour="tab:red", marker="D"),
    Method("trades", trades_step, "TRADES (Zhang et al. 2019): clean CE + beta x KL to a KL-PGD-10 point",
           lambda c: (2.0 * c.attack.pgd_steps + 7, 0.0),  # TRADES' attack first fixes the clean prediction
           defaults={**_KL_DEFAULTS, "beta": Default(lambda c: 6.0, "6")},
           options=frozenset({"beta", "pgd_steps"}), colour="tab:purple", marker="P"),
    Method("mart", mart_step, "MART (Wang et al. 2020): boosted CE + beta x KL weighted by misclassification",
           lambda c: (2.0 * c.attack.pgd_steps + 6, 0.0),
           defaults={**_KL_DEFAULTS, "beta": Default(lambda c: 5.0, "5")},
           options=frozenset({"beta", "pgd_steps"}), colour="tab:pink", marker="X"),
    Method("naive-l2l", l2l_step, "the paper's Naive L2L: the attacker sees the image", _l2l_forwards,
           attacker_sees="image", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS, options=_PAPER_L2L,
           colour="#aec7e8", marker="h"),
    Method("grad-l2l", l2l_step, "the paper's Grad L2L: the attacker sees the image and its loss gradient",
           _l2l_forwards, attacker_sees="image+gradient", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS,
           options=_PAPER_L2L | {"grad_norm"}, colour="tab:blue", marker="^"),
    Method("2step-l2l", l2l_step, "the paper's 2-Step L2L: the Grad attacker applied twice", _l2l_forwards,
           attacker_sees="image+gradient", perturbation=learned_perturbation, defaults=_L2L_DEFAULTS,
           options=_PAPER_L2L | {"grad_norm"}, colour="tab:cyan", marker=">"),
    Method("fgsm-sdi", fgsm_sdi_step, "FGSM-SDI (Jia et al. 2022): a learned start, then an FGSM step of eps",
           _sdi_forwards, attacker_sees="image+gradient", perturbation=sdi_perturbation, defaults={
               "attacker": Default(lambda c: "sdi", "sdi"),
               # The authors update it every 20 batches; on digits every 5 keeps 0.476 ± 0.022
               # under autoattack-fast against 0.406 ± 0.015 for every 20 (every batch: 0.470
               # ± 0.027; 3 seeds each, docs/results.md, "Learned starts").
               "attacker_every": Default(lambda c: 5, "5"),
               "pgd_steps": Default(lambda c: 1, "1"),
               "step_size": Default(lambda c: c.eps / c.pgd_steps, "eps / --pgd-steps")},
           options=_L2L | {"pgd_steps"}, colour="tab:green", marker="*"),
    Method("liet", liet_step, "LIET (ICCV 2025): a class-wise start from the grey image's gradient, partly noise, "
           "refreshed every K batches; an FGSM step of eps; + a growing Jensen-Shannon term", _liet_forwards,
           defaults={"step_size": _eps_times(1.0, "eps"), "start_every": Default(lambda c: 20, "20"),
                     "js_weight": Default(lambda c: 100.0, "100")},
           options=frozenset({"start_every", "js_weight"}),
           unsupported_norms={"l2": "LIET is defined for l-inf only (per-pixel signed class-wise starts, pixels "
                                    "replaced by uniform noise); use fgsm-sdi or pgd-at under l2"},
           colour="#98df8a", marker="p"),
    Method("fgsm-pgi", fgsm_pgi_step, "FGSM-PGI (Jia et al. 2022): each image starts from its last perturbation "
           "(a per-image memory), an FGSM step of eps, MSE consistency x 10",
           lambda c: (7.0 + 3 * _w(c), 0.0),  # query, input backward, training forward, backward through both
           defaults={"step_size": _eps_times(1.0, "eps"), "pgi_lambda": Default(lambda c: 10.0, "10"),
                     "pgi_decay": Default(lambda c: 0.3, "0.3"), "pgi_reset": Default(lambda c: 40, "40")},
           options=frozenset({"pgi_lambda", "pgi_decay", "pgi_reset"}),
           per_image_memory=True, epoch_start=pgi_epoch_start, colour="#ffbb78", marker="d"),
]}

# The step of each method by name; the loop looks its step up here.
STEPS: dict[str, Callable[[StepContext, Tensor, Tensor], Metrics]] = {
    name: m.step for name, m in METHOD_RECORDS.items()
}


# The figures' palette: matplotlib's tab10, then tab20's lighter shades (20 colours), and its
# filled markers; a record without its own colour and marker takes the first ones no record holds.
STYLE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                 "tab:gray", "tab:olive", "tab:cyan", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
                 "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
STYLE_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8")


def method_styles(records: dict[str, Method] | None = None) -> dict[str, tuple[str, str]]:
    """{method name: (colour, marker)} for every record of `records` (default METHOD_RECORDS):
    the record's own, else, in record order, the first palette colour and the first marker no
    record holds yet (once either runs out, the first (colour, marker) pair none holds), so
    every method's pair is its own and a new record gets one without a line of its own."""
    records = METHOD_RECORDS if records is None else records
    styles = {name: (m.colour, m.marker) for name, m in records.items() if m.colour and m.marker}
    for name, m in records.items():
        if name in styles:
            continue
        colours = {c for c, _ in styles.values()}
        markers = {k for _, k in styles.values()}
        held = set(styles.values())
        colour = m.colour or next((c for c in STYLE_COLOURS if c not in colours), "")
        marker = m.marker or next((k for k in STYLE_MARKERS if k not in markers), "")
        if colour and not marker:  # every marker taken: a new colour with any marker is new
            marker = next((k for k in STYLE_MARKERS if (colour, k) not in held), "")
        if marker and not colour:
            colour = next((c for c in STYLE_COLOURS if (c, marker) not in held), "")
        if not colour or not marker or (colour, marker) in held:
            pairs = [(c, k) for k in ((m.marker,) if m.marker else STYLE_MARKERS)
                     for c in ((m.colour,) if m.colour else STYLE_COLOURS)]
            colour, marker = next((p for p in pairs if p not in held), pairs[0])
        styles[name] = (colour, marker)
    return {name: styles[name] for name in records}


def list_methods(pattern: str = "*") -> list[str]:
    """Method names matching the shell-style `pattern` (e.g. "*fgsm*"), in registry order."""
    return [name for name in METHOD_RECORDS if fnmatch.fnmatchcase(name, pattern)]


def attacker_in_channels(method: str, image_channels: int) -> int:
    """The naive attacker sees the image; the gradient attackers see image and gradient."""
    return image_channels * (2 if METHOD_RECORDS[method].attacker_sees == "image+gradient" else 1)
