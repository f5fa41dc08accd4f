"""Evaluation: l2l:DIR attacks, eval --checks, transfer, sweep, show, AutoAttack chunks and
resume; on tiny smallcnn runs trained inline on digits (module-scoped, a few seconds each)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn

from learn2defend.attacks import AutoAttack, make_attack
from learn2defend.checks import noise, sanity_checks
from learn2defend.cli import main
from learn2defend.config import TrainConfig
from learn2defend.errors import UserError
from learn2defend.evaluate import STATE_DIR, EvalConfig, evaluate, first_n
from learn2defend.runs import load_run
from learn2defend.train import train

EPS = 0.2  # the digits default
N = 48  # images per evaluation: keeps AutoAttack and the checks cheap
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _train(out, **kw):
    base = dict(dataset="digits", model="smallcnn", epochs=3, batch_size=64, lr=0.05, val_robust_n=0,
                progress=False, out=str(out))
    return train(TrainConfig(**(base | kw)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _train(root / "plain")
    _train(root / "plain-seed1", seed=1, epochs=2)
    # PGD training, kept cheap: 640 images, 5 steps of eps/3, from the plain net (as the paper).
    _train(root / "pgd", method="pgd", pgd_steps=5, train_size=640, init=str(root / "plain"))
    for method in ("naive-l2l", "grad-l2l", "2step-l2l"):
        _train(root / method, method=method, attacker_width=0.25, epochs=1, train_size=320,
               init=str(root / "plain"))
    _train(root / "fake3", dataset="fake:1x8x8:3", epochs=1, train_size=64, batch_size=32)
    return root


@pytest.fixture(scope="module")
def images(runs):
    run = load_run(runs / "pgd")
    from learn2defend.evaluate import eval_data

    data = first_n(eval_data(run, None, "data"), "val", N)
    return data.images.float() / 255, data.labels


def _one_line_exit_2(capsys, argv, word):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert word in err.lower()


# ---- every attack stays in the eps ball and the image box ------------------------------------

# "autoattack" (standard) is left to tests/test_attacks.py: its Square stage alone costs ~30 s here.
ATTACKS = ["fgsm", "pgd10", "pgm5", "cwpgd5", "cw", "autoattack-fast", "l2l:naive-l2l", "l2l:grad-l2l",
           "l2l:2step-l2l"]


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_keeps_eps_ball_and_image_box(runs, images, name):
    eps = 0.1  # not the training eps (0.2): l2l must use the evaluation's
    x, y = images
    x, y = (x[:4], y[:4]) if name.startswith("autoattack") else (x, y)
    if name.startswith("l2l:"):
        name = f"l2l:{runs / name[4:]}"
    model = load_run(runs / "plain").model
    adv = make_attack(name, eps)(model, x, y)
    assert adv.shape == x.shape and torch.isfinite(adv).all()
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv != x).any()


@pytest.mark.parametrize("method", ["naive-l2l", "grad-l2l"])
def test_l2l_scales_its_tanh_output_by_the_eval_eps(runs, images, method):
    x, y = images
    model = load_run(runs / "plain").model
    d1 = make_attack(f"l2l:{runs / method}", 0.05)(model, x, y) - x
    d2 = make_attack(f"l2l:{runs / method}", 0.1)(model, x, y) - x
    inside = ((x + d2) > 0) & ((x + d2) < 1)  # not clipped by the image box
    assert inside.sum() > 100
    torch.testing.assert_close(d2[inside], 2 * d1[inside], atol=1e-6, rtol=1e-4)


def test_l2l_queries_the_target_models_gradient(runs, images):
    x, y = images
    a, b = load_run(runs / "plain").model, load_run(runs / "pgd").model
    grad = make_attack(f"l2l:{runs / 'grad-l2l'}", EPS)
    assert not torch.equal(grad(a, x, y), grad(b, x, y))  # the gradient input differs per target
    naive = make_attack(f"l2l:{runs / 'naive-l2l'}", EPS)
    assert torch.equal(naive(a, x, y), naive(b, x, y))  # the image alone: same perturbation
    assert grad.method == "grad-l2l" and "l2l:" in grad.name


def test_l2l_needs_a_run_with_an_attacker(runs, capsys):
    with pytest.raises(UserError, match="no attacker"):
        make_attack(f"l2l:{runs / 'plain'}", EPS)
    with pytest.raises(UserError, match="not a run folder"):
        make_attack(f"l2l:{runs / 'nothing-here'}", EPS)
    _one_line_exit_2(capsys, ["eval", "--checkpoint", str(runs / "pgd"), "--attacks", f"l2l:{runs / 'plain'}"],
                     "attacker")


# ---- sanity checks ------------------------------------------------------------------------------


class Rounded(nn.Module):
    """Rounds its input to 0/1 before the classifier: every input gradient is zero."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.round())


