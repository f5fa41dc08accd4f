"""The learned starts beyond FGSM-SDI: fgsm-sdi-image (the start from the image alone, no clean
gradient query) and fgsm-sdi-memory (a learned update of the image's perturbation from its last
visit, kept in a per-image memory): the steps on a tiny model, what the attacker sees, the
memory's rows, the attacker's gradient (numerical check), bit-exact resume, `l2l:DIR`."""

import pytest
import torch
import torch.nn.functional as F
from test_methods import EPS, make_ctx, toy_batch
from test_pgi import _cfg
from test_train import train_crashing_at

from learn2defend import TrainConfig, train
from learn2defend.bench import forward_macs, step_macs
from learn2defend.checkpoint import load_state
from learn2defend.memory import PerturbationMemory
from learn2defend.methods import METHOD_RECORDS, attacker_in_channels, fgsm_sdi_step
from learn2defend.runs import build_classifier

NEW = ["fgsm-sdi-image", "fgsm-sdi-memory"]


def _recording(ctx):
    """The classifier's inputs in order, and the attacker's."""
    seen = {"classifier": [], "attacker": []}
    hooks = [ctx.model.register_forward_pre_hook(lambda m, a: seen["classifier"].append(a[0].detach().clone())),
             ctx.attacker.register_forward_pre_hook(lambda m, a: seen["attacker"].append(a[0].detach().clone()))]
    return seen, hooks


@pytest.mark.parametrize("method", NEW)
def test_the_point_is_in_the_ball_and_the_box_and_the_step_trains(method):
    ctx = make_ctx(method)
    x, y = toy_batch()
    x = x.clone()
    x[:4], x[4:8] = 0.0, 1.0  # pixels at the box's edges
    with torch.no_grad():  # a saturated attacker: its start on the ball's boundary
        for p in ctx.attacker.parameters():
            p.mul_(50)
    seen, hooks = _recording(ctx)
    losses = [float(fgsm_sdi_step(ctx, x, y)["loss"]) for _ in range(6)]
    for h in hooks:
        h.remove()
    x_adv = seen["classifier"][-1]
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2
    assert losses[-1] < losses[0]


def test_the_image_start_sees_the_image_alone_and_makes_no_clean_query():
    ctx = make_ctx("fgsm-sdi-image")
    x, y = toy_batch()
    seen, hooks = _recording(ctx)
    fgsm_sdi_step(ctx, x, y)
    for h in hooks:
        h.remove()
    assert attacker_in_channels("fgsm-sdi-image", 1) == 1
    torch.testing.assert_close(seen["attacker"][0], x)  # the image, nothing else
    # two step queries and the training forward; the first query is at the start, not at x
    assert len(seen["classifier"]) == 3 and not torch.equal(seen["classifier"][0], x)


def test_the_memory_start_sees_the_remembered_point_and_writes_where_it_ended():
    ctx = make_ctx("fgsm-sdi-memory")
    x, y = toy_batch(8)
    ctx.memory = PerturbationMemory(20, (1, 8, 8), "cpu", momentum=False)
    assert ctx.memory.momentum is None and PerturbationMemory.nbytes(20, (1, 8, 8), 1) == 20 * 64 * 4
    remembered = (torch.rand(20, 1, 8, 8) * 2 - 1) * EPS
    ctx.memory.delta.copy_(remembered)
    ctx.indices = torch.tensor([3, 7, 1, 0, 19, 12, 5, 9])
    seen, hooks = _recording(ctx)
    fgsm_sdi_step(ctx, x, y)
    for h in hooks:
        h.remove()
    assert attacker_in_channels("fgsm-sdi-memory", 1) == 3
    a = seen["attacker"][0]
    torch.testing.assert_close(a[:, :1], x)
    # the remembered rows, in the ball for this view of the image, scaled by 1 / eps
    expected = (remembered[ctx.indices].clamp(-EPS, EPS).clamp(-x, 1 - x)) / EPS
    torch.testing.assert_close(a[:, 2:], expected)
    written = ctx.memory.delta[ctx.indices]
    torch.testing.assert_close(written, seen["classifier"][-1] - x, rtol=0, atol=1e-6)  # where the step ended
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[ctx.indices] = False
    assert torch.equal(ctx.memory.delta[untouched], remembered[untouched])


