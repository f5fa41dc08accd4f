"""The contract every attack and evaluation helper keeps, whatever the model and the caller:

- finite adversarial images in the eps-ball and [0, 1], even when the model's input
  gradient is NaN or infinite;
- results that depend only on the model, the images, the attack and the seed (not on the
  other attacks, their order, the batch size or the global RNG);
- the caller's model modes, requires_grad flags, .grads and global RNG left alone;
- images and labels checked once, with one UserError; labels of any integer dtype.

Tiny MLPs trained inline on scikit-learn's 8x8 digits keep this file at a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from learn2defend.attacks import (
    FGSM,
    NONFINITE_GRADIENT_WARNING,
    PGD,
    Attack,
    AutoAttack,
    CWLinf,
    make_attack,
)
from learn2defend.checks import input_gradient_ok, sanity_checks
from learn2defend.config import TrainConfig
from learn2defend.correctness import attack_correct
from learn2defend.data import ImageData
from learn2defend.errors import UserError
from learn2defend.evaluate import attack_accuracy, transfer_accuracy
from learn2defend.learned_attack import LearnedAttack
from learn2defend.models.attackers import create_attacker

EPS = 0.1
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)  # [N, 1, 8, 8], many exact 0s
    return x, torch.tensor(d.target)


def _mlp(x: torch.Tensor, y: torch.Tensor, seed: int = 0, dropout: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                              nn.Dropout(0.1 if dropout else 0.0), nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(150):
            idx = torch.randint(0, 1200, (128,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def mlp(digits):
    return _mlp(*digits)


class Sqrt(nn.Module):
    """The same logits plus a term that is 0 on [0, 1] images but whose input gradient is
    NaN (`scale` 0: 0 * inf) or infinite (`scale` > 0) wherever a pixel is exactly 0."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        s = x.sqrt().flatten(1).sum(1, keepdim=True)
        # Class-dependent weights: cross-entropy's gradient does not cancel to 0 * inf.
        w = torch.arange(logits.shape[1], dtype=x.dtype, device=x.device) / logits.shape[1]
        return logits + self.scale * s * w


def _learned(method: str, eps: float, norm: str = "linf") -> LearnedAttack:
    """An l2l:DIR attack without a run folder: a random slim attacker."""
    attack = LearnedAttack.__new__(LearnedAttack)
    Attack.__init__(attack, eps, norm)
    torch.manual_seed(0)
    attack.attacker = create_attacker("slim", in_channels=1 if method == "naive-l2l" else 2, out_channels=1,
                                      width=0.25).eval()
    attack.config = TrainConfig(method=method, eps=eps, norm=norm).resolve()
    attack.image_shape, attack.method, attack.name = (1, 8, 8), method, f"l2l:{method}"
    return attack


def _attack(name: str, eps: float = EPS, norm: str = "linf") -> Attack:
    if name.startswith("l2l:"):
        return _learned(name[4:], eps, norm)
    if name == "fgsm-rs":
        return FGSM(eps, step_size=1.25 * eps, random_start=True, norm=norm)
    if name == "cw":
        return CWLinf(eps, steps=30)
    return make_attack(name, eps, norm)


ALL = ["fgsm", "fgsm-rs", "pgd5", "pgm5", "cwpgd5", "cw", "autoattack-fast", "l2l:naive-l2l", "l2l:grad-l2l",
       "l2l:2step-l2l"]


