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


def _subcommands():
    import argparse

    from learn2defend.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


# The commands whose options are their config's fields (config.option): the config (module,
# class), and a smallest command line of each with the fields it gives.
EVAL_SIDE = {
    "eval": ("evaluate", "EvalConfig", ["--checkpoint", "r"], {"checkpoint": "r"}),
    "transfer": ("evaluate", "TransferConfig", ["--surrogate", "s", "--target", "t"],
                 {"surrogate": "s", "target": "t"}),
    "sweep": ("figures", "SweepConfig", ["--checkpoint", "a", "b", "--over", "eps", "0,1/255", "--out", "p"],
              {"checkpoints": ["a", "b"], "over": "eps", "values": [0.0, 1 / 255], "out": "p"}),
    "show": ("figures", "ShowConfig", ["--checkpoint", "r", "--out", "x.png"], {"checkpoint": "r", "out": "x.png"}),
    "export": ("export", "ExportConfig", ["r", "--out", "m.safetensors"], {"checkpoint": "r", "out": "m.safetensors"}),
    "plot": ("reproduce", "PlotConfig", ["a", "b", "--out", "c.png"], {"runs": ["a", "b"], "out": "c.png"}),
    "compare": ("compare", "CompareConfig", [], {}),
    "bench": ("bench", "BenchConfig", [], {}),
    "doctor": ("doctor", "DoctorConfig", [], {}),
}
LIBRARY_ONLY = {"progress", "title"}  # config fields the command line leaves at their defaults


@pytest.mark.parametrize("command", list(EVAL_SIDE))
def test_eval_side_options_come_from_their_config_dataclass(command):
    """Each option of the command (but --json, --import, --help; and compare's training
    options, TrainConfig's) is a field of its config, with that field's default, and each
    field is an option (or filled by one, as sweep's --over fills values)."""
    import argparse
    import dataclasses
    import importlib

    from learn2defend.cli import build_parser, config_from_args
    from learn2defend.config import TrainConfig

    module, name, argv, given = EVAL_SIDE[command]
    cls = getattr(importlib.import_module(f"learn2defend.{module}"), name)  # learn2defend.evaluate is a function
    _, commands = _subcommands()
    actions = {a.dest: a for a in commands[command]._actions
               if not {"--json", "--import", "-h"} & set(a.option_strings)}
    if command == "compare":
        train_options = {f.name for f in dataclasses.fields(TrainConfig)} - {"out", "method", "init"}
        assert train_options <= set(actions)
        actions = {dest: a for dest, a in actions.items() if dest not in train_options}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options = {n for n, f in fields.items() if f.metadata.get("help")}
    assert set(actions) == options
    assert set(fields) - options - LIBRARY_ONLY <= {"values"}  # --over's
    for dest, action in actions.items():
        f = fields[dest]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if action.option_strings and not isinstance(action, argparse.BooleanOptionalAction):
            assert action.required == (not has_default), dest
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert action.default == default, dest
    assert config_from_args(cls, build_parser().parse_args([command, *argv])) == cls(**given)


def test_doctor_checks_is_on_off_or_per_device_and_lists_are_comma_separated():
    from learn2defend.cli import build_parser, config_from_args
    from learn2defend.doctor import DoctorConfig

    def parsed(*argv):
        return config_from_args(DoctorConfig, build_parser().parse_args(["doctor", *argv]))

    assert parsed().checks is None  # on CUDA only
    assert parsed("--checks").checks is True and parsed("--no-checks").checks is False
    config = parsed("--methods", "plain, attacker-only", "--variants", "float32,fast")
    assert (config.methods, config.variants) == (["plain", "attacker-only"], ["float32", "fast"])


