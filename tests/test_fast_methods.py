"""FGSM-SDI, N-FGSM and the loop options the fast-AT recipes use: label smoothing,
weight averaging (--ema), --attacker-every, and catastrophic-overfitting detection."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_methods import EPS, make_ctx, toy_batch
from test_train import cfg, weights

from learn2defend import load, load_run, train
from learn2defend.checkpoint import load_state
from learn2defend.config import TrainConfig
from learn2defend.errors import UserError
from learn2defend.guards import collapsed
from learn2defend.methods import METHOD_RECORDS, STEPS, fgsm_sdi_step, mixed_loss, n_fgsm_step
from learn2defend.optim import WeightAverage

# ---- the steps ---------------------------------------------------------------------------


def _captured_input(ctx, step, x, y):
    """The images the classifier trains on in one step (the last forward of the step)."""
    seen = []
    handle = ctx.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        step(ctx, x, y)
    finally:
        handle.remove()
    return seen[-1]


def test_fgsm_sdi_point_is_in_the_ball_and_the_image_box():
    ctx = make_ctx("fgsm-sdi")
    x, y = toy_batch()
    x = x.clone()
    x[:4] = 0.0  # pixels at the box's edges: the projection must hold them in [0, 1]
    x[4:8] = 1.0
    with torch.no_grad():  # a saturated attacker: its start sits on the ball's boundary
        for p in ctx.attacker.parameters():
            p.mul_(50)
    x_adv = _captured_input(ctx, fgsm_sdi_step, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it did move


def test_fgsm_sdi_attacker_ascends_the_loss_at_the_final_point():
    """The attacker's gradient is that of +CE at the final point through its start: a small
    step of the attacker's parameters against that gradient (what its optimizer does with the
    reversed gradient) raises the classifier's loss there, measured numerically."""
    ctx = make_ctx("fgsm-sdi", attacker_every=1)
    x, y = toy_batch()
    ctx.model.eval()  # fixed batch-norm statistics: the loss is a function of the attacker alone
    ctx.attacker.eval()

    def loss_at_final_point():
        query = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(query), y, reduction="sum"), query)
        start = ctx.attacker(torch.cat([x, g.sign()], 1), EPS)
        delta = (start + EPS * 0).clamp(-EPS, EPS).clamp(-x, 1 - x)
        q = delta.detach().requires_grad_(True)
        (g2,) = torch.autograd.grad(F.cross_entropy(ctx.model(x + q), y, reduction="sum"), q)
        delta = (delta + EPS * g2.sign()).clamp(-EPS, EPS).clamp(-x, 1 - x)
        return F.cross_entropy(ctx.model(x + delta), y)

    ctx.optimizer.param_groups[0]["lr"] = 0.0  # the classifier stays put
    before = loss_at_final_point().item()
    params = list(ctx.attacker.parameters())
    saved = [p.detach().clone() for p in params]
    fgsm_sdi_step(ctx, x, y)  # fills the attacker's .grad with the reversed gradient
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, s, g in zip(params, saved, grads, strict=True):
            p.copy_(s - 1e-2 * g)  # a descent step on the reversed gradient = ascent on the loss
    after = loss_at_final_point().item()
    assert after > before
    # and the gradient agrees with autograd on the same function (the numerical check)
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    direct = torch.autograd.grad(loss_at_final_point(), params)
    for g, d in zip(grads, direct, strict=True):
        torch.testing.assert_close(g, -d, rtol=1e-3, atol=1e-6)


def test_attacker_every_k_updates_the_attacker_on_every_kth_batch_only():
    ctx = make_ctx("fgsm-sdi", attacker_every=3)
    x, y = toy_batch()
    changed = []
    for index in range(6):
        ctx.step_index = index
        before = [p.detach().clone() for p in ctx.attacker.parameters()]
        STEPS["fgsm-sdi"](ctx, x, y)
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, ctx.attacker.parameters(), strict=True)))
    assert changed == [True, False, False, True, False, False]