def _image_data(images):
    from learn2defend.data import ImageData

    x, y = images
    return ImageData((x * 255).round().to(torch.uint8), y)


def test_checks_flag_a_masked_model_and_pass_a_plain_one(runs, images):
    plain = load_run(runs / "plain").model
    # AutoAttack costs ~1000 iterations on a masked model whatever the batch: keep it to 16 images.
    data = _image_data((images[0][:16], images[1][:16]))
    masked = sanity_checks(Rounded(plain).eval(), data, EPS, batch_size=64)
    assert masked["flagged"]
    assert masked["checks"]["gradients"]["passed"] is False
    assert masked["checks"]["whitebox_vs_transfer"]["passed"] is None  # no surrogate: skipped
    assert any("zero" in w.lower() for a in masked["attacks"] for w in getattr(a, "warnings", []))
    honest = sanity_checks(plain, data, EPS, batch_size=64, surrogate=load_run(runs / "plain-seed1").model)
    assert not honest["flagged"], honest["checks"]
    assert all(c["passed"] for c in honest["checks"].values())


def test_checks_are_named_records_run_in_order(runs, images):
    from learn2defend.checks import SANITY_CHECKS

    names = [c.name for c in SANITY_CHECKS]
    assert names == ["more_steps", "large_eps", "iterative_vs_single_step", "whitebox_vs_transfer",
                     "autoattack_vs_pgd", "gradients", "finite_logits"]
    assert all(c.checks and c.criterion and callable(c.run) for c in SANITY_CHECKS)


def test_noise_tolerance():
    assert noise(0.0, 100) == pytest.approx(0.01)  # one sample
    assert noise(0.5, 100) == pytest.approx(2 * 0.05 + 0.01)


# ---- eval: the JSON contract, checks, and the "done when" --------------------------------


@pytest.fixture(scope="module")
def pgd_eval(runs):
    code_out = {}

    def run(capsys):
        if "result" not in code_out:
            capsys.readouterr()
            code = main(["eval", "--checkpoint", str(runs / "pgd"), "--attacks", "fgsm,pgd10,autoattack-fast",
                         "--n", str(N), "--checks", "--json"])
            out = capsys.readouterr().out
            code_out.update(code=code, result=json.loads(out))
        return code_out

    return run


def test_eval_checks_json_contract(pgd_eval, capsys, runs):
    got = pgd_eval(capsys)
    assert got["code"] == 0
    result = got["result"]
    assert set(result["accuracy"]) == {"clean", "fgsm", "pgd10", "autoattack-fast", "worst"}
    assert set(result["checks"]) == {"more_steps", "large_eps", "iterative_vs_single_step",
                                     "whitebox_vs_transfer", "autoattack_vs_pgd", "gradients", "finite_logits"}
    assert result["nonfinite_logits"] == 0
    for check in result["checks"].values():
        assert check["passed"] in (True, False, None) and isinstance(check["detail"], str)
    assert result["flagged"] is False, result["checks"]  # an honest PGD-trained net
    assert not (runs / "pgd" / STATE_DIR).exists()  # AutoAttack state removed once finished


