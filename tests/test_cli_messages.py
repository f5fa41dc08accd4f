"""Smaller faults of the command line: plot's curves, eval's data checks and messages, help defaults, eps hints."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from PIL import Image

from learn2defend.cli import _Formatter, build_parser, main
from learn2defend.errors import UserError


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    """A run on 1x8x8 images with classes '0' and '1'."""
    out = tmp_path_factory.mktemp("runs") / "g"
    code = main(["train", "--dataset", "fake:1x8x8:2", "--model", "smallcnn", "--method", "plain", "--epochs", "1",
                 "--val-robust-n", "0", "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def write_folder(root, classes, size=8):
    for k, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (size, size), 40 * k + i).save(root / "train" / name / f"{i}.png")
    return root


def test_eval_dataset_checks_class_names_not_only_their_number(gray_run, tmp_path, capsys):
    other = write_folder(tmp_path / "xy", ["x", "y"])
    err = one_line_error(capsys, ["eval", "--checkpoint", str(gray_run), "--dataset", f"folder:{other}",
                                  "--data-dir", str(tmp_path), "--device", "cpu"])
    assert "names its classes differently" in err and "'x' vs '0'" in err
    same = write_folder(tmp_path / "01", ["0", "1"])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(gray_run), "--dataset", f"folder:{same}", "--data-dir", str(tmp_path),
                 "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] >= 1


@pytest.mark.parametrize("spec, words", [("fake:3x8x8:2", "3-channel images but the model takes 1-channel"),
                                         ("fake:1x16x16:2", "16x16 images but the model takes 8x8")])
def test_eval_shape_errors_do_not_suggest_image_size(gray_run, capsys, spec, words):
    """eval has no --image-size, and no resize fixes a channel mismatch."""
    err = one_line_error(capsys, ["eval", "--checkpoint", str(gray_run), "--dataset", spec, "--device", "cpu"])
    assert words in err and "--image-size" not in err


def test_help_defaults_are_the_real_ones():
    """A '(default: N)' in any option's help is the option's default; '(default: all)' is no value at all
    (show --help said 'all' for --n, which is 6)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    wrong = []
    for name, p in sub.choices.items():
        formatter = _Formatter(name)
        for action in p._actions:
            for stated in re.findall(r"\(default: ([^)]*)\)", formatter._get_help_string(action)):
                real = p.get_default(action.dest)
                try:
                    number = float(stated)
                except ValueError:  # words: only "all" and "none" are checked
                    ok = stated not in ("all", "none") or real in (None, "*") or isinstance(real, list)
                else:
                    ok = isinstance(real, (int, float)) and float(real) == number
                if not ok:
                    wrong.append(f"{name} {action.dest}: help says {stated}, default is {real!r}")
    assert not wrong, wrong
    assert "(default: 6)" in sub.choices["show"].format_help()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_eps_on_the_255_scale_suggests_the_fraction(gray_run, tmp_path, capsys, command):
    argv = (["train", "--dataset", "fake:1x8x8:2", "--out", str(tmp_path / "r")] if command == "train"
            else ["eval", "--checkpoint", str(gray_run)])
    err = one_line_error(capsys, [*argv, "--eps", "8"])
    assert "8/255" in err and "got 8" in err
    err = one_line_error(capsys, [*argv, "--eps", "300"])  # not a 0-255 value: no suggestion
    assert "/255 (=" not in err


def test_attack_eps_on_the_255_scale_suggests_the_fraction():
    from learn2defend.attacks import make_attack

    with pytest.raises(UserError, match=r"write 8/255 \(= 0.03137\)"):
        make_attack("pgd10", 8)


def test_plot_draws_one_curve_per_folder_even_with_the_same_name(tmp_path, monkeypatch):
    import matplotlib.axes

    from learn2defend.reproduce import curve_labels

    for parent, loss in (("runs", 1.0), ("other", 2.0)):
        (tmp_path / parent / "p").mkdir(parents=True)
        lines = [json.dumps({"epoch": e, "train_loss": loss / e, "train_acc": 0.5}) for e in (1, 2)]
        (tmp_path / parent / "p" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    drawn = []
    original = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), tuple(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "runs/p", "other/p", "runs/p", "--out", "curves.png"]) == 0
    assert (tmp_path / "curves.png").is_file()
    losses = {label: ys for label, ys in drawn if ys[0] in (1.0, 2.0)}
    assert losses == {"runs/p": (1.0, 0.5), "other/p": (2.0, 1.0)}
    assert list(curve_labels(["a/x/p", "b/x/p", "c/q"]).values()) == ["a/x/p", "b/x/p", "q"]
