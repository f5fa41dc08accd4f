"""The speed switches (--amp, --channels-last, --compile) on the CPU: each one gives the
float32 eager training step, exactly or within a stated tolerance; fp16 loss scaling
keeps the one-backward gradient-reversal update equal to the two-backward reference;
the switches are stored in config.json and survive a resume."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from learn2defend import TrainConfig, speed, train
from learn2defend.config import L2L_METHODS, METHODS
from learn2defend.errors import UserError
from learn2defend.methods import STEPS, learned_perturbation, reverse_gradient
from learn2defend.train import build_parts

CPU = torch.device("cpu")
META = {"image_shape": [1, 8, 8], "classes": ["0", "1"], "mean": [0.5], "std": [0.25]}


def toy_batch(n=32, seed=0):
    """Two classes that differ in mean brightness."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (0.3 + 0.4 * y.view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


def run_steps(method, steps, **switches):
    """`steps` training steps as train() takes them (build_parts + Parts.step); returns the
    parts, a copy from before and the per-image losses. The attacker uses SGD: Adam's first
    steps move every weight by about lr * sign(gradient), so a weight whose true gradient is
    zero (a conv bias right before batch norm) takes full steps in the direction of rounding
    noise, which differs between any two ways of computing the same step."""
    cfg = TrainConfig(method=method, eps=0.1, lr=0.05, attacker_width=0.125, attacker_optimizer="sgd",
                      **switches).resolve()
    parts = build_parts(cfg, META, CPU)
    before = copy.deepcopy(parts)
    step = parts.step(cfg, CPU)
    x, y = toy_batch()
    losses = [step(x, y)["loss"].item() / len(y) for _ in range(steps)]
    return parts, before, losses


def networks(parts):
    return [parts.model] + ([parts.attacker] if parts.attacker is not None else [])


def assert_same_step(a, b, before, classifier_rtol, attacker_min_cosine=0.99):
    """The classifier's weight change agrees within `classifier_rtol` (relative L2 error over
    all its weights), the attacker's points the same way."""
    (a_cls, *a_att), (b_cls, *b_att) = updates(a, before), updates(b, before)
    assert float((a_cls - b_cls).norm() / b_cls.norm()) < classifier_rtol
    for u, v in zip(a_att, b_att, strict=True):
        assert float(F.cosine_similarity(u, v, dim=0)) > attacker_min_cosine


def updates(parts, before):
    """Each network's weight change since `before`, flattened (classifier, then attacker)."""
    return [torch.cat([(p - p0).detach().flatten() for p, p0 in zip(n.parameters(), n0.parameters(), strict=True)])
            for n, n0 in zip(networks(parts), networks(before), strict=True)]


# Measured on this toy problem (torch 2.14, 3 steps): the classifier's bf16 update differs
# from the float32 one by 1-5 % (pgd most: ten sign steps amplify rounding), the losses by
# < 0.3 %. The attacker's gradient comes back through a bf16 backward of the whole
# classifier: its update differs by 14-17 % but points the same way (cosine 0.986-0.991).
BF16_CLASSIFIER_RTOL = 0.15
BF16_ATTACKER_MIN_COSINE = 0.95
BF16_LOSS_RTOL = 0.02  # per step
# TRADES' attack starts 0.001 from the image (its reference code), where the adversarial and
# clean logits differ by less than bf16 resolves: its first sign step follows rounding, not
# the KL, and the difference compounds over the three updates. Measured here (AVX2 CPU):
# the third step's loss 26-35 % off (0.38 against 0.28), the classifier's update 28 %.
# MART starts at the same 0.001: its second step's loss 2.2-2.8 % off, the classifier 7 %.
# FGSM-SDI's learned start is followed by a sign step: rounding flips some of its pixels, and
# the third step's loss differs by 2-3 % (measured: 0.129 against 0.126).
# FGSM-PGI: each step starts from the sign steps the previous one stored (here the same batch three
# times), so a pixel that rounding flips stays flipped: measured 17 % on the update, 5.1 % on the
# third loss (0.513 against 0.487).
# fgsm-sdi-memory stores where the steps ended and starts the next step from it (here the same
# batch three times): flipped pixels carry over, as FGSM-PGI's: measured 3.9-4.0 % on the third
# loss (0.113 against 0.109), 9 % on the update, attacker cosine 0.906.
BF16_TOLERANCES = {"trades": (0.5, 0.5), "mart": (0.15, 0.05), "fgsm-sdi": (0.15, 0.05),
                   "fgsm-pgi": (0.3, 0.1), "fgsm-sdi-memory": (0.15, 0.06)}  # (classifier, loss rtol)
