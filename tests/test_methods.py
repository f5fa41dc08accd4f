"""The training steps: perturbations stay in the threat model, the one-backward
update equals two separate backwards, and every method lowers its loss on a toy problem."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learn2defend.config import L2L_METHODS, METHODS, TrainConfig
from learn2defend.methods import (
    METHOD_RECORDS,
    STEPS,
    StepContext,
    attacker_in_channels,
    condition_gradient,
    learned_perturbation,
    reverse_gradient,
)
from learn2defend.models import create_attacker, create_model
from learn2defend.optim import make_optimizer

EPS = 0.1


def toy_batch(n=32, seed=0):
    """Two classes that differ in mean brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def make_ctx(method, clean_weight=None, **overrides):
    cfg = TrainConfig(method=method, eps=EPS, lr=0.05, attacker_width=0.125, clean_weight=clean_weight,
                      attacker_optimizer="adam", attacker_lr=1e-3, **overrides).resolve()
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=2, in_channels=1, image_size=8)
    opt = make_optimizer(cfg.optimizer, model.parameters())
    attacker = attacker_opt = None
    if cfg.attacker is not None:
        attacker = create_attacker(cfg.attacker.name, in_channels=attacker_in_channels(method, 1), out_channels=1,
                                   width=cfg.attacker.width)
        attacker_opt = make_optimizer(cfg.attacker.optimizer, attacker.parameters())
    return StepContext(model, opt, cfg, attacker, attacker_opt)


@pytest.mark.parametrize("method", L2L_METHODS)
def test_learned_perturbation_within_eps_and_image_range(method):
    ctx = make_ctx(method)
    x, y = toy_batch()
    # blow up the attacker's last layer so tanh saturates: the bound must still hold
    with torch.no_grad():
        for p in ctx.attacker.parameters():
            p.mul_(50)
    grad = torch.randn_like(x) if "gradient" in METHOD_RECORDS[method].attacker_sees else None
    delta = METHOD_RECORDS[method].perturbation(ctx, x, y, grad)  # the record's learned perturbation
    assert delta.abs().max() <= EPS + 1e-6
    assert ((x + delta).clamp(0, 1) - x).abs().max() <= EPS + 1e-6


def test_two_step_projects_the_sum():
    ctx = make_ctx("2step-l2l")
    x, y = toy_batch()
    with torch.no_grad():  # make both recurrence steps push to +eps: their sum is 2 eps before projection
        last = [m for m in ctx.attacker.modules() if isinstance(m, nn.Conv2d)][-1]
        last.weight.zero_()
        last.bias.fill_(10.0)
    delta = learned_perturbation(ctx, x, y, torch.randn_like(x))
    assert torch.allclose(delta, torch.full_like(delta, EPS), atol=1e-6)


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_one_backward_equals_two_backwards(clean_weight):
    """Gradient reversal: classifier grads descend and attacker grads ascend, in one pass."""
    ctx = make_ctx("grad-l2l", clean_weight=clean_weight)
    x, y = toy_batch()
    ref = copy.deepcopy(ctx)

    # one backward, through the reversal (what l2l_step does)
    x_q = x.clone().requires_grad_(True)
    logits_clean = ctx.model(x_q)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_clean, y, reduction="sum"), x_q, retain_graph=True)
    delta = learned_perturbation(ctx, x, y, g)
    w = clean_weight
    loss = (1 - w) * F.cross_entropy(ctx.model((x + reverse_gradient(delta, 1 / (1 - w))).clamp(0, 1)), y)
    loss = loss + w * F.cross_entropy(logits_clean, y)
    loss.backward()

    # two backwards: classifier on the detached perturbation, attacker ascending the adversarial loss
    x_q = x.clone().requires_grad_(True)
    logits_clean = ref.model(x_q)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_clean, y, reduction="sum"), x_q, retain_graph=True)
    delta = learned_perturbation(ref, x, y, g)
    adv_loss = F.cross_entropy(ref.model((x + delta).clamp(0, 1)), y)
    cls_grads = torch.autograd.grad((1 - w) * adv_loss + w * F.cross_entropy(logits_clean, y),
                                    list(ref.model.parameters()), retain_graph=True)
    att_grads = torch.autograd.grad(adv_loss, list(ref.attacker.parameters()))

    for p, g_ref in zip(ctx.model.parameters(), cls_grads, strict=True):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-4, atol=1e-6)
    for p, g_ref in zip(ctx.attacker.parameters(), att_grads, strict=True):
        torch.testing.assert_close(p.grad, -g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_its_training_loss(method):
    ctx = make_ctx(method)
    x, y = toy_batch(64)
    losses = []
    for _ in range(15):
        metrics = STEPS[method](ctx, x, y)
        losses.append(metrics["loss"].item() / len(y))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())


def test_alternating_update_moves_both_networks():
    ctx = make_ctx("grad-l2l", l2l_update="alternating")
    x, y = toy_batch()
    before_c = [p.clone() for p in ctx.model.parameters()]
    before_a = [p.clone() for p in ctx.attacker.parameters()]
    STEPS["grad-l2l"](ctx, x, y)
    assert ctx.model.training
    assert any(not torch.equal(a, b) for a, b in zip(before_c, ctx.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_a, ctx.attacker.parameters(), strict=True))


def test_extra_attacker_steps_raise_the_adversarial_loss():
    ctx = make_ctx("naive-l2l", attacker_steps=4)
    x, y = toy_batch()

    def adv_loss():
        with torch.no_grad():
            return F.cross_entropy(ctx.model((x + ctx.attacker(x, EPS)).clamp(0, 1)), y).item()

    start = adv_loss()
    for _ in range(5):
        from learn2defend.methods import _extra_attacker_updates

        _extra_attacker_updates(ctx, x, y, None)
    assert adv_loss() > start


def test_condition_gradient_modes():
    g = torch.randn(4, 3, 8, 8) * torch.tensor([1e-4, 1e-2, 1.0, 10.0]).view(-1, 1, 1, 1)
    s = condition_gradient(g, "sample")
    assert torch.allclose(s.abs().amax(dim=(1, 2, 3)), torch.ones(4))
    b = condition_gradient(g, "batch")
    assert b.abs().max() == 1.0 and b[0].abs().max() < 1e-3
    assert set(condition_gradient(g, "sign").unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(condition_gradient(g, "none"), g)


@pytest.mark.parametrize("method, overrides", [(m, {}) for m in METHODS] + [
    (m, {"l2l_update": "alternating", "attacker_scale": True, "attacker_steps": 2}) for m in L2L_METHODS])
def test_every_step_gives_every_optimized_parameter_a_gradient(method, overrides):
    # distributed.sync_gradients relies on it: the ranks' gradient buckets agree without asking
    ctx = make_ctx(method, **overrides)
    missing, steps = [], []

    def hook(opt, args, kwargs):
        steps.append(opt)
        missing.extend(p.shape for g in opt.param_groups for p in g["params"] if p.grad is None)

    for opt in (ctx.optimizer, ctx.attacker_optimizer):
        if opt is not None:
            opt.register_step_pre_hook(hook)
    for _ in range(2):
        STEPS[method](ctx, *toy_batch())
    assert missing == [] and len(steps) >= 2
