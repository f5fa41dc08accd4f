"""The training steps of the hand-designed, KL-based and learned-attacker methods, and the
pieces every step shares (`StepContext`, `update`, `mixed_loss`, `batch_metrics`). All share
the loop in `learn2defend.train`; the records that name them are in `learn2defend.methods`.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import correct_predictions, fgsm_delta, kl_pgd_delta, pgd_delta
from ..attacks.threat import ThreatModel, threat_model
from ..memory import PerturbationMemory
from ..settings import ResolvedConfig

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


def memory_rows(ctx: StepContext, x: Tensor) -> tuple[PerturbationMemory, Tensor]:
    """The step's per-image memory and the batch's rows in it (int64 [B]). Without a training
    loop around the step (bench, a direct call) the batch is taken for the whole set: a memory
    of len(x) rows of the record's kind, made at the first call and started as the loop
    starts it (the record's `epoch_start` for epoch 0)."""
    if ctx.memory is None:
        from . import METHOD_RECORDS  # the records' module imports this one

        record = METHOD_RECORDS[ctx.config.method]
        ctx.memory = PerturbationMemory(len(x), tuple(x.shape[1:]), x.device,
                                        momentum="momentum" in record.per_image_memory)
        if record.epoch_start is not None:
            record.epoch_start(ctx, 0)
    if ctx.indices is None:
        return ctx.memory, torch.arange(len(x), device=x.device)
    return ctx.memory, ctx.indices


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
    from . import METHOD_RECORDS  # the records' module imports this one

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
    from . import METHOD_RECORDS  # the records' module imports this one

    c, sees = ctx.config, METHOD_RECORDS[ctx.config.method].attacker_sees
    if "gradient" in sees:
        logits_clean, grad, clean_grads = clean_forward_with_grad(ctx, x, y)
    else:  # fgsm-sdi-image: the start from the image alone, no clean gradient query
        grad = clean_grads = None
        logits_clean = ctx.model(x) if c.loss.clean_weight else None
    memory = idx = remembered = None
    if "memory" in sees:  # fgsm-sdi-memory: the image's perturbation from its last visit
        memory, idx = memory_rows(ctx, x)
        remembered = ctx.threat.project(memory.read(idx)[0], x, c.eps)  # in the ball for this view
    with torch.set_grad_enabled(ctx.attacker_due):  # no attacker graph on the batches it skips
        delta = sdi_perturbation(ctx, x, y, grad, remembered)
    if memory is not None:  # the next visit remembers where this one ended
        memory.write(idx, delta.detach())
    logits = ctx.model(x + _toward_attacker(ctx, delta, 1.0 / (1.0 - c.loss.clean_weight)))
    loss = mixed_loss(ctx, logits, y, logits_clean)
    update(ctx, loss, clean_grads, attacker=ctx.attacker_due)
    return batch_metrics(loss, logits, y, adversarial=True)


def sdi_perturbation(ctx: StepContext, x: Tensor, y: Tensor, grad: Tensor | None,
                     remembered: Tensor | None = None) -> Tensor:
    """FGSM-SDI's point: the learned start g([x, sign grad]) in the eps-ball, then --pgd-steps
    signed-gradient steps of --step-size from it, each projected to the ball and to [0, 1].
    Returns delta [B, C, H, W] (x + delta in [0, 1], ||delta|| <= eps), with the attacker's graph
    through the start; the steps' directions are constants. `grad`: the clean input gradient
    (None: the attacker sees the image alone, fgsm-sdi-image). `remembered` [B, C, H, W]: the
    image's perturbation from its last visit, a third input scaled by 1 / eps (fgsm-sdi-memory).
    Under l2 the start is the attacker's output mapped into the l2 ball (the threat model's
    `squash`), the steps go along g / ||g||; the attacker still sees sign(grad), its input
    feature in the authors' code, under both norms."""
    eps, a, threat = ctx.config.eps, ctx.config.attack, ctx.threat
    seen = [x, *([] if grad is None else [grad.sign()]), *([] if remembered is None else [remembered / eps])]
    start = run_attacker(ctx.attacker, torch.cat(seen, dim=1), eps, threat)
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