def test_done_when_pgd_net_orders_attacks_and_transfer_is_weaker(pgd_eval, capsys, runs):
    acc = pgd_eval(capsys)["result"]["accuracy"]

    def at_least(a, b):  # a >= b within noise
        return acc[a] >= acc[b] - noise((acc[a] + acc[b]) / 2, N)

    assert at_least("clean", "fgsm") and at_least("fgsm", "pgd10") and at_least("pgd10", "autoattack-fast")
    assert acc["clean"] > 0.8 and acc["fgsm"] > 0.1  # PGD training did something (plain: ~1 % at eps 0.2)
    capsys.readouterr()
    assert main(["transfer", "--surrogate", str(runs / "plain-seed1"), "--target", str(runs / "pgd"),
                 "--n", str(N), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"accuracy", "surrogate", "target", "n", "eps"}
    assert set(result["accuracy"]) >= {"clean", "fgsm", "pgd10"} and result["n"] == N and result["eps"] == EPS
    assert result["accuracy"]["clean"] == acc["clean"]
    transfer = result["accuracy"]["pgd10"]
    assert transfer >= acc["pgd10"] - noise(acc["pgd10"], N)  # black box is weaker than white box
    assert result["surrogate_accuracy"]["pgd10"] <= transfer  # the attack works on its own model


def test_eval_text_mode_prints_checks_flag_and_warnings(monkeypatch, capsys):
    ev = sys.modules["learn2defend.evaluate"]  # the package's `evaluate` attribute is the function
    canned = {"accuracy": {"clean": 0.9, "pgd10": 0.5}, "n": 10, "warnings": ["zero gradients on 3 points"],
              "checks": {"gradients": {"passed": False, "detail": "30% zero"},
                         "whitebox_vs_transfer": {"passed": None, "detail": "skipped: needs --surrogate"}},
              "flagged": True}
    monkeypatch.setattr(ev, "evaluate", lambda config: json.loads(json.dumps(canned)))
    assert main(["eval", "--checkpoint", "whatever"]) == 0
    out, err = capsys.readouterr()
    assert "check gradients: FAIL: 30% zero" in out and "whitebox_vs_transfer: skipped" in out
    assert any(line.startswith("FLAGGED") for line in out.splitlines())
    assert "zero gradients on 3 points" in err and "zero gradients" not in out


def test_autoattack_runs_chunk_by_chunk_resumes_and_reports_warnings(runs, monkeypatch):
    from learn2defend.attacks import auto

    monkeypatch.setattr(auto, "CHUNK", 8)  # AutoAttack's chunk, whatever --batch-size is
    cfg = dict(checkpoint=str(runs / "pgd"), attacks=["autoattack-fast"], n=16, batch_size=5, progress=False)
    reference = evaluate(EvalConfig(**cfg, attack_state=False))["accuracy"]
    chunks = []
    original = AutoAttack.__call__

    def killed_on_chunk_2(self, model, x, y, *, state_path=None, **kwargs):
        chunks.append((len(x), state_path))
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return original(self, model, x, y, state_path=state_path, **kwargs)

    monkeypatch.setattr(AutoAttack, "__call__", killed_on_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalConfig(**cfg))
    assert [n for n, _ in chunks] == [8, 8]  # fed one chunk at a time
    saved = list((runs / "pgd" / STATE_DIR).glob("*/autoattack-fast-chunk00000.pt"))
    assert len(saved) == 1 and chunks[0][1] == saved[0]
    monkeypatch.setattr(AutoAttack, "__call__", original)  # CHUNK stays patched

    logged = []
    original_perturb = AutoAttack.perturb

    def perturb_and_warn(self, model, x, y):
        logged.append(self._state_path)
        self.warnings.append("there are 2 points with zero gradient")
        return original_perturb(self, model, x, y)

    monkeypatch.setattr(AutoAttack, "perturb", perturb_and_warn)
    result = evaluate(EvalConfig(**cfg))
    assert result["accuracy"] == reference  # resumed: same numbers
    assert result["warnings"] == ["there are 2 points with zero gradient"]
    assert len(logged) == 2 and logged[0] == saved[0]
    assert not (runs / "pgd" / STATE_DIR).exists()


def test_eval_numbers_depend_only_on_model_images_attack_and_seed(runs):
    base = dict(checkpoint=str(runs / "pgd"), n=N, progress=False, attack_state=False)
    alone = evaluate(EvalConfig(**base, attacks=["pgd10"], batch_size=48))["accuracy"]
    mixed = evaluate(EvalConfig(**base, attacks=["autoattack-fast", "pgd20", "pgd10"], batch_size=7))["accuracy"]
    reordered = evaluate(EvalConfig(**base, attacks=["pgd10", "pgd20", "autoattack-fast"], batch_size=13))["accuracy"]
    assert alone["pgd10"] == mixed["pgd10"] == reordered["pgd10"]
    assert mixed == reordered
    assert 0 < mixed["autoattack-fast"] < mixed["clean"]  # numbers that could have differed
    torch.manual_seed(99)  # the global RNG plays no part
    assert evaluate(EvalConfig(**base, attacks=["pgd10"], batch_size=5))["accuracy"] == alone


def test_eval_off_a_terminal_prints_a_line_per_attack_and_stage(runs, capsys):
    assert main(["eval", "--checkpoint", str(runs / "pgd"), "--attacks", "pgd5,autoattack-fast", "--n", "16",
                 "--no-attack-state", "--json"]) == 0
    out, err = capsys.readouterr()
    accuracy = json.loads(out)["accuracy"]
    lines = err.splitlines()
    assert any(ln.startswith("learn2defend: pgd5 [1/2]: accuracy ") for ln in lines)
    stages = [ln for ln in lines if ln.startswith("learn2defend: autoattack-fast [2/2] chunk 1/1: ")]
    assert [ln.split(": ")[2] for ln in stages] == ["apgd-ce", "apgd-t"]
    final = next(ln for ln in lines if ln.startswith("learn2defend: autoattack-fast [2/2]: accuracy "))
    assert f"accuracy {accuracy['autoattack-fast']:.4f}" in final and f"worst so far {accuracy['worst']:.4f}" in final


def test_sigterm_during_eval_says_how_to_continue(runs, monkeypatch, capsys):
    import os
    import signal

    from learn2defend.attacks import auto

    monkeypatch.setattr(auto, "CHUNK", 8)
    argv = ["eval", "--checkpoint", str(runs / "pgd"), "--attacks", "autoattack-fast", "--n", "16", "--json"]
    original = AutoAttack.__call__
    calls = []

    def terminated_on_chunk_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stopping the job would
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "__call__", terminated_on_chunk_2)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "eval interrupted" in err and "run the same eval command again to continue" in err
    assert str(runs / "pgd" / STATE_DIR) in err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    monkeypatch.setattr(AutoAttack, "__call__", original)
    assert main(argv) == 0
    assert "resuming AutoAttack" in capsys.readouterr().err
    assert not (runs / "pgd" / STATE_DIR).exists()


