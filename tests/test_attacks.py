"""Attacks on tiny models trained inline on scikit-learn's 8x8 digits (images in [0, 1])."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from learn2defend.attacks import (
    PGD,
    AutoAttack,
    CWLinf,
    fgsm_delta,
    list_attack_names,
    make_attack,
    margin_loss,
    pgd_delta,
    register_attack_prefix,
)
from learn2defend.attacks import registry as attack_registry
from learn2defend.errors import UserError

EPS = 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: extra threads only add contention on a shared 2-core machine.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.3) / 0.4


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.tensor(d.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize(), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    return _train(model, *digits[:2])


@pytest.fixture(scope="module")
def bn_net(digits):
    """A CNN with BatchNorm and dropout, whose outputs depend on the mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8 * 64, 10),
    )
    return _train(model, *digits[:2], steps=100)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_valid(adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert adv.shape == x.shape and not adv.requires_grad and adv.grad_fn is None
    assert (adv - x).abs().max().item() <= eps + 1e-6
    assert adv.min().item() >= 0 and adv.max().item() <= 1


@pytest.mark.parametrize("name", ["fgsm", "pgd10", "pgm10", "cwpgd10", "cw", "autoattack-fast"])
def test_every_attack_stays_in_eps_ball_and_image_box(name, mlp, digits):
    x, y = digits[2][:64], digits[3][:64]
    if name.startswith("autoattack"):
        x, y = x[:8], y[:8]
    assert x.min() == 0 and x.max() == 1  # pixels on both box faces get clipped
    attack = make_attack(name, EPS)
    adv = attack(mlp, x, y)
    assert_valid(adv, x, EPS)
    assert accuracy(mlp, adv, y) <= accuracy(mlp, x, y)


@pytest.mark.parametrize("name", ["fgsm", "pgd10", "pgm10", "cwpgd10", "cw", "autoattack-fast"])
def test_eps_zero_returns_the_images(name, mlp, digits):
    x, y = digits[2][:8], digits[3][:8]
    assert torch.equal(make_attack(name, 0.0)(mlp, x, y), x)


def test_pgd_at_large_eps_breaks_a_plain_model(mlp, digits):
    x, y = digits[2][:200], digits[3][:200]
    assert accuracy(mlp, x, y) > 0.85
    assert accuracy(mlp, make_attack("pgd10", 0.3)(mlp, x, y), y) <= 0.02


def test_accuracy_ordering_clean_fgsm_pgd(mlp, digits):
    x, y = digits[2], digits[3]
    torch.manual_seed(0)
    clean = accuracy(mlp, x, y)
    fgsm = accuracy(mlp, make_attack("fgsm", EPS)(mlp, x, y), y)
    pgd = accuracy(mlp, make_attack("pgd20", EPS)(mlp, x, y), y)
    assert clean > fgsm + 0.2
    assert fgsm >= pgd


def test_pgd_agrees_with_torchattacks(mlp, digits):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits[2], digits[3]
    ours = PGD(EPS, steps=10, step_size=EPS / 4, random_start=False)(mlp, x, y)
    theirs = torchattacks.PGD(mlp, eps=EPS, alpha=EPS / 4, steps=10, random_start=False)(x, y)
    assert abs(accuracy(mlp, ours, y) - accuracy(mlp, theirs, y)) <= 0.02


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert torch.equal(margin_loss(logits, torch.tensor([0, 2])), torch.tensor([-1.0, 6.0]))


def test_cw_freezes_fooled_samples_and_reduces_accuracy(mlp, digits):
    x, y = digits[2][:128], digits[3][:128].clone()
    y[:16] = (y[:16] + 1) % 10  # wrong labels: "misclassified" before any step
    wrong = mlp(x).argmax(1) != y
    calls = []
    hook = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        adv = CWLinf(EPS)(mlp, x, y)
    finally:
        hook.remove()
    assert_valid(adv, x, EPS)
    assert wrong[:16].all() and torch.equal(adv[wrong], x[wrong])  # delta exactly 0
    assert len(calls) <= 101  # the budget, all samples together, + one forward reading the classes
    cw = accuracy(mlp, adv, y)
    assert cw < accuracy(mlp, x, y) - 0.2
    torch.manual_seed(0)
    pgd = accuracy(mlp, make_attack("pgd20", EPS)(mlp, x, y), y)
    assert cw <= pgd + 0.05  # about as strong as PGD, as the paper reports


def test_cw_budget_stops_early_when_all_fooled(mlp, digits):
    x, y = digits[2][:32], digits[3][:32]
    calls = []
    hook = mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        adv = CWLinf(0.5)(mlp, x, y)
    finally:
        hook.remove()
    assert accuracy(mlp, adv, y) == 0 and len(calls) < 100


@pytest.mark.parametrize("training", [True, False])
def test_functional_cores_have_no_side_effects(bn_net, digits, training):
    x, y = digits[2][:32], digits[3][:32]
    bn_net.train(training)
    flags = [p.requires_grad for p in bn_net.parameters()]
    try:
        with torch.no_grad():  # callers may sit inside no_grad: gradients still work
            d1 = fgsm_delta(bn_net, x, y, EPS, step_size=1.25 * EPS, random_start=True)
            d2 = pgd_delta(bn_net, x, y, EPS, steps=3, step_size=EPS / 2, loss="margin")
        for d in (d1, d2):
            assert not d.requires_grad and d.grad_fn is None
            assert_valid(x + d, x, EPS)
            assert d.abs().max() > 0
        assert all(m.training == training for m in bn_net.modules())
        assert all(p.grad is None for p in bn_net.parameters())
        assert [p.requires_grad for p in bn_net.parameters()] == flags
    finally:
        bn_net.eval()


@pytest.mark.parametrize("core", ["fgsm", "pgd-ce", "pgd-margin"])
def test_functional_cores_do_not_depend_on_batch_split(mlp, digits, core):
    x, y = digits[2][:96], digits[3][:96]

    def run(xb, yb):
        if core == "fgsm":
            return fgsm_delta(mlp, xb, yb, EPS)
        return pgd_delta(mlp, xb, yb, EPS, steps=5, step_size=EPS / 4, loss=core[4:])

    whole = run(x, y)
    split = torch.cat([run(x[:17], y[:17]), run(x[17:], y[17:])])
    # Equal up to sign flips of gradients that are zero up to float error.
    assert (whole - split).abs().gt(1e-6).float().mean() < 0.01


@pytest.mark.parametrize("name", ["fgsm", "pgd3", "cw", "autoattack-fast"])
def test_attack_objects_restore_modes_and_grads(bn_net, digits, name):
    x, y = digits[2][:4], digits[3][:4]
    bn_net.train()
    bn_net[2].eval()  # mixed modes must come back exactly
    modes = [m.training for m in bn_net.modules()]
    flags = [p.requires_grad for p in bn_net.parameters()]
    bn_net[1].weight.grad = torch.ones_like(bn_net[1].weight)  # an existing grad stays
    seen = []
    hook = bn_net.register_forward_hook(lambda m, *_: seen.append(m.training))
    try:
        make_attack(name, EPS)(bn_net, x, y)
        assert seen and not any(seen)  # attacked in eval mode
        assert [m.training for m in bn_net.modules()] == modes
        assert [p.requires_grad for p in bn_net.parameters()] == flags
        assert torch.equal(bn_net[1].weight.grad, torch.ones_like(bn_net[1].weight))
        assert all(p.grad is None for n, p in bn_net.named_parameters() if n != "1.weight")
    finally:
        hook.remove()
        bn_net[1].weight.grad = None
        bn_net.eval()


def test_pgd_restarts_keep_the_first_success(mlp, digits):
    x, y = digits[2][:200], digits[3][:200]
    torch.manual_seed(1)
    single = accuracy(mlp, PGD(EPS, steps=3)(mlp, x, y), y)
    torch.manual_seed(1)
    multi = accuracy(mlp, PGD(EPS, steps=3, restarts=4)(mlp, x, y), y)
    assert multi <= single


def test_make_attack_settings():
    pgm = make_attack("pgm10", 0.03)
    assert isinstance(pgm, PGD) and pgm.name == "pgm10" and not pgm.random_start
    assert math.isclose(pgm.step_size, 0.01) and pgm.steps == 10 and pgm.loss == "ce"
    pgd = make_attack("PGD50", 8 / 255)
    assert pgd.random_start and math.isclose(pgd.step_size, 2.5 * (8 / 255) / 50)
    cwpgd = make_attack("cwpgd20", 0.03, restarts=2, step_size=0.005)
    assert cwpgd.loss == "margin" and cwpgd.restarts == 2 and cwpgd.step_size == 0.005
    assert make_attack("pgd10", 0.03, steps=20).steps == 20
    assert make_attack("pgm7", 0.03, random_start=True).random_start
    cw = make_attack("cw", 0.03)
    assert isinstance(cw, CWLinf) and cw.steps == 100
    aa = make_attack("autoattack", 0.03)
    assert isinstance(aa, AutoAttack) and aa.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")
    fast = make_attack("autoattack-fast", 0.03, seed=3, batch_size=64)
    assert fast.attacks == ("apgd-ce", "apgd-t") and fast.seed == 3
    assert make_attack("fgsm", 0.03).name == "fgsm"
    assert "pgdK" in list_attack_names() and "l2l:DIR" in list_attack_names()


@pytest.mark.parametrize("name", ["pgd", "pgd0", "pgdx", "pgd-10", "cw10", "fgsm2", "", "deepfool"])
def test_unknown_attack_names(name):
    with pytest.raises(UserError, match="pgdK"):
        make_attack(name, 0.03)


@pytest.mark.parametrize("eps", [-0.01, 1.5, float("nan"), "0.03", None, True])
def test_bad_eps(eps):
    with pytest.raises(UserError, match="eps"):
        make_attack("pgd10", eps)


def test_bad_options():
    with pytest.raises(UserError, match="restarts"):
        make_attack("fgsm", 0.03, restarts=3)
    with pytest.raises(UserError, match="steps"):
        make_attack("pgd10", 0.03, steps=0)
    with pytest.raises(UserError, match="step_size"):
        make_attack("pgm10", 0.03, step_size=-1.0)


def test_prefixes_are_resolved_by_name_on_first_use(monkeypatch):
    # "l2l:" is named as "module:function" and imported when first used: nothing needs to
    # import learn2defend.learned_attack for the names to work
    monkeypatch.setattr(attack_registry, "_PREFIXES", {"l2l:": "learn2defend.learned_attack:attack_factory"})
    with pytest.raises(UserError, match="not a run folder"):
        make_attack("l2l:/no/such/run", 0.03)
    assert callable(attack_registry._PREFIXES["l2l:"])  # imported once, kept
    seen = {}

    def factory(rest, eps, **options):
        seen.update(rest=rest, eps=eps, **options)
        return PGD(eps, steps=1)

    register_attack_prefix("mine:", factory)
    assert isinstance(make_attack("mine:runs/Grad", 0.03, steps=2), PGD)
    assert seen == {"rest": "runs/Grad", "eps": 0.03, "steps": 2}
    assert list_attack_names("pgd*") == ["pgdK"] and "l2l:DIR" in list_attack_names()


class Quantized(nn.Module):
    """Rounds its input: zero input gradients everywhere (gradient masking)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x * 4).round() / 4)


def test_autoattack_captures_warnings_and_keeps_stdout_clean(mlp, digits, capsys):
    masked = Quantized(mlp).eval()
    x, y = digits[2][:6], digits[3][:6]
    attack = AutoAttack(0.3, attacks=["apgd-t", "square"])  # DLR: zero-grad check
    rng = torch.get_rng_state()
    adv = attack(masked, x, y)
    assert torch.equal(torch.get_rng_state(), rng)  # its seeding does not leak
    assert_valid(adv, x, 0.3)
    out = capsys.readouterr()
    assert out.out == ""
    text = "\n".join(attack.warnings).lower()
    assert "zero gradient" in text and "square" in text
    assert attack.log and attack.robust is not None


def test_autoattack_resumes_from_state(mlp, digits, tmp_path, monkeypatch):
    import pyautoattack

    x, y = digits[2][8:24], digits[3][8:24]
    attacks = ["apgd-ce", "apgd-t"]
    reference = AutoAttack(0.06, attacks=attacks)(mlp, x, y)
    state = tmp_path / "chunk0.pt"

    original = pyautoattack.AutoAttack.run_standard_evaluation

    def killed_in_apgd_t(self, *args, **kwargs):
        if self.attacks_to_run == ["apgd-t"]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", killed_in_apgd_t)
    with pytest.raises(KeyboardInterrupt):
        AutoAttack(0.06, attacks=attacks)(mlp, x, y, state_path=state)
    monkeypatch.undo()
    assert state.exists()
    resumed = AutoAttack(0.06, attacks=attacks)
    adv = resumed(mlp, x, y, state_path=state)
    assert torch.equal(adv, reference)
    assert not any(line.startswith("apgd-ce") for line in resumed.log)  # not run again
    with pytest.raises(UserError, match="another run"):
        AutoAttack(0.06, attacks=attacks)(mlp, x[:8], y[:8], state_path=state)


def test_autoattack_fab_backward_leaves_no_param_grads(mlp, digits):
    # FAB computes its gradients with .backward(), which would fill param.grad.
    x, y = digits[2][:2], digits[3][:2]
    attack = AutoAttack(EPS, attacks=["fab-t"])
    adv = attack(mlp, x, y)
    assert_valid(adv, x, EPS)
    assert any(line.startswith("fab-t:") for line in attack.log)  # FAB did run
    assert all(p.grad is None for p in mlp.parameters())
