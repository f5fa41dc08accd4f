"""LIET (--method liet): the class-wise starts refreshed every K batches of an epoch, the start
and the final point in the eps-ball and [0, 1], the Jensen-Shannon term and its growing weight,
exact mid-epoch resume, and the same starts on every rank under torchrun."""

import dataclasses
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from test_distributed import _env, _free_port
from test_methods import EPS, make_ctx, toy_batch
from test_train import cfg, train_crashing_at, weights

from learn2defend import methods, train
from learn2defend.checkpoint import load_state
from learn2defend.config import TrainConfig
from learn2defend.errors import UserError
from learn2defend.methods import (
    LIET_MASK_RATIO,
    LIET_STATE,
    METHOD_RECORDS,
    js_divergence,
    liet_class_starts,
    liet_js_weight,
    liet_step,
)


def _trained_ctx(steps=20, **overrides):
    """A liet context after `steps` steps on the toy batch: batch norm has moved away from its
    initial statistics, so the grey image's input gradient is not zero (at initialization a
    grey image normalizes to 0 and every ReLU of smallcnn sits at its kink)."""
    ctx = make_ctx("liet", **overrides)
    x, y = toy_batch(64)
    for i in range(steps):
        ctx.step_index = i
        liet_step(ctx, x, y)
    ctx.state[LIET_STATE] = liet_class_starts(ctx, x)  # the trained net's starts
    return ctx


def _forward_inputs(ctx, x, y):
    """Every batch the classifier sees during one liet step, in order."""
    seen = []
    handle = ctx.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        liet_step(ctx, x, y)
    finally:
        handle.remove()
    return seen


def test_defaults_follow_the_authors_8_255_config():
    c = TrainConfig(method="liet", eps=8 / 255).resolve()
    assert (c.attack.start_every, c.loss.js_weight, c.attack.step_size) == (20, 100.0, pytest.approx(8 / 255))
    assert LIET_MASK_RATIO == (0.1, 0.5)
    assert METHOD_RECORDS["liet"].forwards(c) == (7.0, 0.0)
    assert METHOD_RECORDS["liet"].forwards(TrainConfig(method="liet", clean_weight=0.5).resolve()) == (10.0, 0.0)


def test_counted_macs_spread_the_class_wise_query_over_its_period():
    """bench.step_macs counts the first step, a refresh: the class-wise query (two passes per
    class at the grey image, whatever the batch) is spread over --start-every batches, so a
    step of 128 images costs the cost model's 7 forwards per image plus 2 x 4 classes / 20."""
    from learn2defend.bench import forward_macs, step_macs
    from learn2defend.runs import build_classifier

    meta = {"image_shape": [1, 8, 8], "classes": [str(i) for i in range(4)], "mean": [0.5], "std": [0.5]}
    c = TrainConfig(method="liet", dataset="fake:1x8x8:4", model="smallcnn", batch_size=128).resolve()
    forward = forward_macs(build_classifier(c, meta).eval(), torch.zeros(1, 1, 8, 8))
    per_image = step_macs(c, meta) / 128 / forward
    assert per_image == pytest.approx(7.0 + 2 * 4 / 20 / 128, rel=0.02)
    every_batch = dataclasses.replace(c, attack=dataclasses.replace(c.attack, start_every=1))
    assert step_macs(every_batch, meta) / 128 / forward > per_image + 2 * 4 / 128 * 0.9  # a query every batch


def test_class_wise_starts_are_refreshed_every_k_batches_of_an_epoch_only(monkeypatch):
    ctx = make_ctx("liet", start_every=3)
    ctx.batches_per_epoch = 7  # the refreshes restart with each epoch, as the authors' idx % K
    x, y = toy_batch()
    real, refreshed = methods.liet_class_starts, []

    def counting(ctx_, like):
        refreshed.append(ctx_.step_index)
        return real(ctx_, like)

    monkeypatch.setattr(methods.starts, "liet_class_starts", counting)
    kept = []
    for index in range(14):
        ctx.step_index = index
        before = ctx.state.get(LIET_STATE)
        liet_step(ctx, x, y)
        kept.append(before is ctx.state[LIET_STATE])
    assert refreshed == [0, 3, 6, 7, 10, 13]
    assert [not k for k in kept] == [i in refreshed for i in range(14)]


