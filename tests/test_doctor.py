"""learn2defend doctor on the CPU: the report's contract and arithmetic, the training checks
(torchrun with gloo here; nccl on CUDA), the time budget, and that it runs from a source
tree without the optional packages. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import learn2defend
from learn2defend import speed
from learn2defend.cli import main

TINY = ["doctor", "--device", "cpu", "--model", "smallcnn", "--batch-size", "8", "--steps", "1", "--warmup", "0",
        "--attacker-width", "0.0625", "--threads", "1", "--json"]


def test_doctor_report_on_the_cpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")  # the "fast" epoch compiles; no C++ build here
    args = [*TINY, "--methods", "plain,fgsm,grad-l2l", "--variants", "float32,bf16,tf32", "--checks",
            "--epoch-images", "64", "--data-dir", str(tmp_path)]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)  # stdout is one JSON object

    env = report["environment"]
    assert env["torch"] and env["device"] == "cpu" and env["bf16"] in ("native", "emulated", "unknown")
    assert {"cuda", "cudnn", "python", "learn2defend"} <= set(env)
    assert list(report["variants"]) == ["float32", "bf16"] and report["skipped"] == {"tf32": "CUDA only"}
    assert report["variants"]["bf16"]["switches"] == {"amp": "bf16"}
    for variant in report["variants"].values():
        rows = variant["methods"]
        assert list(rows) == ["plain", "fgsm", "grad-l2l"]
        for row in rows.values():
            t = row["seconds_per_step"]
            assert row["images_per_s"] == pytest.approx(8 / t)
            assert row["mac_per_s"] == pytest.approx(row["macs_per_step"] / t)
        assert rows["plain"]["ratio_to_mac_floor"] == pytest.approx(1.0)  # the floor's rate is plain's
        # the cost model: fgsm (clean weight 0.5) does 6 classifier forwards per image, plain 3
        assert rows["fgsm"]["macs_per_step"] == pytest.approx(2 * rows["plain"]["macs_per_step"])
    assert all(row["speedup_vs_float32"] == 1.0 for row in report["variants"]["float32"]["methods"].values())

    checks = report["checks"]
    assert checks["float32"]["ok"] and checks["fast"]["ok"], checks
    assert checks["fast"]["switches"]["amp"] == "bf16" and checks["fast"]["switches"]["compile"]
    assert checks["torchrun"] == {**checks["torchrun"], "ok": True, "backend": "gloo", "world_size": 1}
    # one process in a group computes what one process alone does (the collectives are trivial)
    assert checks["torchrun"]["train_loss"] == pytest.approx(checks["float32"]["train_loss"], rel=1e-5)


def test_doctor_stops_starting_work_after_max_seconds(capsys):
    assert main([*TINY, "--methods", "plain", "--variants", "float32,bf16,compile", "--checks",
                 "--max-seconds", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["variants"]) == ["float32"]  # the baseline always runs
    assert set(report["skipped"]) == {"bf16", "compile"} and "--max-seconds 0" in report["skipped"]["bf16"]
    assert all("skipped" in check for check in report["checks"].values())


def test_doctor_text_report(capsys):
    assert main([*TINY[:-1], "--methods", "plain,attacker-only", "--variants", "float32"]) == 0
    out = capsys.readouterr().out
    assert "environment: learn2defend" in out and "attacker-only" in out and "x floor" in out


@pytest.mark.parametrize("extra, message", [
    (["--variants", "float32,fp8"], "unknown variant 'fp8'"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--epoch-images", "5000"], "--epoch-images must be"),
    (["--model", "nope"], "unknown model 'nope'"),
])
def test_doctor_bad_input_is_one_line_and_exit_2(capsys, extra, message):
    assert main([*TINY, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and captured.err.count("\n") == 1


def test_doctor_runs_from_a_source_tree_without_the_optional_packages(tmp_path):
    """As on the GPU machine: PYTHONPATH=src, nothing installed, no pyautoattack, torchattacks
    or tensorboard (each import of them fails here)."""
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('pyautoattack', 'torchattacks', 'tensorboard')]"
    run = (f"{blocked}; sys.argv = ['learn2defend', *sys.argv[1:]]; import runpy; "
           "runpy.run_module('learn2defend', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(Path(learn2defend.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", run, *TINY, "--methods", "plain", "--variants", "float32"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["variants"]["float32"]["methods"]["plain"]["seconds_per_step"] > 0