@pytest.mark.parametrize("method", NEW)
def test_the_attacker_ascends_the_loss_at_the_final_point(method):
    """As for fgsm-sdi: the attacker's (reversed) gradient is that of +CE at the final point
    through its start, equal to autograd's on the same function, and a step along it raises
    the loss."""
    ctx = make_ctx(method, attacker_every=1)
    x, y = toy_batch()
    if method == "fgsm-sdi-memory":
        ctx.memory = PerturbationMemory(len(x), (1, 8, 8), "cpu", momentum=False)
        ctx.memory.delta.copy_((torch.rand_like(x) * 2 - 1) * EPS)
    remembered = None if ctx.memory is None else ctx.memory.delta.clone()
    ctx.model.eval()
    ctx.attacker.eval()

    def loss_at_final_point():
        parts = [x]
        if method == "fgsm-sdi-memory":
            query = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(ctx.model(query), y, reduction="sum"), query)
            parts += [g.sign(), remembered.clamp(-EPS, EPS).clamp(-x, 1 - x) / EPS]
        delta = ctx.attacker(torch.cat(parts, 1), EPS).clamp(-EPS, EPS).clamp(-x, 1 - x)
        for _ in range(2):
            q = delta.detach().requires_grad_(True)
            (g2,) = torch.autograd.grad(F.cross_entropy(ctx.model(x + q), y, reduction="sum"), q)
            delta = (delta + EPS / 2 * g2.sign()).clamp(-EPS, EPS).clamp(-x, 1 - x)
        return F.cross_entropy(ctx.model(x + delta), y)

    ctx.optimizer.param_groups[0]["lr"] = 0.0
    params = list(ctx.attacker.parameters())
    saved = [p.detach().clone() for p in params]
    fgsm_sdi_step(ctx, x, y)
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    direct = torch.autograd.grad(loss_at_final_point(), params)
    for g, d in zip(grads, direct, strict=True):
        torch.testing.assert_close(g, -d, rtol=1e-3, atol=1e-6)
    # A descent step on the reversed gradient raises the loss. The gradient is small (~5e-3: the
    # sign steps after the start carry most of the loss) and the function is piecewise smooth
    # (a longer step flips some of their signs), so: a short step, measured in float64.
    ctx.model.double()
    ctx.attacker.double()
    x, remembered = x.double(), None if remembered is None else remembered.double()
    norm = torch.sqrt(sum((g * g).sum() for g in grads)).double()
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s.double())
    before = loss_at_final_point().item()
    with torch.no_grad():
        for p, s, g in zip(params, saved, grads, strict=True):
            p.copy_(s.double() - 1e-5 / norm * g.double())
    assert loss_at_final_point().item() > before


def test_cost_the_image_start_saves_the_clean_query():
    meta = {"image_shape": [1, 8, 8], "classes": [str(i) for i in range(4)], "mean": [0.5], "std": [0.5]}
    per_image = {}
    for method in ("fgsm-sdi-image", "fgsm-sdi-memory"):
        c = TrainConfig(method=method, dataset="fake:1x8x8:4", model="smallcnn", batch_size=64).resolve()
        assert METHOD_RECORDS[method].forwards(c)[0] == (7.0 if method == "fgsm-sdi-image" else 9.0)
        forward = forward_macs(build_classifier(c, meta).eval(), torch.zeros(1, 1, 8, 8))
        per_image[method] = step_macs(c, meta) / 64 / forward
    assert per_image["fgsm-sdi-memory"] - per_image["fgsm-sdi-image"] == pytest.approx(2.0, abs=0.3)


def test_resume_mid_epoch_is_bit_exact_with_the_memory_in_last(tmp_path, monkeypatch):
    kw = dict(method="fgsm-sdi-memory", pgi_reset=None)
    full = train(_cfg(tmp_path, "full", **kw))
    train_crashing_at(_cfg(tmp_path, "part", **kw), 8 + 6, monkeypatch)
    state = load_state(tmp_path / "part" / "last.safetensors")
    assert set(state["memory"]) == {"delta"} and state["memory"]["delta"].abs().max() > 0
    resumed = train(_cfg(tmp_path, "part", **kw), resume=True)
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    a, b = (load_state(r.path / "last.safetensors")["memory"]["delta"] for r in (full, resumed))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", NEW)
def test_l2l_attack_of_a_run_rebuilds_its_attacker(tmp_path, method):
    from learn2defend.attacks import make_attack
    from learn2defend.learned_attack import attack_factory  # noqa: F401 (registers l2l:)

    run = train(_cfg(tmp_path, method, method=method, pgi_reset=None, epochs=1))
    attack = make_attack(f"l2l:{run.path}", 0.1)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 4
    x_adv = attack(run.model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and (x_adv - x).abs().max() > 0
