"""The bench command's output contract and its refusals; no timing is asserted (shared CI
machines make any time bound flaky)."""

import json

import pytest
import torch
import torch.nn.functional as F

from learn2defend.cli import main
from learn2defend.config import METHODS

TINY = ["bench", "--model", "smallcnn", "--dataset", "fake:1x8x8:4", "--batch-size", "8",
        "--steps", "2", "--warmup", "1", "--attacker-width", "0.0625", "--device", "cpu", "--roofline-seconds", "0.05"]


def test_bench_json_contract(capsys):
    assert main([*TINY, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # stdout is exactly one JSON object
    for key in ("seconds_per_step", "ratio_to_pgd", "ratio_to_fgsm", "peak_memory_bytes",
                "device", "model", "batch_size", "attacker", "steps", "memory_kind",
                "cpu_seconds_per_step"):
        assert key in result
    assert list(result["seconds_per_step"]) == list(METHODS)
    assert all(t > 0 for t in result["seconds_per_step"].values())
    assert result["ratio_to_pgd"]["pgd"] == pytest.approx(1.0)
    assert result["ratio_to_fgsm"]["fgsm"] == pytest.approx(1.0)
    assert set(result["peak_memory_bytes"]) == set(METHODS)
    assert (result["model"], result["batch_size"], result["steps"]) == ("smallcnn", 8, 2)
    assert result["device"] == "cpu" and result["attacker"] is None  # each method its own attacker


def test_bench_ratios_only_for_timed_references_and_table(capsys):
    assert main([*TINY, "--methods", "plain,grad-l2l,attacker-only", "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threads"] == 1
    assert list(result["seconds_per_step"]) == ["plain", "grad-l2l", "attacker-only"]
    assert result["ratio_to_pgd"] is None and result["ratio_to_fgsm"] is None

    assert main([*TINY, "--methods", "fgsm,grad-l2l"]) == 0
    table = capsys.readouterr().out
    assert "grad-l2l" in table and "x fgsm" in table


@pytest.mark.parametrize("extra, message", [
    (["--methods", "fgsm,nope"], "unknown method 'nope'"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--steps", "0"], "--steps must be"),
    (["--threads", "0"], "--threads must be"),
    (["--attacker", "nope"], "unknown attacker 'nope'"),
])
def test_bench_bad_input_is_one_line_and_exit_2(capsys, extra, message):
    assert main([*TINY, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.count("\n") == 1


# ---- the fast step: one backward of the clean graph serves the attack and the clean term ----

def _ctx(method: str, clean_weight: float):
    from learn2defend.config import TrainConfig
    from learn2defend.methods import StepContext, attacker_in_channels
    from learn2defend.models import create_attacker, create_model
    from learn2defend.optim import make_optimizer

    cfg = TrainConfig(method=method, eps=0.1, lr=0.05, clean_weight=clean_weight,
                      attacker_width=0.125).resolve()
    torch.manual_seed(0)
    model = create_model("smallcnn", num_classes=2, in_channels=1, image_size=8)
    opt = make_optimizer(cfg.optimizer, model.parameters())
    attacker = attacker_opt = None
    if cfg.attacker is not None:
        attacker = create_attacker("slim", in_channels=attacker_in_channels(method, 1),
                                   out_channels=1, width=cfg.attacker.width)
        attacker_opt = make_optimizer(cfg.optimizer, attacker.parameters())
    return StepContext(model, opt, cfg, attacker, attacker_opt)


def _reference_step(ctx, x, y) -> None:
    """The same update the slow way: the clean graph is kept and walked back twice."""
    from learn2defend.methods import learned_perturbation

    c, w = ctx.config, ctx.config.loss.clean_weight
    x_q = x.clone().requires_grad_(True)
    logits_clean = ctx.model(x_q)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_clean, y, reduction="sum"), x_q,
                               retain_graph=True)
    if c.method == "fgsm":
        delta = (c.attack.step_size * g.sign()).clamp(-c.eps, c.eps)
    else:
        delta = learned_perturbation(ctx, x, y, g)
    adv = F.cross_entropy(ctx.model((x + delta).clamp(0, 1)), y)
    params = list(ctx.model.parameters())
    clean = F.cross_entropy(logits_clean, y)
    grads = torch.autograd.grad((1 - w) * adv + w * clean, params, retain_graph=True)
    if ctx.attacker is not None:  # the attacker ascends the adversarial loss
        att_params = list(ctx.attacker.parameters())
        for p, gp in zip(att_params, torch.autograd.grad(adv, att_params), strict=True):
            p.grad = -gp
        ctx.attacker_optimizer.step()
    for p, gp in zip(params, grads, strict=True):
        p.grad = gp
    ctx.optimizer.step()


@pytest.mark.parametrize("method", ["fgsm", "grad-l2l"])
def test_single_clean_backward_gives_the_same_update(method):
    from learn2defend.methods import STEPS

    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.1 * torch.randn(16, 1, 8, 8, generator=g)).clamp(0, 1)
    fast, slow = _ctx(method, 0.5), _ctx(method, 0.5)
    for _ in range(2):
        STEPS[method](fast, x, y)
        _reference_step(slow, x, y)
    fast_state, slow_state = fast.model.state_dict(), slow.model.state_dict()
    for a, b in zip(fast_state.values(), slow_state.values(), strict=True):  # BN stats too
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if method != "fgsm":
        for a, b in zip(fast.attacker.parameters(), slow.attacker.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- the MAC cost model against the multiply-accumulates a real step performs ----

@pytest.mark.parametrize("method, overrides", [(m, {}) for m in METHODS] + [
    ("fgsm", {"clean_weight": 0.0}), ("fgsm", {"random_start": True}), ("fgsm", {"amp": "fp16"}),
    ("naive-l2l", {"clean_weight": 0.5}), ("grad-l2l", {"clean_weight": 0.5}),
    ("grad-l2l", {"clean_weight": 0.5, "amp": "fp16"}), ("2step-l2l", {"clean_weight": 0.5}),
    ("grad-l2l", {"l2l_update": "alternating"}), ("grad-l2l", {"attacker_steps": 2}),
    ("2step-l2l", {"attacker_steps": 2}),
])
def test_mac_model_counts_what_a_step_computes(method, overrides):
    from learn2defend.bench import count_macs, step_macs_per_image
    from learn2defend.config import TrainConfig
    from learn2defend.train import build_parts

    meta = {"image_shape": [1, 8, 8], "classes": ["0", "1"], "mean": [0.5], "std": [0.25]}
    cfg = TrainConfig(method=method, eps=0.1, lr=0.05, attacker_width=0.125, **overrides).resolve()
    parts = build_parts(cfg, meta, torch.device("cpu"))
    step = parts.step(cfg, torch.device("cpu"))
    x = torch.rand(16, 1, 8, 8)
    if method == "liet":  # its class-wise query runs once every K batches, outside the model: count a batch between
        step(x, torch.arange(16) % 2)
        parts.ctx.step_index = 1
    counted = count_macs(lambda: step(x, torch.arange(16) % 2))  # backward passes included
    # The model charges every backward as 2 forwards; the first layer's gradient with respect
    # to the images, which nothing needs, is skipped in reality: a fraction of a percent.
    assert counted == pytest.approx(16 * step_macs_per_image(cfg, meta), rel=0.01)


def test_bench_starts_no_step_after_its_deadline():
    import time

    from learn2defend.bench import BenchConfig, bench

    result = bench(BenchConfig(model="smallcnn", dataset="fake:1x8x8:4", batch_size=8, steps=2, warmup=0,
                               methods=["plain", "fgsm"], attacker_width=0.0625, device="cpu"),
                   deadline=time.monotonic() - 1)
    assert result["rounds_timed"] == 0 and result["seconds_per_step"] == {"plain": None, "fgsm": None}
    assert result["macs_per_step"]["fgsm"] == pytest.approx(2 * result["macs_per_step"]["plain"])


def test_mac_model_averages_the_attacker_updates_over_attacker_every():
    """--attacker-every K: the attacker's backward runs on one batch in K; the model charges
    1 + 2/K attacker forwards per step. Two steps at K = 2 with a wide attacker (about twice
    the classifier's forward, so a wrong charge could not hide in the tolerance)."""
    from learn2defend.bench import count_macs, step_macs_per_image
    from learn2defend.config import TrainConfig
    from learn2defend.train import build_parts

    meta = {"image_shape": [1, 8, 8], "classes": ["0", "1"], "mean": [0.5], "std": [0.25]}
    cfg = TrainConfig(method="fgsm-sdi", eps=0.1, lr=0.05, attacker_every=2).resolve()
    parts = build_parts(cfg, meta, torch.device("cpu"))
    step = parts.step(cfg, torch.device("cpu"))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 2

    def two_steps():
        for index in (0, 1):
            parts.ctx.step_index = index
            step(x, y)

    assert count_macs(two_steps) == pytest.approx(2 * 16 * step_macs_per_image(cfg, meta), rel=0.01)


def test_roofline_probe_gives_a_positive_rate_and_each_method_a_fraction_of_it(capsys):
    from learn2defend.bench import matmul_rate

    rate, size = matmul_rate(torch.device("cpu"), torch.float32, size=64, seconds=0.01)
    assert rate > 0 and size == 64
    assert main([*TINY, "--methods", "plain,fgsm", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    roof = result["roofline"]
    assert set(roof["mac_per_s"]) == {"float32", "bf16"} and all(r > 0 for r in roof["mac_per_s"].values())
    assert roof["threads"] == result["threads"]
    for m in ("plain", "fgsm"):  # float32 steps: the float32 roofline
        assert result["roofline_fraction"][m] == pytest.approx(result["mac_per_s"][m] / roof["mac_per_s"]["float32"])
    assert result["compile_seconds"] == {"plain": None, "fgsm": None}  # no --compile
    assert all(t > 0 for t in result["first_step_seconds"].values())


def test_bench_reports_compile_time_apart_and_skips_the_roofline_at_zero(monkeypatch):
    from learn2defend import speed
    from learn2defend.bench import BenchConfig, bench

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")  # compilation without building kernels
    result = bench(BenchConfig(model="smallcnn", dataset="fake:1x8x8:4", batch_size=8, steps=1, warmup=0,
                               methods=["plain"], device="cpu", compile=True, roofline_seconds=0))
    assert result["roofline"] is None and result["roofline_fraction"] is None
    assert result["compile_seconds"]["plain"] >= 0
    assert result["compile_seconds"]["plain"] == pytest.approx(
        max(0.0, result["first_step_seconds"]["plain"] - result["seconds_per_step"]["plain"]))
