"""Single-step methods whose start is shared or remembered, not computed per image:
LIET's class-wise starts (`liet_step`) and FGSM-PGI's per-image memory (`fgsm_pgi_step`).
Both take the shared pieces of `learn2defend.methods.steps`; their records are in
`learn2defend.methods`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..settings import ResolvedConfig
from .steps import Metrics, StepContext, batch_metrics, eval_mode, memory_rows, mixed_loss, update

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
    return 7.0 + (3.0 if c.loss.clean_weight else 0.0), 0.0


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
    memory, idx = memory_rows(ctx, x)
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
