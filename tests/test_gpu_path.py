"""The GPU path, checked on the CPU: the networks compile as one graph each (no graph
breaks, which would cut a compiled step into pieces run eagerly between them), and no
training step synchronises with the host (a `.item()`, `.cpu()`, `.tolist()` or a Python
`if` on a tensor inside a step stalls a GPU's queue once per step)."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from learn2defend import TrainConfig
from learn2defend.config import METHODS
from learn2defend.methods import attacker_in_channels
from learn2defend.runs import build_attacker, build_classifier
from learn2defend.train import build_parts

CPU = torch.device("cpu")
PACKAGE = str(Path(__import__("learn2defend").__file__).parent)


def meta(c=3, size=32, classes=10):
    return {"image_shape": [c, size, size], "classes": [str(i) for i in range(classes)],
            "mean": [0.5] * c, "std": [0.25] * c}


def graph_breaks(module, *inputs):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(*inputs)
    return explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]


# preact-resnet18 and wrn-16-4 are the CIFAR networks the GPU presets train; a 16x16 input
# keeps tracing them cheap (the graph does not depend on the image size)
@pytest.mark.parametrize("model", ["smallcnn", "smallcnn-pooled", "preact-resnet18", "wrn-16-4"])
def test_classifiers_compile_without_graph_breaks(model):
    cfg = TrainConfig(model=model, method="plain", dataset="fake:3x16x16:10").resolve()
    net = build_classifier(cfg, meta(size=16)).train()
    count, reasons = graph_breaks(net, torch.rand(2, 3, 16, 16))
    assert count == 0, reasons


@pytest.mark.parametrize("attacker, method", [("slim", "grad-l2l"), ("wide", "grad-l2l"), ("slim", "naive-l2l"),
                                              ("sdi", "fgsm-sdi")])
def test_attackers_compile_without_graph_breaks(attacker, method):
    cfg = TrainConfig(model="smallcnn", method=method, attacker=attacker, attacker_width=0.25,
                      dataset="fake:3x16x16:10").resolve()
    net = build_attacker(cfg, meta(size=16)).train()
    a = torch.rand(2, attacker_in_channels(method, 3), 16, 16)
    count, reasons = graph_breaks(net, a, cfg.eps)
    assert count == 0, reasons


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync_from(prefix=PACKAGE):
    """Tensor.item/.cpu/.tolist/__bool__/__int__/__float__/__index__/numpy raise when called
    from code under `prefix`, learn2defend's own by default (PyTorch's internals, e.g. Adam reading its CPU step
    counter, are left alone: on CUDA that counter lives on the host)."""
    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def guard(name, original):
        def guarded(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(prefix):
                raise HostSync(f"Tensor.{name} called from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)
        return guarded

    for name, original in saved.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("sync, name", [(lambda t: float(t.sum()), "__float__"), (lambda t: t.sum().item(), "item"),
                                        (lambda t: t.tolist(), "tolist"), (lambda t: t.cpu(), "cpu"),
                                        (lambda t: 1 if t.sum() > 0 else 0, "__bool__")])
def test_the_guard_catches_each_kind_of_sync(sync, name):
    with no_host_sync_from(__file__), pytest.raises(HostSync, match=name):
        sync(torch.ones(2))
    sync(torch.ones(2))  # and is gone afterwards


@pytest.mark.parametrize("method, overrides",
                         [(m, {}) for m in METHODS] + [("grad-l2l", {"l2l_update": "alternating"}),
                                                       ("grad-l2l", {"ema": 0.9})])
def test_no_training_step_synchronises_with_the_host(method, overrides):
    cfg = TrainConfig(method=method, eps=0.1, attacker_width=0.125, dataset="fake:1x8x8:2", **overrides).resolve()
    m = meta(c=1, size=8, classes=2)
    parts = build_parts(cfg, m, CPU)
    step = parts.step(cfg, CPU)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 2
    with no_host_sync_from():
        for _ in range(2):  # the second step too: state the first one created (momentum, the attacker's turn)
            metrics = step(x, y)
            parts.ctx.step_index += 1
            if parts.ema is not None:
                parts.ema.update(parts.ctx.step_index)
    assert torch.isfinite(metrics["loss"])  # outside the guard: the loop reads it every 50 steps


# ---- one command for every GPU figure -------------------------------------------------------


def test_gpu_report_writes_its_json_in_tiny_mode_on_the_cpu(tmp_path, capsys):
    import json

    from learn2defend.cli import main

    out = tmp_path / "figures"
    assert main(["gpu-report", "--out", str(out), "--tiny", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "gpu_report.json").read_text())
    assert list(summary["steps"]) == ["doctor", "frontier"]
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["roofline"]["mac_per_s"]["float32"] > 0
    assert {"float32", "bf16+channels_last@8", "bf16+channels_last@16"} <= set(doctor["variants"])
    row = doctor["variants"]["float32"]["methods"]["plain"]
    assert row["roofline_fraction"] == row["mac_per_s"] / doctor["roofline"]["mac_per_s"]["float32"]
    bf16 = doctor["variants"]["bf16+channels_last@16"]
    assert bf16["batch_size"] == 16 and bf16["switches"] == {"amp": "bf16", "channels_last": True}
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["preset"] == "tiny" and frontier["experiments"]["frontier"]


def test_gpu_report_refuses_a_file_as_its_folder(tmp_path, capsys):
    from learn2defend.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["gpu-report", "--out", str(tmp_path / "f"), "--tiny"]) == 2
    assert "is a file" in capsys.readouterr().err