# FGSM-SDI's attacker takes a single Adam step in these three (every 5 batches): Adam's per-coordinate
# normalization makes tiny coordinates count as much as large ones; cosine 0.949 measured.
BF16_ATTACKER_COSINE = {"fgsm-sdi": 0.9, "fgsm-sdi-memory": 0.85}


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_trains_every_method_close_to_float32(method):
    exact, before, exact_losses = run_steps(method, 3)
    bf16, _, bf16_losses = run_steps(method, 3, amp="bf16")
    assert bf16_losses[-1] < bf16_losses[0]  # it trains
    classifier_rtol, loss_rtol = BF16_TOLERANCES.get(method, (BF16_CLASSIFIER_RTOL, BF16_LOSS_RTOL))
    assert bf16_losses == pytest.approx(exact_losses, rel=loss_rtol)
    assert_same_step(bf16, exact, before, classifier_rtol, BF16_ATTACKER_COSINE.get(method, BF16_ATTACKER_MIN_COSINE))
    assert all(p.dtype == torch.float32 for net in networks(bf16) for p in net.parameters())


# PGD's ten sign steps turn rounding-level differences of the input gradient into flipped
# perturbation pixels: its update differs by ~4 % under channels_last (measured), the
# other methods' by < 0.2 %, except TRADES (0.8 %): its attack's first steps, 0.001 from the
# image, follow gradients at rounding level.
LAYOUT_CLASSIFIER_RTOL = {"pgd": 0.1, "trades": 0.05}
# TRADES' first loss: its KL term is measured after that rounding-level attack; 0.19 % apart
# on an AVX2 CPU (oneDNN's NHWC and NCHW kernels sum in other orders), < 0.1 % on AVX-512.
LAYOUT_LOSS_RTOL = {"trades": 5e-3}


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_gives_the_same_step(method):
    exact, before, exact_losses = run_steps(method, 2)
    nhwc, _, nhwc_losses = run_steps(method, 2, channels_last=True)
    conv = next(p for p in nhwc.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the switch really applied
    assert_same_step(nhwc, exact, before, LAYOUT_CLASSIFIER_RTOL.get(method, 2e-3))
    assert nhwc_losses[0] == pytest.approx(exact_losses[0], rel=LAYOUT_LOSS_RTOL.get(method, 1e-3))


@pytest.mark.parametrize("method, overrides",
                         [(m, {}) for m in METHODS] + [("grad-l2l", {"l2l_update": "alternating"})])
def test_compile_traces_every_method_and_gives_the_eager_step(method, overrides, monkeypatch):
    # aot_eager: torch.compile's graph capture and autograd tracing of our networks, the
    # alternating update's train/eval switch included, without building kernels (fast).
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    exact, before, exact_losses = run_steps(method, 2, **overrides)
    compiled, _, compiled_losses = run_steps(method, 2, compile=True, **overrides)
    assert type(compiled.ctx.model).__name__ == "OptimizedModule"
    assert_same_step(compiled, exact, before, 1e-4, attacker_min_cosine=0.9999)
    assert compiled_losses == pytest.approx(exact_losses, rel=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor builds C++ kernels on the CPU with g++")
def test_compile_with_generated_kernels_gives_the_eager_step():
    # Real inductor kernels for classifier and attacker. Slow on a cold cache (~45 s on two
    # shared cores, building ~20 kernels), a few seconds once /tmp/torchinductor_$USER holds them.
    exact, before, _ = run_steps("grad-l2l", 2)
    compiled, _, _ = run_steps("grad-l2l", 2, compile=True)
    assert_same_step(compiled, exact, before, 1e-3)


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_loss_scaling_keeps_the_reversal_update_equal_to_two_backwards(clean_weight):
    """Under a GradScaler the joint update's gradients, as the optimizers see them at their
    step, equal the unscaled two-backward reference (classifier descends, attacker ascends)."""
    cfg = TrainConfig(method="grad-l2l", eps=0.1, lr=0.05, attacker_width=0.125, clean_weight=clean_weight).resolve()
    parts = build_parts(cfg, META, CPU)
    ref = copy.deepcopy(parts)
    parts.ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # float32 math: the scaling alone
    seen = {}
    for name, opt in (("model", parts.optimizer), ("attacker", parts.attacker_optimizer)):
        opt.register_step_pre_hook(lambda o, a, k, name=name: seen.update(
            {name: [p.grad.clone() for g in o.param_groups for p in g["params"]]}))
    x, y = toy_batch()
    STEPS["grad-l2l"](parts.ctx, x, y)

    w, r = clean_weight, ref.ctx
    x_q = x.clone().requires_grad_(True)
    logits_clean = r.model(x_q)
    (g,) = torch.autograd.grad(F.cross_entropy(logits_clean, y, reduction="sum"), x_q, retain_graph=True)
    adv_loss = F.cross_entropy(r.model((x + learned_perturbation(r, x, y, g)).clamp(0, 1)), y)
    cls_grads = torch.autograd.grad((1 - w) * adv_loss + w * F.cross_entropy(logits_clean, y),
                                    list(r.model.parameters()), retain_graph=True)
    att_grads = torch.autograd.grad(adv_loss, list(r.attacker.parameters()))

    assert parts.ctx.scaler.get_scale() == 2.0**12  # no overflow: the step was taken, the scale kept
    for got, want in zip(seen["model"], cls_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(seen["attacker"], att_grads, strict=True):
        torch.testing.assert_close(got, -want, rtol=1e-4, atol=1e-6)


def test_reversal_passes_a_scaled_gradient_through_linearly():
    delta = torch.randn(4, 3, requires_grad=True)
    (reverse_gradient(delta, 2.0) * 1024.0).sum().backward()
    assert torch.equal(delta.grad, torch.full_like(delta, -2048.0))


@pytest.mark.parametrize("method", ["fgsm", *L2L_METHODS])
def test_fp16_autocast_with_scaler_trains(method):
    parts, _, losses = run_steps(method, 4, amp="fp16")
    assert parts.ctx.scaler is not None and parts.optimizer.defaults["fused"]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for net in networks(parts) for p in net.parameters())


# ---- through train(): stored, resumed, refused -----------------------------------------------


def cfg(tmp_path, name="run", **kw):
    base = dict(out=str(tmp_path / name), dataset="fake:1x8x8:4", model="smallcnn", epochs=2, batch_size=64,
                lr=0.05, val_size=1536, val_robust_n=32, progress=False, data_dir=str(tmp_path / "data"),
                attacker_width=0.125, method="grad-l2l")
    base.update(kw)
    return TrainConfig(**base)


def test_fp16_run_stores_its_switches_and_resumes_exactly_with_its_scaler(tmp_path):
    # both: the fused optimizers of fp16 once mixed up a loaded NCHW momentum buffer with its
    # NHWC parameter (optim.match_layouts); val_robust_n=0 and few images keep fp16 on the CPU quick
    switches = {"amp": "fp16", "channels_last": True, "val_robust_n": 0, "train_size": 192, "val_size": 64}
    full = train(cfg(tmp_path, "full", **switches))
    train(cfg(tmp_path, "part", epochs=1, **switches))
    stored = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (stored["amp"], stored["channels_last"], stored["compile"]) == ("fp16", True, False)
    from learn2defend.checkpoint import load_state

    assert load_state(tmp_path / "part" / "last.safetensors")["scaler"]["scale"] > 0
    resumed = train(cfg(tmp_path, "part", **switches), resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_resume_refuses_another_amp_and_allows_layout_switches(tmp_path, monkeypatch):
    train(cfg(tmp_path, epochs=1, val_robust_n=0))
    with pytest.raises(UserError, match=r"--amp \(the run: off, given: bf16\)"):
        train(cfg(tmp_path, epochs=2, val_robust_n=0, amp="bf16"), resume=True)
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    run = train(cfg(tmp_path, epochs=2, val_robust_n=0, channels_last=True, compile=True), resume=True)
    assert run.epoch == 2 and json.loads((run.path / "config.json").read_text())["compile"] is True


def test_old_config_without_switches_loads_with_them_off(tmp_path):
    run = train(cfg(tmp_path, epochs=1, val_robust_n=0, method="plain"))
    path = run.path / "config.json"
    old = json.loads(path.read_text())
    for name in ("amp", "channels_last", "compile", "tf32", "cudnn_benchmark"):
        del old[name]  # as written before the switches existed
    path.write_text(json.dumps(old))
    loaded = TrainConfig.load(path)
    assert (loaded.amp, loaded.channels_last, loaded.compile, loaded.tf32) == ("off", False, False, False)
    assert TrainConfig().tf32 is None  # while a new run takes its device's default: TF32 on for CUDA
    assert speed.resolve_switches(TrainConfig().resolve(), torch.device("cuda"), 10)[0].speed.tf32 is True
    assert train(cfg(tmp_path, epochs=2, val_robust_n=0, method="plain"), resume=True).epoch == 2


def test_switches_this_run_cannot_honour_are_user_errors():
    with pytest.raises(UserError, match="unknown amp 'fp8'"):
        TrainConfig(amp="fp8").validate()
    with pytest.raises(UserError, match="torchrun"):
        speed.check_switches(TrainConfig(amp="fp16"), CPU, world=2)
    speed.check_switches(TrainConfig(amp="bf16"), CPU, world=2)  # bf16 needs no scaler: fine


def test_cuda_math_sets_and_restores_the_backend_flags():
    # The flags are plain settings, so this runs without a GPU; on CUDA they pick the kernels.
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    with speed.cuda_math(tf32=True, benchmark=True):
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (True, True, True)
        with speed.float32_math("cuda"):  # evaluation inside: IEEE float32
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == before


# ---- defaults per device (speed.DEVICE_DEFAULTS) -----------------------------------------------


def test_defaults_are_chosen_per_device_and_given_flags_win(monkeypatch):
    monkeypatch.setattr(speed.shutil, "which", lambda name: "/usr/bin/g++")  # a compiler, whatever this machine has
    unset = TrainConfig().resolve()
    assert (unset.speed.channels_last, unset.speed.compile, unset.speed.tf32) == (None, None, None)
    cpu, why = speed.resolve_switches(unset, CPU, steps=100)
    assert (cpu.speed.channels_last, cpu.speed.compile) == (True, False)
    assert "channels_last on (cpu default)" in why and "compile off" in why
    # compile "auto" (on where the run wins its compilation back): off for short runs, on for long ones
    monkeypatch.setitem(speed.DEVICE_DEFAULTS, "cpu", {**speed.DEVICE_DEFAULTS["cpu"], "compile": "auto"})
    short, why = speed.resolve_switches(unset, CPU, steps=100)
    assert short.speed.compile is False and "compile off (run of 100 steps too short" in why
    long, why = speed.resolve_switches(unset, CPU, steps=speed.COMPILE_MIN_STEPS["cpu"])
    assert long.speed.compile is True and "compile on" in why
    cuda, why = speed.resolve_switches(unset, torch.device("cuda", 0), steps=10**6)  # a device object, no GPU used
    assert (cuda.speed.channels_last, cuda.speed.compile, cuda.speed.tf32, cuda.speed.cudnn_benchmark) == (
        False, False, True, False)
    assert "tf32 on (cuda default)" in why
    given = TrainConfig(channels_last=False, compile=True, tf32=False).resolve()
    cpu, why = speed.resolve_switches(given, CPU, steps=1)
    assert (cpu.speed.channels_last, cpu.speed.compile) == (False, True) and "channels_last off (given)" in why
    assert speed.resolve_switches(given, torch.device("cuda"), 1)[0].speed.tf32 is False
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    no_compiler, why = speed.resolve_switches(unset, CPU, steps=10**9)
    assert no_compiler.speed.compile is False and "no C++ compiler" in why


def test_the_no_flags_turn_each_default_off():
    from learn2defend.cli import build_parser

    args = build_parser().parse_args(["train", "--no-channels-last", "--no-compile", "--no-tf32",
                                      "--no-cudnn-benchmark"])
    assert (args.channels_last, args.compile, args.tf32, args.cudnn_benchmark) == (False, False, False, False)
    args = build_parser().parse_args(["train"])  # neither given: the device's default
    assert (args.channels_last, args.compile, args.tf32, args.cudnn_benchmark) == (None, None, None, None)


def test_a_run_with_the_cpu_defaults_records_them_says_why_and_trains_as_the_old_switches(tmp_path, capsys):
    # one epoch of 3 steps: the defaults (channels_last on, compile off: far too short) against
    # the old switches (all off); within the channels_last tolerance of a step (2e-3, above)
    short = dict(epochs=1, val_robust_n=0, train_size=192, val_size=64)
    new = train(cfg(tmp_path, "new", **short))
    err = capsys.readouterr().err
    assert "speed: channels_last on (cpu default), compile off (" in err
    stored = json.loads((tmp_path / "new" / "config.json").read_text())
    assert (stored["channels_last"], stored["compile"]) == (True, False)  # what ran, not None
    old = train(cfg(tmp_path, "old", channels_last=False, compile=False, **short))
    for (name, a), b in zip(new.model.state_dict().items(), old.model.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert float((a - b).norm()) <= 2e-3 * float(b.norm()) + 1e-6, name
    assert new.history[0]["train_loss"] == pytest.approx(old.history[0]["train_loss"], rel=1e-3)


def test_a_run_with_the_cpu_defaults_resumes_exactly(tmp_path):
    short = dict(val_robust_n=0, train_size=192, val_size=64)
    full = train(cfg(tmp_path, "full", **short))
    train(cfg(tmp_path, "part", epochs=1, **short))
    resumed = train(cfg(tmp_path, "part", **short), resume=True)
    assert json.loads((tmp_path / "part" / "config.json").read_text())["channels_last"] is True
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.attacker.state_dict().values(), resumed.attacker.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]


def test_a_run_is_attacked_in_the_layout_of_its_device_with_the_same_accuracies(tmp_path, monkeypatch):
    # eval loads a run's classifier in the device's layout (channels_last on the CPU, the
    # training default there); the attacks' float32 math is unchanged, so the accuracies equal
    # those of the same weights attacked in the contiguous layout
    from learn2defend.evaluate import EvalConfig, evaluate, load_attacked

    def nhwc(model):  # (a 1-channel input's weights are both layouts at once: left out)
        return [m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]

    train(cfg(tmp_path, "run", epochs=1, val_robust_n=0, train_size=192, val_size=64))
    layouts = nhwc(load_attacked(tmp_path / "run", "last", CPU).model)
    assert layouts and all(layouts)
    config = EvalConfig(checkpoint=str(tmp_path / "run"), attacks=["pgd10", "autoattack-fast"], n=48, progress=False)
    nhwc_result = evaluate(config)
    monkeypatch.setitem(speed.DEVICE_DEFAULTS["cpu"], "channels_last", False)
    assert not any(nhwc(load_attacked(tmp_path / "run", "last", CPU).model))
    assert evaluate(config)["accuracy"] == nhwc_result["accuracy"]
    assert 0 < nhwc_result["accuracy"]["clean"]
    model = build_parts(TrainConfig(method="fgsm").resolve(), META, CPU).model
    assert not any(nhwc(speed.evaluation_layout(model, "cuda")))  # CUDA's default keeps the layout


def test_validation_batches_change_neither_the_training_nor_its_numbers(tmp_path, monkeypatch):
    # the CPU validates in batches of 64 (faster there); l-inf PGD-10 draws its random starts
    # from the global RNG in image order, so the run trains exactly as with the old batches
    # (512 clean, 256 PGD-10), through the RNG the validation shares with training
    short = dict(epochs=2, val_robust_n=150, train_size=192, val_size=200, method="fgsm", random_start=True)
    assert speed.validation_batches(CPU) == (64, 64) and speed.validation_batches("cuda") == (512, 256)
    new = train(cfg(tmp_path, "new", **short))
    monkeypatch.setitem(speed.VALIDATION_BATCHES, "cpu", (512, 256))
    old = train(cfg(tmp_path, "old", **short))
    for a, b in zip(new.model.state_dict().values(), old.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    keys = ("train_loss", "val_clean_acc", "val_pgd10_acc")
    assert [[r[k] for k in keys] for r in new.history] == [[r[k] for k in keys] for r in old.history]
