"""The threat models (learn2defend.attacks.threat): projection, step direction and start
under l-inf and l2; PGD-l2 against torchattacks; AutoAttack l2; training and evaluating
under --norm l2; runs and exports written before --norm load as l-inf."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn

from learn2defend.attacks import PGD, THREAT_MODELS, make_attack, threat_model
from learn2defend.attacks.threat import L2, LINF
from learn2defend.config import METHODS, TrainConfig
from learn2defend.errors import UserError
from learn2defend.methods import METHOD_RECORDS, STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the records -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    norm=st.sampled_from(sorted(THREAT_MODELS)),
    seed=st.integers(0, 2**31 - 1),
    eps=st.floats(1e-3, 3.0),
    scale=st.floats(1e-3, 100.0),
)
def test_projection_lands_in_ball_and_box_and_is_idempotent(norm, seed, eps, scale):
    threat = THREAT_MODELS[norm]
    eps = min(eps, threat.eps_max)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 2, 4, 4, generator=gen)
    x[0, 0, 0] = 0.0  # pixels on the box's edges
    x[1, 1, 1] = 1.0
    delta = scale * torch.randn(3, 2, 4, 4, generator=gen)
    delta[2] = 0.0  # a zero perturbation stays zero
    p = threat.project(delta, x, eps)
    assert torch.isfinite(p).all()
    assert (threat.norms(p) <= eps * (1 + 1e-5) + 1e-7).all()
    assert ((x + p) >= 0).all() and ((x + p) <= 1).all()
    assert torch.equal(p[2], torch.zeros_like(p[2]))
    torch.testing.assert_close(threat.project(p, x, eps), p, rtol=1e-5, atol=1e-7)


def test_linf_projection_is_the_old_clamp_bit_for_bit():
    x = torch.rand(4, 3, 5, 5)
    delta = torch.randn(4, 3, 5, 5)
    assert torch.equal(LINF.project(delta, x, 0.03), delta.clamp(-0.03, 0.03).clamp(-x, 1 - x))


def test_l2_step_is_a_unit_ascent_direction_and_finite_for_zero_nan_and_inf():
    g = torch.randn(5, 1, 8, 8)
    g[1] = 0.0  # zero gradient: no step
    g[2, 0, 0, :3] = float("nan")  # NaN components count as 0
    g[3, 0, 1, 1] = float("inf")  # infinite components: a step along their signs alone
    g[3, 0, 2, 2] = float("-inf")
    g[4] = 1e30  # squaring would overflow float32
    d = L2.direction(g)
    assert torch.isfinite(d).all()
    norms = d.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[[0, 2, 3, 4]], torch.ones(4))
    assert norms[1] == 0
    assert (d[0] * g[0]).sum() > 0  # an ascent direction: positive inner product with g
    torch.testing.assert_close(d[0], g[0] / g[0].norm())  # the steepest one for the l2 ball
    assert d[3, 0, 1, 1] > 0 and d[3, 0, 2, 2] < 0 and (d[3].abs() > 0).sum() == 2
    all_nan = L2.direction(torch.full((1, 1, 2, 2), float("nan")))
    assert torch.equal(all_nan, torch.zeros_like(all_nan))


def test_l2_start_is_uniform_in_the_ball():
    torch.manual_seed(0)
    x = torch.full((4000, 1, 2, 2), 0.5)  # d = 4: radius r has P(r <= eps t) = t^4
    start = L2.start(x, 1.0)
    r = start.flatten(1).norm(dim=1)
    assert (r <= 1 + 1e-6).all()
    assert abs(float((r <= 0.5).float().mean()) - 0.5**4) < 0.02
    assert abs(float((r <= 0.9).float().mean()) - 0.9**4) < 0.03
    keyed = L2.start(x[:8], 1.0, lambda *tag: torch.rand(8, 1, 2, 2) * 2 - 1)
    assert (keyed.flatten(1).norm(dim=1) <= 1 + 1e-6).all()


def test_l2_squash_maps_any_output_into_the_ball():
    h = torch.randn(6, 3, 4, 4) * torch.tensor([0.0, 1e-4, 0.1, 1.0, 10.0, 1e6]).view(-1, 1, 1, 1)
    out = L2.squash(h, 0.5)
    assert torch.isfinite(out).all()
    norms = out.flatten(1).norm(dim=1)
    assert (norms <= 0.5 * (1 + 1e-6)).all() and norms[0] == 0 and norms[-1] > 0.49
    assert torch.equal(LINF.squash(h, 0.5), 0.5 * torch.tanh(h))


def test_norm_names_and_eps_ranges():
    assert threat_model(None) is LINF and threat_model("L2") is L2 and threat_model("inf") is LINF
    with pytest.raises(UserError, match="unknown norm"):
        threat_model("l1")
    assert L2.check_eps(2.0) == 2.0  # an l2 radius may exceed 1
    with pytest.raises(UserError, match="8/255"):
        LINF.check_eps(8)
    with pytest.raises(UserError, match="l2 radius"):
        L2.check_eps(-1.0)
    assert TrainConfig(norm="l2").resolve().eps == 1.0  # digits' l2 default
    assert TrainConfig(norm="l2", dataset="cifar10").resolve().eps == 0.5  # RobustBench's


# ---- attacks under l2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_mlp():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(d.target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(200):
            idx = torch.randint(0, 1400, (128,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x[1400:1600], y[1400:1600]


def test_pgd_l2_matches_torchattacks_pgdl2(digits_mlp):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits_mlp
    eps = 1.0
    ours = PGD(eps, steps=10, step_size=eps / 4, random_start=False, norm="l2")(model, x, y)
    theirs = torchattacks.PGDL2(model, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
    # the same iterates up to float rounding (their 1e-10 on the gradient norm, their mean loss
    # against our sum), which ten steps through ReLU kinks grow to a few 1e-4 at some pixels
    assert (ours - theirs).abs().max() < 5e-3
    assert (ours - theirs).abs().gt(1e-4).float().mean() < 0.01
    with torch.no_grad():
        assert (model(ours).argmax(1) == model(theirs).argmax(1)).float().mean() >= 0.99
    assert (ours - x).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    assert (ours != x).any()


def test_fgsm_under_l2_is_one_normalized_step(digits_mlp):
    model, x, y = digits_mlp
    adv = make_attack("fgsm", 0.5, norm="l2")(model, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = (x + L2.project(0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1), x, 0.5)).clamp(0, 1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)


def test_autoattack_l2_runs_and_is_no_weaker_than_pgd_l2(digits_mlp):
    model, x, y = digits_mlp
    x, y = x[:60], y[:60]
    aa = make_attack("autoattack-fast", 1.0, norm="l2")
    adv = aa(model, x, y)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 1.0 * (1 + 1e-5)
    assert ((adv >= 0) & (adv <= 1)).all()
    with torch.no_grad():
        acc_aa = float((model(adv).argmax(1) == y).float().mean())
        acc_pgd = float((model(make_attack("pgd20", 1.0, norm="l2")(model, x, y)).argmax(1) == y).float().mean())
        clean = float((model(x).argmax(1) == y).float().mean())
    assert acc_aa <= acc_pgd and acc_aa < clean - 0.2


def test_pgm_and_cwpgd_under_l2(digits_mlp):
    model, x, y = digits_mlp
    for name in ("pgm5", "cwpgd5"):
        attack = make_attack(name, 1.0, norm="l2")
        assert "norm='l2'" in repr(attack)
        adv = attack(model, x[:40], y[:40])
        assert (adv - x[:40]).flatten(1).norm(dim=1).max() <= 1.0 * (1 + 1e-5)


# ---- training under l2 -------------------------------------------------------------------------


def _toy(n=32):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_a_step_under_l2_or_is_refused(method):
    from learn2defend.methods import StepContext, attacker_in_channels
    from learn2defend.models import create_attacker, create_model
    from learn2defend.optim import make_optimizer

    config = TrainConfig(method=method, norm="l2", eps=0.5, attacker_width=0.125)
    if "l2" in METHOD_RECORDS[method].unsupported_norms:
        with pytest.raises(UserError, match=f"--method {method} has no l2 form: ") as e:
            config.resolve()
        assert "\n" not in str(e.value)
        return
    cfg = config.resolve()
    assert cfg.norm == "l2"
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=2, in_channels=1, image_size=8)
    attacker = attacker_opt = None
    if cfg.attacker is not None:
        attacker = create_attacker(cfg.attacker.name, in_channels=attacker_in_channels(method, 1), out_channels=1,
                                   width=cfg.attacker.width)
        attacker_opt = make_optimizer(cfg.attacker.optimizer, attacker.parameters())
    ctx = StepContext(model, make_optimizer(cfg.optimizer, model.parameters()), cfg, attacker, attacker_opt)
    x, y = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        metrics = STEPS[method](ctx, x, y)
    finally:
        hook.remove()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # every image the classifier saw lies in the l2 ball around x (or is x) and in [0, 1]
    for seen_x in seen:
        if seen_x.shape == x.shape:
            assert (seen_x - x).flatten(1).norm(dim=1).max() <= 0.5 * (1 + 1e-4)
            assert seen_x.min() >= 0 and seen_x.max() <= 1
    if method in ("pgd-at", "fgsm-sdi", "grad-l2l", "trades"):  # an l2 attack, not a per-pixel one
        assert any((s - x).abs().max() > 0.5 / 8 + 1e-3 for s in seen if s.shape == x.shape)


def test_learned_l2_perturbation_stays_in_the_ball_when_saturated():
    from learn2defend.methods import StepContext, attacker_in_channels, learned_perturbation
    from learn2defend.models import create_attacker

    for method in ("naive-l2l", "grad-l2l", "2step-l2l"):
        cfg = TrainConfig(method=method, norm="l2", eps=0.5, attacker_width=0.125).resolve()
        attacker = create_attacker("slim", in_channels=attacker_in_channels(method, 1), out_channels=1, width=0.125)
        with torch.no_grad():
            for p in attacker.parameters():
                p.mul_(50)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        ctx = StepContext(model, None, cfg, attacker)  # type: ignore[arg-type]
        x, y = _toy()
        grad = None if method == "naive-l2l" else torch.randn_like(x)
        delta = learned_perturbation(ctx, x, y, grad)
        assert delta.flatten(1).norm(dim=1).max() <= 0.5 * (1 + 1e-5)


# ---- runs: --norm through train, eval, export; older runs are l-inf -----------------------------


@pytest.fixture(scope="module")
def l2_run(tmp_path_factory):
    from learn2defend.train import train

    out = tmp_path_factory.mktemp("l2") / "run"
    train(TrainConfig(out=str(out), dataset="fake:1x8x8:4", norm="l2", eps=0.7, method="pgd-at", epochs=1,
                      train_size=64, batch_size=32, val_robust_n=8, progress=False, pgd_steps=2))
    return out


def test_l2_run_stores_its_norm_and_eval_defaults_to_it(l2_run):
    from learn2defend.evaluate import EvalConfig, evaluate
    from learn2defend.runs import load_run

    stored = json.loads((l2_run / "config.json").read_text())
    assert stored["norm"] == "l2" and stored["eps"] == 0.7
    assert load_run(l2_run).config.norm == "l2"
    result = evaluate(EvalConfig(checkpoint=str(l2_run), attacks=["pgd5"], n=16, progress=False, device="cpu"))
    assert result["norm"] == "l2" and result["eps"] == 0.7
    linf = evaluate(EvalConfig(checkpoint=str(l2_run), attacks=["pgd5"], n=16, progress=False, device="cpu",
                               norm="linf"))
    assert linf["norm"] == "linf" and linf["eps"] == 0.03  # that norm's default for the data set
    with pytest.raises(UserError, match="l-inf only"):
        evaluate(EvalConfig(checkpoint=str(l2_run), attacks=["cw"], n=4, progress=False, device="cpu"))


def test_runs_and_exports_from_before_norm_load_as_linf(l2_run, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from learn2defend.evaluate import load_evaluated
    from learn2defend.export import export, read_metadata
    from learn2defend.runs import load_run

    old = tmp_path / "old"
    shutil.copytree(l2_run, old)
    config = json.loads((old / "config.json").read_text())
    del config["norm"]
    config["eps"] = 0.03
    (old / "config.json").write_text(json.dumps(config))
    assert load_run(old).config.norm == "linf"

    exported = tmp_path / "m.safetensors"
    assert export(l2_run, exported)["norm"] == "l2"
    assert read_metadata(exported)["norm"] == "l2"
    assert load_evaluated(exported, "last", "cpu").config.norm == "l2"
    with safe_open(str(exported), framework="pt") as f:
        meta = dict(f.metadata())
    del meta["norm"]
    meta["eps"] = "0.03"
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(exported)), str(older), metadata=meta)
    assert read_metadata(older)["norm"] == "linf"
    assert load_evaluated(older, "last", "cpu").config.norm == "linf"


def test_cli_refuses_a_method_without_an_l2_form_before_writing(tmp_path, capsys):
    from learn2defend.cli import main

    out = tmp_path / "nf"
    assert main(["train", "--dataset", "digits", "--norm", "l2", "--method", "n-fgsm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no l2 form" in err
    assert not out.exists()


def test_gray_eps_under_l2_reaches_the_gray_image():
    x = torch.rand(2, 3, 4, 4)
    gray = torch.full_like(x, 0.5)
    assert ((gray - x).flatten(1).norm(dim=1) <= L2.gray_eps(x[0].numel())).all()
    assert L2.gray_eps(48) == pytest.approx(0.5 * math.sqrt(48))


def test_frontier_under_l2_has_its_own_folders_and_leaves_out_methods_without_an_l2_form(tmp_path):
    from dataclasses import replace

    from learn2defend.reproduce import FRONTIER_PRESETS, Reproduction, frontier_specs, reproduce

    preset = replace(FRONTIER_PRESETS["cpu"], norm="l2")
    specs = frontier_specs(preset)
    keys = {s.key for s in specs}
    assert "n-fgsm" not in keys and "pgd-at" in keys and "n-fgsm" in {s.key for s in frontier_specs(
        FRONTIER_PRESETS["cpu"])}
    r = Reproduction(preset.for_dataset("digits"), tmp_path)
    spec = next(s for s in specs if s.method == "pgd-at")
    config = r.config("digits", "frontier", spec)
    assert config.norm == "l2" and config.resolve().eps == 1.0
    assert r.eps_suffix("digits") == "-l2" and "-l2" in str(r.run_dir("digits", "frontier", spec))
    plain = next(s for s in specs if s.is_init) if any(s.is_init for s in specs) else None
    if plain is not None:
        assert r.config("digits", "frontier", plain).norm == "linf"  # the shared plain nets
    with pytest.raises(UserError, match="frontier only"):
        reproduce("table2", "cpu", tmp_path, norm="l2")


def test_compare_names_the_norm():
    from learn2defend.compare import report

    rows = [{"method": "pgd-at", "clean": 0.9, "pgd10": 0.5, "eps": 1.0, "norm": "l2", "n": 10, "epochs": 1,
             "seconds_per_epoch": 1.0}]
    text = report(TrainConfig(norm="l2"), rows)
    assert "l2 eps 1" in text and "| norm" not in text