def test_class_wise_starts_are_eps_signs_of_the_grey_images_gradient():
    ctx = _trained_ctx()
    starts = liet_class_starts(ctx, toy_batch()[0])
    assert starts.shape == (2, 1, 8, 8)
    assert torch.all(torch.isclose(starts.abs(), torch.tensor(EPS)) | (starts == 0)) and starts.abs().sum() > 0
    ctx.model.eval()
    grey = torch.full((2, 1, 8, 8), 0.5, requires_grad=True)
    (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(grey), torch.arange(2)), grey)
    torch.testing.assert_close(starts, EPS * g.sign())
    assert not torch.equal(starts[0], starts[1])  # one start per class


def test_class_wise_query_in_chunks_of_the_batch_size_gives_the_same_starts():
    ctx = _trained_ctx()
    whole = liet_class_starts(ctx, toy_batch()[0])
    ctx.config = dataclasses.replace(ctx.config, batch_size=1)  # one grey image per chunk
    torch.testing.assert_close(liet_class_starts(ctx, toy_batch()[0]), whole)


def test_start_and_final_point_stay_in_the_ball_and_the_image_box():
    ctx = _trained_ctx()
    x, y = toy_batch(64)
    x = x.clone()
    x[:8] = 0.0  # pixels at the box's edges
    x[8:16] = 1.0
    for index in (20, 21):  # a refresh, then a batch that reuses the starts
        ctx.step_index = index
        batches = [b for b in _forward_inputs(ctx, x, y) if len(b) == len(x)]
        start, final = batches[0], batches[1]
        for point in (start, final):
            assert (point - x).abs().max() <= EPS + 1e-6
            assert point.min() >= 0 and point.max() <= 1
        assert (final - x).abs().max() > EPS / 2 and (start - x).abs().max() > EPS / 2


def test_start_is_the_class_start_with_a_share_of_noise_and_one_sign_per_batch():
    ctx = _trained_ctx()
    x = torch.full((64, 1, 8, 8), 0.5)  # away from the box: nothing is clipped
    y = torch.arange(64) % 2
    for seed in range(4):
        torch.manual_seed(seed)
        ctx.step_index = 21  # no refresh: the stored starts
        start = _forward_inputs(ctx, x, y)[0]
        delta, class_start = start - x, ctx.state[LIET_STATE][y]
        nonzero = class_start != 0
        signs = {s for s in (1.0, -1.0) if torch.isclose(delta, s * class_start)[nonzero].float().mean() > 0.3}
        assert len(signs) == 1  # the whole batch takes one sign
        kept = torch.isclose(delta, signs.pop() * class_start)[nonzero].float().mean().item()
        low, high = LIET_MASK_RATIO
        assert 1 - high - 0.05 <= kept <= 1 - low + 0.05  # the rest is uniform noise in the ball
        assert delta.abs().max() <= EPS + 1e-6