def test_eval_side_configs_share_what_to_evaluate():
    import dataclasses

    from learn2defend.evaluate import EvalConfig, EvalData, TransferConfig
    from learn2defend.figures import ShowConfig, SweepConfig

    shared = [f.name for f in dataclasses.fields(EvalData)]
    assert shared == ["dataset", "split", "n", "eps", "norm", "which", "device", "data_dir", "seed"]
    for cls in (EvalConfig, TransferConfig, SweepConfig, ShowConfig):
        assert issubclass(cls, EvalData) and [f.name for f in dataclasses.fields(cls)][:len(shared)] == shared


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from learn2defend.cli import _Formatter

    _, commands = _subcommands()
    missing = []
    for name, p in commands.items():
        formatter = _Formatter(name)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._get_help_string(action)
            if not (action.help or "").strip():
                missing.append(f"{name} {action.dest}: no help")
            elif action.option_strings and not action.required and action.default is not False \
                    and "default" not in text:
                missing.append(f"{name} {action.option_strings[0]}: no default shown")
    assert not missing, missing


def test_help_shows_real_defaults_and_version(capsys):
    _, commands = _subcommands()
    train_help = commands["train"].format_help()
    assert "per data set / method" not in train_help
    assert "(default: 10)" in train_help and "(default: 0.1)" in train_help  # --epochs, --lr
    assert "default: every training" in train_help and "default: none, random" in train_help
    eval_help = " ".join(commands["eval"].format_help().split())
    for attack in ("fgsm", "pgdK", "pgmK", "cwpgdK", "cw", "autoattack-fast", "l2l:DIR"):
        assert attack in eval_help
    assert main(["--version"]) == 0
    from learn2defend import __version__

    assert capsys.readouterr().out.strip() == f"learn2defend {__version__}"


