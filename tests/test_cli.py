"""The command line: the JSON contract, and every bad input ending in one line and exit 2."""

import json
import subprocess
import sys

import pytest

from learn2defend.cli import main


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "p"
    code = main(["train", "--dataset", "digits", "--model", "smallcnn", "--method", "plain", "--epochs", "5",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_train_then_eval_json_on_digits(digits_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(digits_run), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is exactly one JSON object
    assert set(result) >= {"accuracy", "n", "dataset", "eps"}
    assert result["accuracy"]["clean"] >= 0.9
    assert result["dataset"] == "digits" and result["n"] == 180 and result["eps"] == 0.2


def test_eval_with_attacks_reports_worst(digits_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(digits_run), "--attacks", "fgsm,pgd10", "--n", "64", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert set(acc) == {"clean", "fgsm", "pgd10", "worst"}
    assert acc["worst"] <= min(acc["fgsm"], acc["pgd10"])


def test_module_entry_point(digits_run):
    proc = subprocess.run([sys.executable, "-m", "learn2defend", "eval", "--checkpoint", str(digits_run),
                           "--n", "20", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 20


BAD_TRAIN = [
    (["--dataset", "nosuchdata"], "data set"),
    (["--model", "nosuchmodel"], "model"),
    (["--method", "nosuchmethod"], "method"),
    (["--eps", "1.5"], "eps"),
    (["--eps", "-0.1"], "eps"),
    (["--eps", "abc"], "eps"),
    (["--dataset", "folder:/nonexistent/folder"], "folder"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--attacker", "huge", "--method", "grad-l2l"], "attacker"),
]


@pytest.mark.parametrize("args,word", BAD_TRAIN)
def test_bad_train_input_exits_2_with_one_line(tmp_path, capsys, args, word):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--epochs", "1", "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert word in err.lower()
    assert not out.exists()  # nothing written


def test_argparse_errors_are_one_line_exit_2(capsys):
    assert main(["train", "--epochs", "many"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_existing_run_folder_is_refused_and_untouched(digits_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in digits_run.iterdir()}
    code = main(["train", "--out", str(digits_run), "--epochs", "1", "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert before == {p.name: p.stat().st_mtime_ns for p in digits_run.iterdir()}


@pytest.mark.parametrize("args,word", [
    (["--checkpoint", "/nonexistent/run"], "not a run folder"),
    (["--attacks", "pgdx"], "attack"),
    (["--eps", "2"], "eps"),
    (["--which", "middle"], "which"),
])
def test_bad_eval_input_exits_2(digits_run, capsys, args, word):
    argv = ["eval", *args] if args[0] == "--checkpoint" else ["eval", "--checkpoint", str(digits_run), *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and word in err


def test_eval_on_other_dataset_with_wrong_classes_exits_2(digits_run, capsys):
    code = main(["eval", "--checkpoint", str(digits_run), "--dataset", "fake:1x8x8:3"])
    assert code == 2 and "classes" in capsys.readouterr().err


def test_models_lists_registry(capsys):
    assert main(["models", "wrn*"]) == 0
    names = capsys.readouterr().out.split()
    assert "wrn-34-4" in names and "smallcnn" not in names