def test_js_divergence_matches_its_definition():
    torch.manual_seed(0)
    a, b = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    reference = ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2
    torch.testing.assert_close(js_divergence(a, b), reference)
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    assert js_divergence(a, a).abs() < 1e-6
    far = torch.tensor([[200.0, -200.0]])  # underflowing probabilities: still finite, at its bound
    assert js_divergence(far, -far).item() == pytest.approx(math.log(2), rel=1e-5)
    # the gradient reaches both predictions
    a.requires_grad_(True)
    b.requires_grad_(True)
    js_divergence(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_js_weight_grows_linearly_to_its_value_in_the_last_epoch():
    ctx = make_ctx("liet", js_weight=80.0, epochs=4)
    ctx.batches_per_epoch = 5
    weights_by_step = []
    for index in range(20):
        ctx.step_index = index
        weights_by_step.append(liet_js_weight(ctx))
    assert weights_by_step == [20.0] * 5 + [40.0] * 5 + [60.0] * 5 + [80.0] * 5


def test_the_js_term_enters_the_loss_with_its_weight(monkeypatch):
    ctx = _trained_ctx(js_weight=50.0, epochs=2)
    ctx.batches_per_epoch = 10
    ctx.step_index = 10  # epoch 2 of 2: the full weight
    terms = {}

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            terms[name] = fn(*args, **kwargs)
            return terms[name]
        return wrapper

    monkeypatch.setattr(methods.starts, "mixed_loss", recorded("ce", methods.mixed_loss))
    monkeypatch.setattr(methods.starts, "js_divergence", recorded("js", methods.js_divergence))
    x, y = toy_batch(64)
    loss = liet_step(ctx, x, y)["loss"] / len(y)
    assert terms["js"] > 0
    torch.testing.assert_close(loss, terms["ce"].detach() + 50.0 * terms["js"].detach())


def test_liet_options_are_its_own_and_l2_is_refused():
    with pytest.raises(UserError, match="--start-every applies to --method liet only"):
        TrainConfig(method="fgsm", start_every=5).resolve()
    with pytest.raises(UserError, match="--js-weight applies to --method liet only"):
        TrainConfig(method="n-fgsm", js_weight=5.0).resolve()
    with pytest.raises(UserError, match="--start-every must be a positive integer"):
        TrainConfig(method="liet", start_every=0).resolve()
    with pytest.raises(UserError, match="--js-weight must lie in"):
        TrainConfig(method="liet", js_weight=-1.0).resolve()
    with pytest.raises(UserError, match="--method liet has no l2 form"):
        TrainConfig(method="liet", norm="l2", eps=0.5).resolve()


def test_liet_run_has_finite_metrics_and_checkpoints_its_starts(tmp_path):
    run = train(cfg(tmp_path, method="liet", start_every=3))
    for record in run.history:
        assert all(math.isfinite(record[k]) for k in ("train_loss", "train_acc", "attack_success",
                                                      "val_clean_acc", "val_pgd10_acc"))
    state = load_state(run.path / "last.safetensors")
    starts = state["method_state"][LIET_STATE]
    assert starts.shape == (4, 1, 8, 8)
    magnitudes = starts.abs()
    assert torch.all(torch.isclose(magnitudes, torch.tensor(0.03)) | (magnitudes == 0))  # eps 0.03: fake data's


def test_liet_resume_from_mid_epoch_checkpoint_is_exact(tmp_path, monkeypatch):
    """The checkpoint after batch 4 of epoch 2 holds the starts refreshed at its 4th batch (K 3);
    batches 5 and 6 use them, so the resumed run must have them back to match."""
    settings = dict(method="liet", start_every=3, epochs=2, checkpoint_every=4)
    full = train(cfg(tmp_path, "full", **settings))
    train_crashing_at(cfg(tmp_path, "part", **settings), 8 + 6, monkeypatch)  # batch 6 of epoch 2 (8 per epoch)
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (1, 4)
    assert LIET_STATE in state["method_state"]
    resumed = train(cfg(tmp_path, "part", **settings), resume=True)
    for k, v in weights(full).items():
        assert torch.equal(v, weights(resumed)[k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    a, b = load_state(full.path / "last.safetensors"), load_state(resumed.path / "last.safetensors")
    assert torch.equal(a["method_state"][LIET_STATE], b["method_state"][LIET_STATE])


# Two gloo processes with batch norm (smallcnn): each rank's running statistics follow its own
# images between syncs, so the grey image's gradient in eval mode differs between ranks; the
# starts must still be rank 0's everywhere.
WORKER = textwrap.dedent("""
    import sys
    import torch
    from learn2defend import TrainConfig, distributed, methods, train

    out, seen, real = sys.argv[1], [], methods.STEPS["liet"]
    starts = []

    def step(ctx, x, y):
        metrics = real(ctx, x, y)
        starts.append(ctx.state[methods.LIET_STATE].clone())
        seen.append(ctx)
        return metrics

    methods.STEPS["liet"] = step
    distributed.init_from_env("cpu")
    run = train(TrainConfig(out=out, dataset="fake:1x8x8:4", train_size=256, val_size=64, model="smallcnn",
                            method="liet", start_every=2, epochs=1, batch_size=16, lr=0.1, val_robust_n=0,
                            progress=False, device="cpu", data_dir=out + "-data"))
    torch.save({"starts": starts, "model": run.model.state_dict()}, f"{out}/liet-rank{distributed.rank()}.pt")
""")


def test_every_rank_uses_rank_0s_class_wise_starts(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=localhost:{_free_port()}", str(script), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"liet-rank{r}.pt") for r in range(2))
    assert len(rank0["starts"]) == 8
    assert any(s.abs().sum() > 0 for s in rank0["starts"])
    for a, b in zip(rank0["starts"], rank1["starts"], strict=True):
        assert torch.equal(a, b)
    for k, v in rank0["model"].items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, rank1["model"][k]), k
