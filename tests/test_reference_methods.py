"""pgd-at, trades and mart (issue 15): each loss against a direct computation, each step's
update against one written out by hand, the attacks' mode and start, and the methods through
train / resume / bench / the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from learn2defend import TrainConfig, train
from learn2defend import methods as m
from learn2defend.attacks import kl_pgd_delta, pgd_delta
from learn2defend.cli import main
from learn2defend.errors import UserError
from learn2defend.models import create_model
from learn2defend.optim import make_optimizer

NEW = ("pgd-at", "trades", "mart")
EPS = 0.1


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4


def ctx_for(method, **overrides):
    cfg = TrainConfig(method=method, eps=EPS, lr=0.05, **overrides).resolve()
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=4, in_channels=1, image_size=8)
    opt = make_optimizer(cfg.optimizer, model.parameters())
    return m.StepContext(model, opt, cfg)


# ---- the losses, against the formulas written out differently --------------------------------


def test_trades_loss_is_ce_plus_beta_times_the_mean_kl():
    torch.manual_seed(1)
    clean, adv, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    p, q = clean.softmax(1), adv.softmax(1)
    ce = -torch.log(p[torch.arange(8), y]).mean()
    kl = sum((p[i] * (p[i] / q[i]).log()).sum() for i in range(8)) / 8
    torch.testing.assert_close(m.trades_loss(clean, adv, y, 6.0), ce + 6.0 * kl)
    torch.testing.assert_close(m.trades_loss(clean, clean, y, 6.0), ce)  # no KL at x' = x


def test_mart_loss_matches_the_reference_formulation():
    """The reference sorts to find the strongest wrong class and uses log(p + 1e-12)."""
    torch.manual_seed(2)
    clean, adv, y = torch.randn(8, 5) * 3, torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    p_adv, p_clean = adv.softmax(1), clean.softmax(1)
    top2 = p_adv.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    expected = boosted + 5.0 * (kl * (1 - p_clean[torch.arange(8), y])).mean()
    torch.testing.assert_close(m.mart_loss(clean, adv, y, 5.0), expected, rtol=1e-5, atol=1e-6)


def _reference_mart(clean, adv, y, beta):
    """MART's reference formulation (YisenWang/MART, mart.py), written out independently."""
    p_adv, p_clean = adv.softmax(1), clean.softmax(1)
    top2 = p_adv.argsort(1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    kl = torch.nn.KLDivLoss(reduction="none")(torch.log(p_adv + 1e-12), p_clean).sum(1)
    return boosted + beta * (kl * (1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1))).mean()


