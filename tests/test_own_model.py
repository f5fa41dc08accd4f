"""A model registered with @register_model in the user's own module, used by fresh processes:
through `--import MODULE` (before or after the subcommand) and through the `learn2defend.models`
entry-point group of an installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import learn2defend

SRC = str(Path(learn2defend.__file__).resolve().parents[1])
MODULE = "l2d_user_nets"
MODULE_TEXT = '''
"""A user's own classifier, registered under the name "usernet"."""
from torch import nn

from learn2defend.models import Normalize, register_model


class UserNet(nn.Module):
    def __init__(self, num_classes, in_channels, image_size, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 32), nn.ReLU(),
                                  nn.Linear(32, num_classes))

    def forward(self, x):
        return self.body(self.normalize(x))


@register_model("usernet")
def usernet(*, num_classes, in_channels, image_size, mean, std):
    return UserNet(num_classes, in_channels, image_size, mean, std)
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """code/: the user's module; plugin/: an installed package's metadata declaring it as an entry point."""
    root = tmp_path_factory.mktemp("own")
    (root / "code").mkdir()
    (root / "code" / f"{MODULE}.py").write_text(MODULE_TEXT)
    info = root / "plugin" / "l2d_user_nets-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: l2d-user-nets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[learn2defend.models]\nusernets = {MODULE}\n")
    return root


def run(folders: Path, *args: str, plugin: bool = False,
        python: list[str] | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter, the user's module on PYTHONPATH (and the plugin's metadata with `plugin`),
    started in an empty folder so nothing is found by accident."""
    paths = [str(folders / "code"), SRC] + ([str(folders / "plugin")] if plugin else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    cwd = folders / "cwd"
    cwd.mkdir(exist_ok=True)
    cmd = [sys.executable, *(python or ["-m", "learn2defend", *args])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def user_run(folders):
    out = folders / "runs" / "u"
    proc = run(folders, "--import", MODULE, "train", "--dataset", "digits", "--model", "usernet", "--epochs", "1",
               "--train-size", "256", "--val-robust-n", "0", "--device", "cpu", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_eval_export_load_with_import(folders, user_run):
    proc = run(folders, "eval", "--checkpoint", str(user_run), "--import", MODULE, "--attacks", "fgsm", "--n", "20",
               "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 20
    exported = folders / "usernet.safetensors"
    proc = run(folders, "--import", MODULE, "export", str(user_run), "--out", str(exported), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"] == "usernet"
    code = (f"import {MODULE}, torch, learn2defend\n"
            f"for src in ({str(user_run)!r}, {str(exported)!r}):\n"
            "    m = learn2defend.load(src)\n"
            "    print(type(m).__name__, tuple(m(torch.rand(2, 1, 8, 8)).shape))\n")
    proc = run(folders, python=["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["UserNet (2, 10)", "UserNet (2, 10)"]


def test_compare_with_import(folders):
    out = folders / "cmp"
    proc = run(folders, "compare", "--import", MODULE, "--dataset", "digits", "--model", "usernet", "--methods",
               "plain,fgsm", "--attacks", "fgsm", "--epochs", "1", "--train-size", "256", "--val-robust-n", "0",
               "--n", "20", "--device", "cpu", "--no-progress", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["method"] for r in rows] == ["plain", "fgsm"]


def test_without_import_the_model_is_unknown_and_the_error_says_how(folders, user_run):
    proc = run(folders, "eval", "--checkpoint", str(user_run), "--n", "20", "--device", "cpu")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "unknown model 'usernet'" in proc.stderr and "--import MODULE" in proc.stderr


@pytest.mark.parametrize("module, words", [("no_such_module_l2d", "no module named 'no_such_module_l2d'"),
                                           (f"{MODULE}.py", "not a file")])
def test_import_of_a_missing_module_is_one_line(folders, module, words):
    proc = run(folders, "--import", module, "models")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr


def test_entry_point_group_needs_no_import(folders, user_run):
    proc = run(folders, "models", "user*", plugin=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["usernet"]
    proc = run(folders, "eval", "--checkpoint", str(user_run), "--n", "20", "--device", "cpu", "--json", plugin=True)
    assert proc.returncode == 0, proc.stderr
    code = f"import learn2defend\nprint(type(learn2defend.load({str(user_run)!r})).__name__)"
    proc = run(folders, python=["-c", code], plugin=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "UserNet"


def test_import_after_the_subcommand_and_before_it_both_count():
    from learn2defend.cli import build_parser

    args = build_parser().parse_args(["--import", "a", "eval", "--checkpoint", "r", "--import", "b"])
    assert [*args.imports, *args.sub_imports] == ["a", "b"]