def _assert_valid(adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1


# ---- 1. non-finite input gradients -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_attacks_stay_finite_with_nonfinite_input_gradients(mlp, digits, name, kind):
    x, y = digits[0][1400:1440], digits[1][1400:1440]
    if name.startswith("autoattack"):
        x, y = x[:6], y[:6]
    model = Sqrt(mlp, 0.0 if kind == "nan" else 1e-3).eval()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    assert (grad.isnan() if kind == "nan" else grad.isinf()).any()  # the premise
    attack = _attack(name)
    adv = attack(model, x, y)
    _assert_valid(adv, x, EPS)
    assert (adv != x).any()  # it still attacks, it does not just give up
    if name != "l2l:naive-l2l":  # the naive attacker never queries a gradient
        assert NONFINITE_GRADIENT_WARNING in attack.warnings
    with torch.no_grad():  # the "robust accuracy" is no longer the share of NaN logits' argmax
        assert torch.isfinite(model(adv)).all()


def test_finite_gradients_give_no_warning_and_unchanged_images(mlp, digits):
    x, y = digits[0][1400:1440], digits[1][1400:1440]
    attack = make_attack("cw", EPS)
    attack(mlp, x, y)
    assert attack.warnings == []


class _Broken(Attack):
    name = "broken"

    def perturb(self, model, images, labels):
        adv = images + 3 * self.eps  # outside the ball
        adv[:, :, 0] = float("nan")
        adv[:, :, 1] = float("inf")
        return adv


def test_the_base_call_repairs_any_perturb(mlp, digits):
    x, y = digits[0][:8], digits[1][:8]
    adv = _Broken(EPS)(mlp, x, y)
    _assert_valid(adv, x, EPS)
    assert torch.equal(adv[:, :, 0], x[:, :, 0])  # NaN pixels -> the clean pixel
    assert torch.equal(adv[:, :, 3:], torch.minimum(x[:, :, 3:] + EPS, torch.ones(1)))


# ---- 1b. the same under the l2 threat model ----------------------------------------------------

EPS_L2 = 1.0
ALL_L2 = [n for n in ALL if n != "cw"] + ["l2l:fgsm-sdi"]  # cw is the paper's CW-linf: refused under l2


def _assert_valid_l2(adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert (adv - x).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    assert adv.min() >= 0 and adv.max() <= 1


def _sdi(eps: float) -> LearnedAttack:
    attack = LearnedAttack.__new__(LearnedAttack)
    Attack.__init__(attack, eps, "l2")
    torch.manual_seed(0)
    attack.attacker = create_attacker("sdi", in_channels=2, out_channels=1, width=0.25).eval()
    attack.config = TrainConfig(method="fgsm-sdi", eps=eps, norm="l2").resolve()
    attack.image_shape, attack.method, attack.name = (1, 8, 8), "fgsm-sdi", "l2l:fgsm-sdi"
    return attack


@pytest.mark.parametrize("kind", ["finite", "nan", "inf"])
@pytest.mark.parametrize("name", ALL_L2)
def test_attacks_stay_in_the_l2_ball_and_box(mlp, digits, name, kind):
    x, y = digits[0][1400:1440], digits[1][1400:1440]
    if name.startswith("autoattack"):
        x, y = x[:12], y[:12]
    model = mlp if kind == "finite" else Sqrt(mlp, 0.0 if kind == "nan" else 1e-3).eval()
    attack = _sdi(EPS_L2) if name == "l2l:fgsm-sdi" else _attack(name, EPS_L2, "l2")
    assert attack.threat.name == "l2"
    adv = attack(model, x, y)
    _assert_valid_l2(adv, x, EPS_L2)
    assert (adv != x).any()
    if kind == "finite" and name not in ("l2l:naive-l2l", "l2l:grad-l2l", "l2l:2step-l2l"):
        # the perturbation is a real l2 one: far beyond the l-inf radius at some pixel
        with torch.no_grad():
            fooled = (model(adv).argmax(1) != y).float().mean()
        assert fooled > 0.1


def test_cw_is_refused_under_l2():
    with pytest.raises(UserError, match="l-inf only") as e:
        make_attack("cw", 0.5, norm="l2")
    assert "\n" not in str(e.value)


# ---- 2. results depend only on the model, the images, the attack and the seed ------------------


def _data(x: torch.Tensor, y: torch.Tensor) -> ImageData:
    return ImageData((x * 255).round().to(torch.uint8), y)


def test_results_do_not_depend_on_other_attacks_order_or_batch_size(mlp, digits):
    data = _data(digits[0][1400:1460], digits[1][1400:1460])
    aa = AutoAttack(EPS, "fast", batch_size=25)  # its own chunks: 25, 25, 10 images

    def run(names, batch_size, seed=0):
        attacks = [aa if n == "autoattack-fast" else _attack(n) for n in names]
        return attack_correct(mlp, data, attacks, batch_size, CPU, seed)

    alone = run(["pgd5"], 60)
    mixed = run(["cwpgd5", "fgsm-rs", "autoattack-fast", "pgd5"], 7)
    reordered = run(["autoattack-fast", "pgd5", "fgsm-rs", "cwpgd5"], 16)
    assert torch.equal(alone["pgd5"], mixed["pgd5"])
    for name in ("clean", "cwpgd5", "fgsm", "autoattack-fast", "pgd5", "worst"):
        assert torch.equal(mixed[name], reordered[name]), name
    assert 0 < int(mixed["pgd5"].sum()) < 60  # a result that could differ


def test_random_starts_follow_the_seed_and_the_image_not_the_batch(mlp, digits):
    x, y = digits[0][1400:1432], digits[1][1400:1432]
    pgd = PGD(EPS, steps=1, step_size=1e-9)  # the adversarial images are the random starts
    whole = pgd(mlp, x, y)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = pgd(mlp, x[perm], y[perm])
    assert torch.equal(shuffled, whole[perm])  # an image's start does not depend on its neighbours
    assert torch.equal(pgd(mlp, x[:5], y[:5]), whole[:5])
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(pgd(mlp, x, y), whole)
    other = pgd(mlp, x, y, seed=1)
    assert not torch.equal(other, whole)
    renamed = PGD(EPS, steps=1, step_size=1e-9, name="pgd1-other")
    assert not torch.equal(renamed(mlp, x, y), whole)  # each attack has its own stream


# ---- 3. the caller's state ---------------------------------------------------------------------


def _unusual_state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    model.train()
    model[2].eval()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[1].grad = torch.ones_like(params[1])
    return [m.training for m in model.modules()], [p.requires_grad for p in params]


def _restore(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    model.eval()


HELPERS = ["attack_correct", "attack_accuracy", "transfer_accuracy", "input_gradient_ok", "sanity_checks",
           "attack_call"]


@pytest.mark.parametrize("helper", HELPERS)
def test_helpers_keep_modes_flags_grads_and_the_global_rng(digits, helper):
    model = _mlp(*digits, seed=1, dropout=True)
    surrogate = _mlp(*digits, seed=2)
    data = _data(digits[0][1400:1416], digits[1][1400:1416])
    modes, flags = _unusual_state(model)
    s_modes, s_flags = _unusual_state(surrogate)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    attacks = [make_attack("fgsm", EPS), make_attack("pgd3", EPS)]
    if helper == "attack_correct":
        attack_correct(model, data, attacks, 8, CPU, seed=5)
    elif helper == "attack_accuracy":
        attack_accuracy(model, data, attacks, 8, CPU, seed=5)
    elif helper == "transfer_accuracy":
        transfer_accuracy(surrogate, model, data, attacks, 8, CPU, seed=5)
    elif helper == "input_gradient_ok":
        input_gradient_ok(model, data, 8, CPU)
    elif helper == "sanity_checks":
        sanity_checks(model, data, EPS, batch_size=16, seed=5, surrogate=surrogate)
    else:
        make_attack("autoattack-fast", EPS)(model, data.images[:4].float() / 255, data.labels[:4])
    try:
        assert torch.equal(torch.rand(3), expected)  # neither reseeded nor consumed
        for m, (mo, fl) in ((model, (modes, flags)), (surrogate, (s_modes, s_flags))):
            assert [x.training for x in m.modules()] == mo
            assert [p.requires_grad for p in m.parameters()] == fl
            params = list(m.parameters())
            assert torch.equal(params[1].grad, torch.ones_like(params[1]))
            assert all(p.grad is None for i, p in enumerate(params) if i != 1)
    finally:
        _restore(model)
        _restore(surrogate)


# ---- 4. images and labels checked at the boundary ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16, torch.int8])
@pytest.mark.parametrize("name", ALL)
def test_labels_of_any_integer_dtype(mlp, digits, name, dtype):
    x, y = digits[0][1400:1408], digits[1][1400:1408]
    if name.startswith("autoattack"):
        x, y = x[:4], y[:4]
    reference = _attack(name)(mlp, x, y)
    assert torch.equal(_attack(name)(mlp, x, y.to(dtype)), reference)


@pytest.mark.parametrize("name", ALL)
def test_bad_labels_fail_in_every_attack(mlp, digits, name):
    x, y = digits[0][:4], digits[1][:4]
    attack = _attack(name)
    for bad, match in (
        (torch.tensor([0, 1, 2, 10]), "out of range"),
        (torch.tensor([0, -1, 2, 3]), "out of range"),
        (y.float(), "integer"),
        (y[:, None], "1-D"),
        (y[:3], "3 labels"),
        ([0, 1, 2, 3], "torch.Tensor"),
    ):
        with pytest.raises(UserError, match=match):
            attack(mlp, x, bad)


@pytest.mark.parametrize("name", ["pgd5", "cw", "autoattack-fast"])
def test_bad_images_fail_in_every_attack(mlp, digits, name):
    x, y = digits[0][:4], digits[1][:4]
    attack = _attack(name)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    for bad, match in (
        ((x * 255).to(torch.uint8), "floating point.*255"),
        (x[:, 0], "4-D"),
        (x * 2, r"\[0, 1\]"),
        (x - 0.5, r"\[0, 1\]"),
        (nan, "NaN"),
        (x.numpy(), "torch.Tensor"),
    ):
        with pytest.raises(UserError, match=match):
            attack(mlp, bad, y)


def test_attack_correct_checks_labels_once_against_the_model(mlp, digits):
    x, y = digits[0][:20], digits[1][:20].clone()
    y[-1] = 10
    with pytest.raises(UserError, match="label 10 is out of range.*10 classes"):
        attack_correct(mlp, _data(x, y), [], 8, CPU)
    ok = attack_correct(mlp, _data(x, digits[1][:20].to(torch.uint8)), [make_attack("fgsm", EPS)], 8, CPU)
    assert len(ok["fgsm"]) == 20


# ---- 8. evaluating any nn.Module -------------------------------------------------------------


def test_evaluate_model_on_tensors(digits):
    from learn2defend import evaluate_model

    model = _mlp(*digits, seed=3, dropout=True)
    x, y = digits[0][1400:1440], digits[1][1400:1440]
    modes, flags = _unusual_state(model)
    try:
        result = evaluate_model(model, x, y.to(torch.int32), attacks=["fgsm", "pgd5", "pgd5"], eps=EPS, batch_size=16)
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        _restore(model)
    acc = result["accuracy"]
    assert list(acc) == ["clean", "fgsm", "pgd5", "worst"] and result["n"] == 40 and result["eps"] == EPS
    with torch.no_grad():
        assert acc["clean"] == (model(x).argmax(1) == y).sum().item() / 40
    assert acc["worst"] <= min(acc["fgsm"], acc["pgd5"]) < acc["clean"]
    same = evaluate_model(model, x, y, attacks=[make_attack("pgd5", EPS), "fgsm"], eps=EPS, batch_size=7)
    assert same["accuracy"] == acc  # any batch size, any order, Attack objects or names
    assert evaluate_model(model, x, y)["accuracy"] == {"clean": acc["clean"]}


def test_evaluate_model_on_a_data_set_with_checks(mlp):
    from learn2defend import evaluate_model

    result = evaluate_model(mlp, "digits", attacks=["pgd5"], eps=EPS, n=24, checks=True, batch_size=24)
    assert result["dataset"] == "digits" and result["split"] == "val" and result["n"] == 24
    assert set(result["checks"]) >= {"more_steps", "large_eps", "gradients"}
    assert isinstance(result["flagged"], bool)


def test_evaluate_model_rejects_bad_input(mlp, digits):
    from learn2defend import evaluate_model

    x, y = digits[0][:8], digits[1][:8]
    for kwargs, match in (
        (dict(images=x, labels=y, attacks=["pgd5"]), "eps is required"),
        (dict(images=x, labels=None), "labels are required"),
        (dict(images=x * 255, labels=y), r"\[0, 1\]"),
        (dict(images=x, labels=y + 5), "out of range"),
        (dict(images=x, labels=y, attacks=["pgd"], eps=EPS), "unknown attack"),
        (dict(images=x, labels=y, attacks=[3], eps=EPS), "attack names or"),
        (dict(images=x, labels=y, eps=2.0), "eps"),
        (dict(images=x, labels=y, batch_size=0), "batch_size"),
    ):
        with pytest.raises(UserError, match=match):
            evaluate_model(mlp, **kwargs)