def test_train_says_what_runs_where(tmp_path, capsys):
    out = tmp_path / "hdr"
    assert main(["train", "--dataset", "fake:3x16x16:4", "--method", "fgsm", "--epochs", "2", "--batch-size", "64",
                 "--val-robust-n", "0", "--no-progress", "--device", "cpu", "--data-dir", str(tmp_path / "d"),
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (f"train {out}: fgsm, smallcnn on fake:3x16x16:4, eps 0.03, 2 epochs, "
                        "augmentation none, device cpu, loader memory (built-in data set: in memory)")
    epochs = [line for line in lines if "epoch " in line]
    assert [line.split(" | ")[0] for line in epochs] == ["[hdr] epoch 1/2", "[hdr] epoch 2/2"]
    assert epochs[0].endswith("left") and epochs[1].endswith("| 0s left")


def test_flip_and_crop_padding_override_the_data_set(tmp_path, capsys):
    common = ["train", "--dataset", "fake:3x16x16:4", "--epochs", "1", "--batch-size", "64", "--val-robust-n", "0",
              "--no-progress", "--device", "cpu", "--data-dir", str(tmp_path / "d")]
    assert main([*common, "--out", str(tmp_path / "a"), "--flip", "--crop-padding", "2"]) == 0
    assert "augmentation crop 2 px + flip, device cpu" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b"), "--crop-padding", "2", "--no-augment"]) == 0
    assert "augmentation none" in capsys.readouterr().err
    stored = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (stored["flip"], stored["crop_padding"]) == (True, 2)
    assert main([*common, "--out", str(tmp_path / "c"), "--crop-padding", "-1"]) == 2
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "c"), "--crop-padding", "100000"]) == 2
    assert "larger than the 16x16 images" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_tensorboard_gets_each_epochs_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["train", "--dataset", "fake:1x8x8:3", "--epochs", "2", "--batch-size", "64", "--val-robust-n", "0",
                 "--no-progress", "--device", "cpu", "--data-dir", str(tmp_path / "d"), "--out", str(out),
                 "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train_loss", "train_acc", "val_clean_acc", "lr", "seconds"} <= set(events.Tags()["scalars"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("train_loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([r["train_loss"] for r in history])


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    out = tmp_path / "tb"
    assert main(["train", "--dataset", "fake:1x8x8:3", "--epochs", "1", "--no-progress", "--device", "cpu",
                 "--data-dir", str(tmp_path / "d"), "--out", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learn2defend[tensorboard]" in err
    assert not out.exists()


# ---- under torchrun: every option passes through torchrun's own parser ------------------------


def _option_spellings():
    """(command line before the option, option string, action) of every option of learn2defend
    itself (before a subcommand) and of every subcommand."""
    parser, commands = _subcommands()
    return [([], opt, action) for action in parser._actions for opt in action.option_strings] + [
        ([name], opt, action) for name, p in commands.items() for action in p._actions for opt in action.option_strings]


def test_torchrun_options_list_matches_torchrun():
    from torch.distributed.run import get_args_parser

    from learn2defend.cli import _TORCHRUN_ALL

    theirs = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    assert theirs <= _TORCHRUN_ALL, sorted(theirs - _TORCHRUN_ALL)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_torchrun_passes_every_option_on(form, capsys):
    """`torchrun -m learn2defend CMD --opt V`: torchrun's parser (torch.distributed.run) gives
    back CMD --opt V unchanged for every option's first name; only the kept short names that
    torchrun takes for its own (--n) do not pass, and each has a first name that does."""
    from torch.distributed.run import parse_args

    from learn2defend.cli import torchrun_could_take

    swallowed, unsafe = [], set()
    for before, opt, action in _option_spellings():
        given = [opt, "1"] if form == "separate" else [f"{opt}=1"]
        if action.nargs == 0 and form == "equals":
            given = [opt]
        line = [*before, *given] if before else [*given, "models"]
        try:
            parsed = parse_args(["--nproc-per-node=2", "-m", "learn2defend", *line]).training_script_args
        except SystemExit:
            parsed = None
        capsys.readouterr()
        if parsed != line:
            swallowed.append((line, opt))
        assert (parsed != line) <= torchrun_could_take(opt), line  # the rule sees every case
        if torchrun_could_take(opt):
            unsafe.add(opt)
            assert action.option_strings[0] != opt and not torchrun_could_take(action.option_strings[0])
            assert "except under torchrun" in action.help
    assert {opt for _, opt in swallowed} <= unsafe == {"--n"}
    # after `--`, torchrun passes everything on, and learn2defend drops a `--` left in front
    args = parse_args(["--nproc-per-node=2", "-m", "learn2defend", "--", "eval", "--n", "5"]).training_script_args
    assert args[-3:] == ["eval", "--n", "5"] and args[:-3] in ([], ["--"])


def test_an_option_torchrun_could_take_is_refused_as_first_name():
    from learn2defend.cli import _Parser

    parser = _Parser(prog="x")
    for bad in ("--n", "--nproc", "--master", "--rdzv_conf", "-mx"):
        with pytest.raises(ValueError, match="torchrun"):
            parser.add_argument(bad)
    parser.add_argument("--n-items", "--n", dest="n")  # a short second name stays, outside torchrun
    assert parser.parse_args(["--n", "3"]).n == parser.parse_args(["--n-items", "3"]).n == "3"


def test_n_images_and_n_alike_and_leading_double_dash(digits_run, capsys):
    results = []
    for argv in (["eval", "--checkpoint", str(digits_run), "--n-images", "7", "--json"],
                 ["--", "eval", "--checkpoint", str(digits_run), "--n", "7", "--json"]):
        assert main(argv) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["n"] == 7
    assert main(["eval", "--checkpoint", str(digits_run), "--n-images", "0"]) == 2
    assert "--n-images must be a positive integer" in capsys.readouterr().err


# ---- resume by folder ---------------------------------------------------------------------------


def test_resume_by_folder_takes_the_runs_own_config(tmp_path, capsys):
    out, data = tmp_path / "r", str(tmp_path / "d")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2  # no such run: not a fresh one
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run folder" in err and not out.exists()
    assert main(["train", "--out", str(out), "--dataset", "fake:1x8x8:3", "--method", "fgsm", "--epochs", "1",
                 "--lr", "0.05", "--batch-size", "64", "--val-robust-n", "0", "--no-progress", "--device", "cpu",
                 "--data-dir", data]) == 0
    stored = json.loads((out / "config.json").read_text())
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == 2
    assert json.loads((out / "config.json").read_text()) == {**stored, "epochs": 2, "progress": False}
    assert main(["train", "--out", str(out), "--resume"]) == 0  # finished: nothing to train
    assert "nothing to train" in capsys.readouterr().err
    # a flag given must agree with the run, even one given at its default value
    for flag, value in (("--lr", "0.1"), ("--method", "plain"), ("--dataset", "fake:1x8x8:4")):
        assert main(["train", "--out", str(out), "--resume", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} (the run:" in err and "--epochs" in err
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.05", "--method", "fgsm", "--epochs", "2",
                 "--batch-size", "64", "--no-progress"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--out", str(empty), "--resume"]) == 2
    assert "holds no config.json" in capsys.readouterr().err


# ---- compare: everything checked first, the table saved, no silent extension ---------------------


COMPARE = ["compare", "--dataset", "fake:1x8x8:3", "--methods", "plain,fgsm", "--attacks", "fgsm", "--epochs", "1",
           "--batch-size", "64", "--val-robust-n", "0", "--no-progress", "--device", "cpu", "--n-images", "16"]


@pytest.mark.parametrize("args,words", [
    (["--attacks", "pgd"], ["attack", "pgd"]),
    (["--methods", "plain,foo"], ["method", "foo"]),
    (["--methods", ","], ["--methods"]),
    (["--n", "0"], ["--n-images"]),
    (["--plain-epochs", "0"], ["--plain-epochs", "positive"]),
    (["--plain-epochs", "-2"], ["--plain-epochs", "-2"]),
    (["--methods", "plain,trades", "--clean-weight", "0.5"], ["--clean-weight", "trades"]),
])
def test_compare_checks_everything_before_training(tmp_path, capsys, args, words):
    out = tmp_path / "cmp"
    assert main([*COMPARE, "--data-dir", str(tmp_path / "d"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not out.exists()  # nothing trained, no run folder left behind


def test_compare_saves_its_table_and_extends_runs_only_when_asked(tmp_path, capsys):
    out = tmp_path / "cmp"
    common = [*COMPARE, "--data-dir", str(tmp_path / "d"), "--out", str(out)]
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() == printed
    assert "| plain |" in printed and "| fgsm |" in printed
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["method"], r["epochs"], r["n"]) for r in rows] == [("plain", 1, 16), ("fgsm", 1, 16)]
    before = {p: (out / p / "last.safetensors").stat().st_mtime_ns for p in ("plain", "fgsm")}
    for args, words in ((["--epochs", "2"], ["--extend", "1 epochs", "--epochs asks for 2"]),
                        (["--plain-epochs", "2"], ["--extend", "--plain-epochs"]),
                        (["--lr", "0.05"], ["other settings", "--lr (the run: 0.1, given: 0.05)"])):
        assert main([*common, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    assert before == {p: (out / p / "last.safetensors").stat().st_mtime_ns for p in ("plain", "fgsm")}
    assert main([*common, "--epochs", "2", "--extend", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["epochs"] for r in rows] == [2, 2]
    assert json.loads((out / "compare.json").read_text())["rows"] == rows
    assert main(common) == 2  # fewer epochs than the runs there
    assert "holds a run of 2 epochs" in capsys.readouterr().err


# ---- eval --checkpoint: an exported file as well as a run folder --------------------------------


def test_eval_takes_an_exported_file_like_its_run(digits_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model.safetensors"
    assert main(["export", str(digits_run), "--out", str(model)]) == 0
    asked = ["--attacks", "fgsm,pgd10", "--n-images", "48", "--split", "val", "--json"]
    results = []
    for checkpoint in (digits_run, model):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(checkpoint), *asked]) == 0
        results.append(json.loads(capsys.readouterr().out))
    folder, exported = results
    assert exported["checkpoint"] == str(model)
    for key in ("accuracy", "n", "dataset", "split", "eps", "model", "method"):
        assert exported[key] == folder[key], key  # the same images, split and numbers
    assert main(["eval", "--checkpoint", str(model), "--which", "best"]) == 2
    assert "--which best applies to run folders" in capsys.readouterr().err
    # a file exported before the data set was recorded: --dataset names it
    with safe_open(str(model), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "data"}
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(model)), str(older), metadata=metadata)
    assert main(["eval", "--checkpoint", str(older), "--n-images", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset" in err
    assert main(["eval", "--checkpoint", str(older), "--dataset", "digits", "--n-images", "48", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"]["clean"] == folder["accuracy"]["clean"]