@pytest.mark.parametrize("method", ["grad-l2l", "naive-l2l"])
def test_attacker_every_applies_to_the_paper_methods(method):
    ctx = make_ctx(method, attacker_every=2)
    x, y = toy_batch()
    ctx.step_index = 1
    before = [p.detach().clone() for p in ctx.attacker.parameters()]
    STEPS[method](ctx, x, y)
    assert all(torch.equal(b, p) for b, p in zip(before, ctx.attacker.parameters(), strict=True))


def test_n_fgsm_perturbation_is_bounded_by_noise_plus_step_and_leaves_the_ball():
    ctx = make_ctx("n-fgsm")
    assert (ctx.config.attack.noise, ctx.config.attack.step_size) == pytest.approx((2 * EPS, EPS))
    x = torch.full((256, 1, 8, 8), 0.5)  # away from the box: nothing is clipped
    y = torch.arange(256) % 2
    torch.manual_seed(1)
    delta = _captured_input(ctx, n_fgsm_step, x, y) - x
    assert delta.abs().max() <= 3 * EPS + 1e-6
    assert delta.abs().max() > 1.5 * EPS  # no projection back to the eps-ball


def test_label_smoothing_reaches_the_training_loss():
    ctx = make_ctx("fgsm", label_smoothing=0.2, clean_weight=0.5)
    logits_adv, logits_clean = torch.randn(8, 2), torch.randn(8, 2)
    y = torch.arange(8) % 2
    expected = 0.5 * F.cross_entropy(logits_adv, y, label_smoothing=0.2) + 0.5 * F.cross_entropy(
        logits_clean, y, label_smoothing=0.2)
    torch.testing.assert_close(mixed_loss(ctx, logits_adv, y, logits_clean), expected)


@pytest.mark.parametrize("method", ["fgsm", "grad-l2l"])
def test_label_smoothing_with_a_clean_term_gives_the_two_backward_update(method):
    """With a clean term, the clean query's weight gradients are not reused under label
    smoothing (its attack follows the plain CE, the clean term the smoothed one)."""
    ctx = make_ctx(method, clean_weight=0.5, label_smoothing=0.3)
    x, y = toy_batch()
    STEPS[method](ctx, x, y)  # runs: the fallback path keeps the clean graph for the final backward
    assert all(p.grad is not None for p in ctx.model.parameters())


# ---- method records --------------------------------------------------------------------


def test_method_options_are_checked_against_the_record():
    with pytest.raises(UserError, match="--noise applies to --method n-fgsm only"):
        TrainConfig(method="fgsm", noise=0.1).validate()
    with pytest.raises(UserError, match="--attacker-every applies to"):
        TrainConfig(method="pgd-at", attacker_every=5).validate()
    TrainConfig(method="fgsm-sdi", attacker_every=5).validate()
    resolved = TrainConfig(method="fgsm-sdi", eps=0.1).resolve()
    assert (resolved.attacker.name, resolved.attacker.every, resolved.attack.pgd_steps,
            resolved.attack.step_size) == ("sdi", 5, 1, 0.1)
    two = TrainConfig(method="fgsm-sdi", eps=0.1, pgd_steps=2).resolve()
    assert two.attack.step_size == pytest.approx(0.05)
    assert {m for m, r in METHOD_RECORDS.items() if r.has_attacker} == {
        "naive-l2l", "grad-l2l", "2step-l2l", "fgsm-sdi", "fgsm-sdi-image", "fgsm-sdi-memory"}


@pytest.mark.parametrize("bad, message", [
    (dict(label_smoothing=1.0), "--label-smoothing"), (dict(ema=1.0), "--ema"), (dict(ema=0.0), "--ema"),
    (dict(method="n-fgsm", noise=-0.1), "--noise"), (dict(method="fgsm-sdi", attacker_every=0), "--attacker-every"),
])
def test_bad_fast_at_options_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**bad).validate()


# ---- weight averaging -----------------------------------------------------------------------