def test_mart_loss_and_gradients_match_the_reference_on_a_confident_net():
    """A confident net (logits 40 apart, as a plain net's can be) whose adversarial predictions
    flip: the reference's log(p + 1e-12) caps -log p(x') at 27.6 nats, where a log-softmax gives
    40 and another gradient. Half the clean images are confidently wrong, so that their KL
    weight 1 - p_y(x) is ~1."""
    torch.manual_seed(3)
    y = torch.arange(8) % 5
    clean_class = torch.where(torch.arange(8) < 4, (y + 2) % 5, y)
    clean = (F.one_hot(clean_class, 5) * 40.0 + torch.randn(8, 5)).requires_grad_(True)
    adv = (F.one_hot((y + 1) % 5, 5) * 40.0 + torch.randn(8, 5)).requires_grad_(True)
    ours, ref = m.mart_loss(clean, adv, y, 5.0), _reference_mart(clean, adv, y, 5.0)
    assert ref > 5.0 * 4 / 8 * 27  # the capped KL of the four misclassified images counts
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [clean, adv]), torch.autograd.grad(ref, [clean, adv]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trades_gradients_match_the_reference_on_a_confident_net():
    """The reference's nn.KLDivLoss(size_average=False)(log_softmax(f(x')), softmax(f(x))) / batch:
    the gradient reaches both the clean and the adversarial logits, at every confidence."""
    torch.manual_seed(4)
    y = torch.arange(8) % 5
    clean = (F.one_hot(y, 5) * 30.0 + torch.randn(8, 5)).requires_grad_(True)
    adv = (torch.randn(8, 5) * 15.0).requires_grad_(True)
    ours = m.trades_loss(clean, adv, y, 6.0)
    ref = F.cross_entropy(clean, y) + 6.0 * torch.nn.KLDivLoss(reduction="sum")(
        adv.log_softmax(1), clean.softmax(1)) / len(y)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, [clean, adv]), torch.autograd.grad(ref, [clean, adv]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.abs().sum() > 0


def test_mart_kl_term_vanishes_on_confidently_correct_images():
    y = torch.tensor([0, 1])
    clean = torch.tensor([[30.0, 0, 0], [0, 30.0, 0]])  # p_y(x) = 1: weight 0
    adv = torch.randn(2, 3)
    torch.testing.assert_close(m.mart_loss(clean, adv, y, 5.0), m.mart_loss(clean, adv, y, 0.0))


# ---- the steps: what they optimize, with a fixed x' ---------------------------------------------


@pytest.mark.parametrize("method, attack, loss", [
    ("pgd-at", "pgd_delta", lambda c, a, y, beta: F.cross_entropy(a, y)),
    ("trades", "kl_pgd_delta", lambda c, a, y, beta: F.cross_entropy(c, y) + beta * F.kl_div(
        a.log_softmax(1), c.softmax(1), reduction="sum") / len(y)),
    ("mart", "pgd_delta", None),
])
def test_one_step_equals_an_sgd_step_on_the_loss_written_by_hand(monkeypatch, method, attack, loss):
    loss = loss or m.mart_loss
    ctx = ctx_for(method)
    ref = copy.deepcopy(ctx)
    x, y = batch()
    delta = (torch.rand_like(x) * 2 - 1) * EPS
    seen = {}

    def fixed(model, *args, **kwargs):
        seen.update(training=model.training, **kwargs)
        return delta

    monkeypatch.setattr(m.steps, attack, fixed)  # where the steps look it up
    metrics = m.STEPS[method](ctx, x, y)

    logits_clean, logits_adv = ref.model(x), ref.model(x + delta)  # train mode, as the step
    expected = loss(logits_clean, logits_adv, y, ref.config.loss.beta)
    ref.optimizer.zero_grad()
    expected.backward()
    ref.optimizer.step()
    for p, q in zip(ctx.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(metrics["loss"], expected.detach() * len(y))
    assert metrics["correct"] == (logits_adv.argmax(1) == y).sum()
    # the attack: eval mode, the recipe's steps and step size, the model back in train mode after
    assert seen["training"] is False and ctx.model.training
    assert seen["steps"] == 10
    step = {"pgd-at": EPS / 4, "trades": EPS * 0.007 / 0.031, "mart": EPS * 0.007 / 0.031}[method]
    assert seen["step_size"] == pytest.approx(step)
    if method == "pgd-at":
        assert seen["random_start"] is True
    else:
        assert seen["start_std"] == 0.001


def test_pgd_at_leaves_batch_norm_statistics_to_the_training_forward():
    """Eval mode: of the eleven forwards of a pgd-at step, only the training one normalizes
    with (and updates) the batch statistics; the pgd method's attack runs in train mode."""
    x, y = batch(32)

    def train_mode_forwards(method):
        ctx = ctx_for(method, clean_weight=0.0)
        bn = next(mod for mod in ctx.model.modules() if isinstance(mod, torch.nn.BatchNorm2d))
        modes = []
        bn.register_forward_hook(lambda mod, i, o: modes.append(mod.training))
        m.STEPS[method](ctx, x, y)
        return sum(modes), len(modes)

    assert train_mode_forwards("pgd-at") == (1, 11)
    assert train_mode_forwards("pgd") == (11, 11)


def test_attack_starts():
    model = create_model("smallcnn", num_classes=4, in_channels=1, image_size=8).eval()
    x, y = batch(64)
    x = x * 0.5 + 0.25  # away from the box, so that the start is not clipped
    torch.manual_seed(0)
    uniform = pgd_delta(model, x, y, EPS, steps=1, step_size=1e-9, random_start=True)
    assert uniform.abs().max() <= EPS and uniform.abs().max() > 0.99 * EPS and uniform.std() > EPS / 2
    small = pgd_delta(model, x, y, EPS, steps=1, step_size=1e-9, start_std=0.001)
    assert 0.0005 < small.std() < 0.002


def test_kl_pgd_raises_the_kl_and_stays_in_the_threat_model():
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=4, in_channels=1, image_size=8).eval()
    x, _ = batch(32)

    def kl(delta):
        with torch.no_grad():
            return F.kl_div(model(x + delta).log_softmax(1), model(x).softmax(1), reduction="batchmean")

    delta = kl_pgd_delta(model, x, EPS, steps=5, step_size=EPS / 4)
    assert delta.abs().max() <= EPS + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert kl(delta) > 10 * kl(0.001 * torch.randn_like(x))


# ---- configuration --------------------------------------------------------------------------


def test_beta_defaults_and_validation():
    assert TrainConfig(method="trades").resolve().loss.beta == 6.0
    assert TrainConfig(method="mart").resolve().loss.beta == 5.0
    assert TrainConfig(method="trades", beta=1.5).resolve().loss.beta == 1.5
    assert TrainConfig(method="pgd").resolve().loss.beta is None
    assert TrainConfig(method="pgd-at").resolve().loss.clean_weight == 0.0
    for bad, message in [(dict(method="trades", beta=-1.0), "--beta must lie"),
                         (dict(method="mart", beta=float("nan")), "--beta must lie"),
                         (dict(method="pgd", beta=6.0), "--beta applies to"),
                         (dict(method="trades", clean_weight=0.5), "--clean-weight does not apply"),
                         (dict(method="pgd-at", random_start=True), "--random-start applies")]:
        with pytest.raises(UserError, match=message):
            TrainConfig(**bad).validate()


def test_a_config_json_without_beta_still_loads(tmp_path):
    d = TrainConfig(method="pgd").resolve().to_dict()
    assert "beta" not in d  # pgd takes none, so it is not stored (nor was it before --beta existed)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    assert TrainConfig.load(path).beta is None


# ---- through train, resume, the CLI and bench ---------------------------------------------------


@pytest.mark.parametrize("method", NEW)
def test_trains_on_digits_and_resumes_exactly(tmp_path, method):
    base = dict(dataset="digits", model="smallcnn", method=method, batch_size=64, lr=0.05, train_size=256,
                val_robust_n=32, progress=False, pgd_steps=3)
    full = train(TrainConfig(**base, epochs=2, out=str(tmp_path / "full")))
    train(TrainConfig(**base, epochs=1, out=str(tmp_path / "part")))
    resumed = train(TrainConfig(**base, epochs=2, out=str(tmp_path / "part")), resume=True)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    assert all(0 <= r["attack_success"] <= 1 and "val_pgd10_acc" in r for r in full.history)
    stored = json.loads((full.path / "config.json").read_text())
    assert stored["method"] == method and stored.get("beta") == {"pgd-at": None, "trades": 6.0, "mart": 5.0}[method]


def test_cli_lists_the_methods_and_refuses_a_bad_beta(tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NEW) and "--beta" in out
    assert main(["train", "--method", "trades", "--beta", "-2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--beta must lie" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_bench_times_the_new_methods(capsys):
    assert main(["bench", "--model", "smallcnn", "--dataset", "fake:1x8x8:4", "--batch-size", "8", "--steps", "1",
                 "--warmup", "0", "--device", "cpu", "--methods", "pgd-at,trades,mart", "--clean-weight", "0.5",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["seconds_per_step"]) == list(NEW)


def test_compare_runs_the_new_methods(tmp_path):
    from learn2defend.compare import compare

    base = TrainConfig(dataset="digits", model="smallcnn", epochs=1, batch_size=64, train_size=128, lr=0.05,
                       val_robust_n=0, progress=False, pgd_steps=2)
    rows = compare(base, methods=["plain", *NEW], attacks=["fgsm"], out=tmp_path / "cmp", n=32)
    assert [r["method"] for r in rows] == ["plain", *NEW]
    assert all(0 <= r["fgsm"] <= r["clean"] + 1e-9 <= 1 + 1e-9 for r in rows)