def test_evaluate_model_returns_what_eval_json_returns(runs, images):
    from learn2defend import evaluate_model, load

    cfg = EvalConfig(checkpoint=str(runs / "pgd"), attacks=["fgsm", "pgd10"], n=N, progress=False)
    reference = evaluate(cfg)
    model = load(runs / "pgd")
    by_name = evaluate_model(model, "digits", attacks=["fgsm", "pgd10"], eps=EPS, n=N)
    x, y = images
    by_tensor = evaluate_model(model, x, y, attacks=["fgsm", "pgd10"], eps=EPS, batch_size=11)
    assert by_name["accuracy"] == by_tensor["accuracy"] == reference["accuracy"]
    assert by_name["n"] == by_tensor["n"] == reference["n"] and by_name["eps"] == reference["eps"]
    assert by_name["seed"] == reference["seed"] == 0 and reference["which"] == "last"  # what the numbers rest on


# ---- transfer, sweep, show ----------------------------------------------------------------


def test_transfer_with_mismatched_classes_exits_2(runs, capsys):
    _one_line_exit_2(capsys, ["transfer", "--surrogate", str(runs / "fake3"), "--target", str(runs / "pgd")],
                     "classes")


def test_sweep_writes_csv_and_png(runs, tmp_path, capsys):
    out = tmp_path / "figs" / "fig3"
    capsys.readouterr()
    assert main(["sweep", "--checkpoint", str(runs / "plain"), str(runs / "pgd"), "--over", "pgd-steps", "0,1,5",
                 "--n", "32", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["csv"] == f"{out}.csv" and result["png"] == f"{out}.png" and result["eps"] == EPS
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["label", "checkpoint", "method", "attack", "eps", "steps", "accuracy", "n"]
    assert len(rows) == 2 * 3 and {r["label"] for r in rows} == {"plain", "pgd"}
    assert {r["attack"] for r in rows} == {"pgm"}
    by = {(r["label"], int(r["steps"])): float(r["accuracy"]) for r in rows}
    assert by[("plain", 0)] >= by[("plain", 5)] and by[("pgd", 0)] >= by[("pgd", 5)]
    assert (tmp_path / "figs" / "fig3.png").read_bytes()[:8] == PNG_SIGNATURE

    assert main(["sweep", "--checkpoint", str(runs / "pgd"), "--over", "eps", "0,0.1,8/255", "--n", "16",
                 "--out", str(tmp_path / "fig4")]) == 0
    assert "fig4.png" in capsys.readouterr().out
    with open(tmp_path / "fig4.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {r["attack"] for r in rows} == {"fgsm", "pgm"}
    clean = [r for r in rows if float(r["eps"]) == 0]
    assert len({r["accuracy"] for r in clean}) == 1  # eps 0 is clean accuracy for both attacks
    assert (tmp_path / "fig4.png").read_bytes()[:8] == PNG_SIGNATURE


def test_show_writes_a_png_grid(runs, tmp_path, capsys):
    out = tmp_path / "fig5.png"
    capsys.readouterr()
    assert main(["show", "--checkpoint", str(runs / "pgd"), "--attacks", "fgsm,pgd10", "--n", "4",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(out) and result["n"] == 4 and result["attacks"] == ["fgsm", "pgd10"]
    assert len(result["images"]) == 4 and set(result["images"][0]) == {"index", "label", "clean", "fgsm", "pgd10"}
    assert all(v in [str(i) for i in range(10)] for v in result["images"][0].values() if isinstance(v, str))
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 5000


# ---- bad input: one line, exit 2 ------------------------------------------------------------

BAD = [
    (["eval", "--checkpoint", "{pgd}", "--attacks", "pgd1x"], "attack"),
    (["eval", "--checkpoint", "{pgd}", "--attacks", "fgsm", "--eps", "1.5"], "eps"),
    (["eval", "--checkpoint", "{pgd}", "--eps", "-0.1"], "eps"),
    (["eval", "--checkpoint", "{pgd}", "--checks", "--eps", "0"], "eps"),
    (["eval", "--checkpoint", "{pgd}", "--surrogate", "{plain}"], "--checks"),
    (["eval", "--checkpoint", "{pgd}", "--attacks", "pgm10", "--pgm-step", "0"], "--pgm-step"),
    (["transfer", "--surrogate", "{plain}", "--target", "{pgd}", "--attacks", "nope"], "attack"),
    (["transfer", "--surrogate", "{plain}", "--target", "{pgd}", "--eps", "2"], "eps"),
    (["sweep", "--checkpoint", "{pgd}", "--over", "eps", "0,1.5", "--out", "{tmp}/s"], "eps"),
    (["sweep", "--checkpoint", "{pgd}", "--over", "eps", "0,abc", "--out", "{tmp}/s"], "number"),
    (["sweep", "--checkpoint", "{pgd}", "--over", "pgd-steps", "1,2.5", "--out", "{tmp}/s"], "integers"),
    (["sweep", "--checkpoint", "{pgd}", "--over", "iterations", "1,2", "--out", "{tmp}/s"], "--over"),
    (["sweep", "--checkpoint", "{pgd}", "--over", "eps", "0.1", "--attack", "cw", "--out", "{tmp}/s"], "attack"),
    (["sweep", "--checkpoint", "{pgd}", "{fake3}", "--over", "eps", "0.1", "--out", "{tmp}/s"], "classes"),
    (["show", "--checkpoint", "{pgd}", "--attacks", "pgdd", "--out", "{tmp}/x.png"], "attack"),
    (["show", "--checkpoint", "{pgd}", "--eps", "3", "--out", "{tmp}/x.png"], "eps"),
    (["show", "--checkpoint", "{plain}", "--attacks", "l2l:{plain}", "--out", "{tmp}/x.png"], "attacker"),
]


@pytest.mark.parametrize("argv,word", BAD)
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, argv, word):
    names = {"pgd": runs / "pgd", "plain": runs / "plain", "fake3": runs / "fake3", "tmp": tmp_path}
    _one_line_exit_2(capsys, [a.format(**names) for a in argv], word)
    assert not list(tmp_path.iterdir())  # nothing written


def test_pgm_step_replaces_eps_over_3_for_pgm_only():
    from learn2defend.evaluate import build_attacks

    (default,) = build_attacks(["pgm10"], 0.05, 64)
    paper, pgd = build_attacks(["pgm10", "pgd10"], 0.05, 64, pgm_step=0.01)
    assert default.step_size == pytest.approx(0.05 / 3)
    assert paper.step_size == 0.01
    assert pgd.step_size is None or pgd.step_size != 0.01  # pgdK keeps its own (2.5 eps / K)


def test_autoattack_on_two_classes_runs_and_says_what_it_left_out(tmp_path):
    # pyautoattack's targeted DLR loss indexes the 4th largest logit: APGD-T cannot run on 2 classes.
    run = _train(tmp_path / "two", dataset="fake:1x8x8:2", epochs=1, val_size=64)
    result = evaluate(EvalConfig(checkpoint=str(run.path), attacks=["autoattack-fast"], n=32, eps=0.1))
    assert 0 <= result["accuracy"]["autoattack-fast"] <= result["accuracy"]["clean"]
    assert any("apgd-t left out" in w and "has 2" in w for w in result["warnings"])
    assert not (run.path / STATE_DIR).exists()


def test_a_failed_evaluation_leaves_no_state(tmp_path, monkeypatch):
    run = _train(tmp_path / "fails", epochs=1)

    def boom(self, model, images, labels):
        raise RuntimeError("simulated failure inside AutoAttack")

    monkeypatch.setattr(AutoAttack, "perturb", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(EvalConfig(checkpoint=str(run.path), attacks=["autoattack-fast"], n=16))
    assert not (run.path / STATE_DIR).exists()


def test_torchrun_shares_are_whole_autoattack_chunks_of_one_process():
    """Under torchrun each rank attacks whole chunks of 250 images, the very chunks one process
    attacks, so AutoAttack (random numbers shared by a chunk) gives the same accuracy with any
    number of processes; together the ranks attack every image exactly once."""
    from learn2defend.attacks.auto import CHUNK
    from learn2defend.data import ImageData
    from learn2defend.evaluate import shard

    n = 2 * CHUNK + 30
    images = ImageData(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))  # label = index
    index = [shard(images, r, 2, CHUNK).labels.tolist() for r in range(2)]
    assert index[0] == [*range(CHUNK), *range(2 * CHUNK, n)]  # one process's chunks 1 and 3
    assert index[1] == list(range(CHUNK, 2 * CHUNK))  # and its chunk 2
    strided = [shard(images, r, 3).labels.tolist() for r in range(3)]
    assert sorted(sum(strided, [])) == list(range(n))
    assert strided[1][:3] == [1, 4, 7]  # without AutoAttack: every world-th image