def test_weight_average_update_rule():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = WeightAverage(model, decay=0.9)
    start = {k: v.clone() for k, v in avg.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # moves the batch-norm statistics and its batch count
    for step in (0, 200):
        d = min(0.9, (1 + step) / (10 + step))
        expect_w = d * avg.module[0].weight + (1 - d) * model[0].weight
        expect_mean = d * avg.module[1].running_mean + (1 - d) * model[1].running_mean
        avg.update(step)
        torch.testing.assert_close(avg.module[0].weight, expect_w)
        torch.testing.assert_close(avg.module[1].running_mean, expect_mean)
    assert avg.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert not torch.equal(avg.module[0].weight, start["0.weight"])
    assert not any(p.requires_grad for p in avg.module.parameters())


def test_ema_run_validates_saves_and_exports_the_averaged_weights(tmp_path):
    run = train(cfg(tmp_path, method="fgsm", random_start=True, ema=0.95, epochs=2))
    state = load_state(run.path / "last.safetensors")
    averaged = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    trained = state["model"]
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)  # two different nets are kept
    loaded = load_run(run.path)
    for k, v in loaded.model.state_dict().items():  # a loaded run is the averaged classifier
        assert torch.equal(v, averaged[k]), k
    best = load_state(run.path / "best.safetensors")
    assert "ema" in best  # best holds the averaged weights that scored best
    from learn2defend.export import export

    export(run.path, tmp_path / "m.safetensors")
    exported = load(tmp_path / "m.safetensors")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, averaged[k]), k


def test_ema_resume_is_exact(tmp_path):
    full = train(cfg(tmp_path, "full", method="fgsm-sdi", ema=0.9, epochs=3, attacker_every=2))
    train(cfg(tmp_path, "part", method="fgsm-sdi", ema=0.9, epochs=1, attacker_every=2))
    resumed = train(cfg(tmp_path, "part", method="fgsm-sdi", ema=0.9, epochs=3, attacker_every=2), resume=True)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    a, b = load_state(full.path / "last.safetensors"), load_state(resumed.path / "last.safetensors")
    for k, v in a["ema"].items():
        assert torch.equal(v, b["ema"][k]), k


# ---- catastrophic overfitting ---------------------------------------------------------------


def test_collapse_is_a_robust_drop_while_clean_rises():
    before = {"val_clean_acc": 0.60, "val_pgd10_acc": 0.40}
    assert collapsed(before, {"val_clean_acc": 0.70, "val_pgd10_acc": 0.02})
    assert not collapsed(before, {"val_clean_acc": 0.55, "val_pgd10_acc": 0.02})  # clean fell too
    assert not collapsed(before, {"val_clean_acc": 0.70, "val_pgd10_acc": 0.30})  # an ordinary dip
    assert not collapsed({"val_clean_acc": 0.2, "val_pgd10_acc": 0.06}, {"val_clean_acc": 0.3,
                                                                         "val_pgd10_acc": 0.02})  # too small
    assert not collapsed({"val_clean_acc": 0.6}, {"val_clean_acc": 0.7})


def test_a_collapse_is_logged_recorded_and_best_keeps_the_weights_before_it(tmp_path, monkeypatch, capsys):
    import sys

    train_module = sys.modules["learn2defend.train"]  # the module; learn2defend.train is the function
    scores = iter([(0.5, 0.30), (0.6, 0.35), (0.8, 0.01)])

    def scripted(model, data, config, device):
        clean, robust = next(scores)
        return {"val_clean_acc": clean, "val_pgd10_acc": robust}

    monkeypatch.setattr(train_module, "validate", scripted)
    run = train(cfg(tmp_path, method="fgsm", random_start=True, epochs=3))
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("collapsed", False) for r in records] == [False, False, True]
    assert "catastrophic overfitting at epoch 3" in capsys.readouterr().err
    best = load_state(run.path / "best.safetensors")
    assert best["epoch"] == 2  # the weights of epoch 2, before the collapse
    last = load_state(run.path / "last.safetensors")
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_l2l_attack_of_an_fgsm_sdi_run_is_its_start_and_step(tmp_path):
    from learn2defend.attacks import make_attack

    run = train(cfg(tmp_path, method="fgsm-sdi", epochs=1))
    attack = make_attack(f"l2l:{run.path}", 0.05)
    assert attack.method == "fgsm-sdi"
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 4
    delta = attack(run.model, x, y) - x
    assert 0 < delta.abs().max() <= 0.05 + 1e-6  # the evaluation's eps, not the training one
