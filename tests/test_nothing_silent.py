"""Issue 29: nothing silently wrong. A checkpoint knows its architecture; non-finite
logits count as wrong; whatever train writes loads back; every write failure is one line."""

import json
from pathlib import Path

import pytest
import torch

from learn2defend import load_run
from learn2defend.cli import main
from learn2defend.errors import UserError
from learn2defend.export import export, load_exported

SMALL_RUN = ["--dataset", "fake:1x8x8:4", "--val-size", "16", "--train-size", "32", "--batch-size", "16",
             "--epochs", "1", "--val-robust-n", "0", "--device", "cpu", "--no-progress"]


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("train ", "speed: "))]  # headers
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Tiny finished runs of two models whose weights load into each other."""
    root = tmp_path_factory.mktemp("runs")
    for name, model in (("small", "smallcnn"), ("pooled", "smallcnn-pooled")):
        argv = ["train", "--out", str(root / name), "--data-dir", str(root / "data"), *SMALL_RUN, "--model", model]
        assert main(argv) == 0
    return root


def copy_run(runs: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    dst.mkdir()
    for p in (runs / name).iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# ---- 1. checkpoints know their architecture ----------------------------------------------


def test_weights_of_a_lookalike_model_load_into_each_other(runs):
    """The premise: without a record, smallcnn weights load silently into smallcnn-pooled."""
    a, b = load_run(runs / "small"), load_run(runs / "pooled")
    b.model.load_state_dict(a.model.state_dict())


def test_a_checkpoint_of_another_model_is_refused_everywhere(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path, "pooled")
    (run / "last.safetensors").write_bytes((runs / "small" / "last.safetensors").read_bytes())
    with pytest.raises(UserError, match="model smallcnn .this run: smallcnn-pooled"):
        load_run(run)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu", "--n", "8"]) == 2
    assert "does not fit" in one_line(capsys.readouterr().err)
    assert main(["train", "--out", str(run), "--resume", "--data-dir", str(runs / "data"), *SMALL_RUN,
                 "--model", "smallcnn-pooled", "--epochs", "2"]) == 2
    assert "model smallcnn" in one_line(capsys.readouterr().err)
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "does not fit" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_checkpoint_of_another_method_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path, "small")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "method": "trades"}))
    with pytest.raises(UserError, match="method plain .this run: trades"):
        load_run(run)


def test_init_from_another_model_says_what_differs(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "x"), "--data-dir", str(runs / "data"), *SMALL_RUN,
                 "--init", str(runs / "small"), "--model", "smallcnn-pooled"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "model smallcnn (this run: smallcnn-pooled)" in line and "classes" not in line
    assert not (tmp_path / "x").exists()


def test_an_export_whose_weights_do_not_match_its_fingerprint_is_refused(runs, tmp_path):
    out = tmp_path / "m.safetensors"
    meta = export(runs / "small", out)
    assert len(meta["fingerprint"]) == 16
    load_exported(out)
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(out), framework="pt") as f:
        raw = f.metadata()
    out.write_bytes(save(load_file(str(out)), metadata={**raw, "fingerprint": "0" * 16}))
    with pytest.raises(UserError, match="fingerprint"):
        load_exported(out)


# ---- 2. non-finite logits count as wrong ------------------------------------------------------


class NaNOnSome(torch.nn.Module):
    """A perfect classifier of the pattern (label = argmax of the first 4 pixels), whose
    logits are NaN on the images marked by pixel 5 > 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        flat = x.flatten(1)
        logits = flat[:, :4] * self.scale
        poison = (flat[:, 5] > 0.5).unsqueeze(1)
        return torch.where(poison, torch.full_like(logits, float("nan")), logits)


def nan_data(n: int = 100, poisoned: int = 10):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    x = torch.rand(n, 1, 3, 3, generator=g) * 0.2
    x.view(n, -1)[torch.arange(n), labels] = 0.9
    x.view(n, -1)[:, 5] = 0.1
    x.view(n, -1)[:poisoned, 5] = 0.9  # the first 10, 3 of them labelled 0
    return x, labels


def test_nonfinite_logits_are_wrong_clean_and_under_every_attack():
    from learn2defend.evaluate import evaluate_model

    x, y = nan_data()
    assert int((y[:10] == 0).sum()) == 3
    result = evaluate_model(NaNOnSome(), x, y, attacks=["fgsm", "pgd10", "cw", "cwpgd10"], eps=0.01)
    for name, acc in result["accuracy"].items():
        assert acc <= 0.90, (name, acc)
    assert result["accuracy"]["clean"] == 0.90
    assert result["nonfinite_logits"] == 10
    assert any("non-finite logits" in w for w in result["warnings"])


def test_an_all_finite_evaluation_reports_zero():
    from learn2defend.evaluate import evaluate_model

    x, y = nan_data(poisoned=0)
    result = evaluate_model(NaNOnSome(), x, y)
    assert result["accuracy"]["clean"] == 1.0 and result["nonfinite_logits"] == 0 and "warnings" not in result


def test_the_sanity_checks_flag_nonfinite_logits():
    from learn2defend.checks import sanity_checks
    from learn2defend.data import ImageData

    x, y = nan_data(n=40, poisoned=4)
    report = sanity_checks(NaNOnSome(), ImageData(x, y), 0.01, batch_size=40)
    check = report["checks"]["finite_logits"]
    assert report["flagged"] and check["passed"] is False
    # the 4 poisoned images, and more that the eps-0.5 attack pushes over the NaN threshold
    assert check["values"]["count"] >= 4 and f"{check['values']['count']} of 40" in check["detail"]
    x, y = nan_data(n=40, poisoned=0)
    report = sanity_checks(NaNOnSome(), ImageData(x, y), 0.01, batch_size=40, nonfinite=torch.arange(40) < 2)
    assert report["checks"]["finite_logits"]["values"]["count"] >= 2


# ---- 3. whatever train writes into config.json loads back -----------------------------------------


def _all_methods():
    from learn2defend.methods import METHOD_RECORDS

    return sorted(METHOD_RECORDS)


@pytest.mark.parametrize("method", _all_methods())
@pytest.mark.parametrize("edge", [{"eps": 0.0}, {"eps": 1.0}, {"epochs": 1}, {"batch_size": 1},
                                  {"eps": 0.0, "epochs": 1, "batch_size": 1}])
def test_what_train_writes_into_config_json_loads_back(method, edge, tmp_path):
    """config.json is `ResolvedConfig.to_dict()` (runs.claim_folder); it must resolve again to
    the same settings, as eval and --resume read it."""
    from learn2defend import TrainConfig
    from learn2defend.config import load_resolved

    cfg = TrainConfig(out=str(tmp_path / "r"), dataset="fake:1x8x8:4", method=method, **edge).resolve()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    assert load_resolved(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("method", ["fgsm", "pgd-at"])
def test_eps_0_trains_evaluates_and_resumes(method, tmp_path, capsys, one_thread):
    """eps 0 is plain training through the method's own step: the run evaluates and resumes."""
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *SMALL_RUN, "--method", method,
            "--eps", "0"]
    assert main(argv) == 0
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--n", "8", "--attacks", "fgsm", "--json"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert load_run(out).epoch == 2


# ---- 4. every write goes through one path -------------------------------------------------------


def test_atomic_write_turns_failures_into_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from learn2defend import checkpoint as ckpt

    target = tmp_path / "f.json"
    ckpt.atomic_write(target, "old")

    def full(tmp, content):
        Path(tmp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_fill", full)
    with pytest.raises(ckpt.WriteFailed, match="No space left") as e:
        ckpt.atomic_write(target, "new")
    assert e.value.existed and target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    monkeypatch.undo()

    def torch_fails(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nmore")

    with pytest.raises(ckpt.WriteFailed, match="enforce fail") as e:
        ckpt.atomic_write(tmp_path / "g.pt", torch_fails)
    assert not e.value.existed and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_disk_full_at_the_first_checkpoint_does_not_claim_one_is_intact(tmp_path, monkeypatch, capsys):
    import errno

    from learn2defend import checkpoint as ckpt

    real = ckpt._fill

    def full(tmp, content):
        if Path(tmp).name.startswith(".best.safetensors.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, content)

    monkeypatch.setattr(ckpt, "_fill", full)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data"), *SMALL_RUN]) == 2
    line = one_line(capsys.readouterr().err)
    assert "No space left" in line and "no checkpoint was written there yet" in line and "intact" not in line


def test_outputs_are_checked_before_the_work(runs, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("")
    for argv in (["plot", str(runs / "small"), "--out", str(blocked / "x.png")],
                 ["show", "--checkpoint", str(runs / "small"), "--out", str(blocked / "x.png"), "--n", "2"],
                 ["sweep", "--checkpoint", str(runs / "small"), "--over", "eps", "0,0.1", "--out", str(blocked / "s")],
                 ["reproduce", "table3", "--out", str(blocked / "r")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "not a folder" in one_line(capsys.readouterr().err), argv


def test_an_unwritable_progress_file_lets_autoattack_go_on(tmp_path):
    from learn2defend.attacks import make_attack

    x, y = nan_data(n=8, poisoned=0)
    attack = make_attack("autoattack-fast", 0.01)
    state = tmp_path / "missing-folder" / "state.pt"
    adv = attack(NaNOnSome(), x, y, state_path=state)
    assert adv.shape == x.shape and not state.exists()
    assert sum("goes on without saving its progress" in w for w in attack.warnings) == 1


# ---- 5. float64, float16 and bfloat16 images -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_converted_to_the_models(dtype):
    from learn2defend.attacks import make_attack
    from learn2defend.evaluate import evaluate_model

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4))
    x, y = nan_data(n=16, poisoned=0)
    x = x.to(dtype)
    result = evaluate_model(model, x, y, attacks=["fgsm", "pgd10"], eps=0.03)
    assert result["n"] == 16
    adv = make_attack("pgd10", 0.03)(model, x, y)
    assert adv.dtype == torch.float32 and float((adv - x.float()).abs().max()) <= 0.03 + 1e-2


# ---- 6. run folders store resolved paths ----------------------------------------------------------


def image_folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((8, 8, 3)) * 80 + 150 * k).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{k}" / f"{i}.png")
    return root


def test_a_run_folder_works_from_any_directory(tmp_path, monkeypatch, capsys, one_thread):
    made, elsewhere = tmp_path / "made", tmp_path / "elsewhere"
    made.mkdir()
    elsewhere.mkdir()
    image_folder(made / "cf")
    monkeypatch.chdir(made)
    argv = ["--val-size", "8", "--batch-size", "8", "--epochs", "1", "--val-robust-n", "0", "--device", "cpu",
            "--no-progress"]
    assert main(["train", "--out", "runs/x", "--dataset", "folder:cf", "--data-dir", "data", *argv]) == 0
    stored = json.loads((made / "runs" / "x" / "config.json").read_text())
    assert stored["dataset"] == f"folder:{made / 'cf'}" and stored["data_dir"] == str(made / "data")
    monkeypatch.chdir(elsewhere)
    run = made / "runs" / "x"
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    # the relative spelling, from where the run was made, is the same setting as the absolute one
    monkeypatch.chdir(made)
    assert main(["train", "--out", "runs/x", "--resume", "--epochs", "3", "--dataset", "folder:cf",
                 "--no-progress"]) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--dataset", f"folder:{made / 'cf'}",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == f"folder:{made / 'cf'}"
    assert list(elsewhere.iterdir()) == []  # no data/cache here
    out = tmp_path / "m.safetensors"
    export(run, out)
    from learn2defend.export import read_metadata

    assert read_metadata(out)["data"]["dataset"] == stored["dataset"]


def test_an_old_run_with_relative_paths_loads_as_before(tmp_path, monkeypatch, capsys, one_thread):
    made = tmp_path / "made"
    made.mkdir()
    image_folder(made / "cf")
    monkeypatch.chdir(made)
    argv = ["--val-size", "8", "--batch-size", "8", "--epochs", "1", "--val-robust-n", "0", "--device", "cpu",
            "--no-progress"]
    assert main(["train", "--out", "x", "--dataset", "folder:cf", *argv]) == 0
    config = json.loads((made / "x" / "config.json").read_text())
    (made / "x" / "config.json").write_text(json.dumps({**config, "dataset": "folder:cf", "data_dir": "data"}))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", "x", "--device", "cpu", "--json"]) == 0
    assert main(["train", "--out", "x", "--resume", "--epochs", "2", "--no-progress"]) == 0


# ---- 7. training time survives interruptions ------------------------------------------------------


def test_an_epochs_seconds_are_kept_across_a_resume(tmp_path, monkeypatch, one_thread):
    """A clock that advances 10 s per step; 4 steps per epoch, a checkpoint after step 2, a
    crash after step 4: the resumed epoch records all 4 steps' 40 s, not the 20 s after the resume."""
    import importlib
    import time as time_module

    train_module = importlib.import_module("learn2defend.train")

    clock = [1000.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: clock[0])
    real_step = train_module._Loop._step

    def step(self, i, x, y):
        clock[0] += 10.0
        return real_step(self, i, x, y)

    monkeypatch.setattr(train_module._Loop, "_step", step)
    real_end = train_module._Loop._end_epoch

    def crash(self, seconds, board):
        raise KeyboardInterrupt  # killed after step 4, before the epoch's end was saved

    monkeypatch.setattr(train_module._Loop, "_end_epoch", crash)
    out = tmp_path / "r"
    argv = ["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *SMALL_RUN, "--train-size", "32",
            "--batch-size", "8", "--checkpoint-every", "2"]
    assert main(argv) == 130  # main reports the interruption
    from learn2defend.checkpoint import load_state

    assert load_state(out / "last.safetensors")["epoch_seconds"] == 20.0
    monkeypatch.setattr(train_module._Loop, "_end_epoch", real_end)
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["seconds"] for r in history] == [40.0]


# ---- 8. smaller things ---------------------------------------------------------------------------


def test_resume_with_another_method_says_the_method_differs(tmp_path, capsys, one_thread):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *SMALL_RUN, "--method", "fgsm",
                 "--random-start"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--method", "pgd-at", "--epochs", "2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--method (the run: fgsm, given: pgd-at)" in line and "applies to" not in line


def test_eval_text_says_what_it_did(runs, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(runs / "small"), "--device", "cpu", "--n-images", "100000"]) == 0
    captured = capsys.readouterr()
    assert "--n-images 100000: the val split has 16 images; all 16 were evaluated" in captured.err
    out = tmp_path / "m.safetensors"
    export(runs / "small", out)
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu", "--eps", str(8 / 255)]) == 0
    text = capsys.readouterr().out
    assert "which:" not in text and "eps: 8/255" in text


def test_plot_names_its_panels(runs, tmp_path, monkeypatch):
    import matplotlib.axes

    titles, ylabels, legends = [], [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **k: titles.append(t))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda self, t, *a, **k: ylabels.append(t))
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda self, *a, **k: legends.append(1))
    assert main(["plot", str(runs / "small"), str(runs / "pooled"), "--out", str(tmp_path / "c.png")]) == 0
    assert "validation clean accuracy" in titles and not any("_" in t for t in titles)
    assert len(ylabels) == len(titles) == len(legends)


# ---- 10. a recipe in a file ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "toml", "yaml"])
def test_train_config_file_with_flags_overriding(kind, tmp_path, capsys, one_thread):
    recipe = {"dataset": "fake:1x8x8:4", "val_size": 16, "train_size": 32, "batch_size": 16, "epochs": 3,
              "val_robust_n": 0, "method": "pgd-at", "pgd_steps": 2, "lr": 0.05}
    path = tmp_path / f"recipe.{kind}"
    if kind == "json":
        path.write_text(json.dumps(recipe))
    elif kind == "toml":
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in recipe.items()))
    else:
        path.write_text("".join(f"{k.replace('_', '-')}: {json.dumps(v)}\n" for k, v in recipe.items()))
    out = tmp_path / "r"
    assert main(["train", "--config", str(path), "--out", str(out), "--epochs", "1", "--data-dir",
                 str(tmp_path / "data"), "--device", "cpu", "--no-progress"]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["method"] == "pgd-at" and stored["pgd_steps"] == 2 and stored["lr"] == 0.05
    assert stored["epochs"] == 1  # the flag wins
    # a run's own config.json is a recipe too
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "config.json").read_text()) == {**stored, "out": str(again)}


def test_bad_config_files_are_one_line(tmp_path, capsys):
    cases = {"a.json": "{not json", "b.toml": "lr = [", "c.txt": "lr: 1", "d.json": "[1, 2]",
             "e.json": json.dumps({"learning_rate": 0.1}), "f.json": json.dumps({"lr": "fast"})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        capsys.readouterr()
        assert main(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "r")]) == 2, name
        assert "config" in one_line(capsys.readouterr().err), name
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    capsys.readouterr()
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE start from the options in FILE" in text and "flags given override it" in text


def test_yaml_without_pyyaml_says_how(tmp_path, monkeypatch):
    import sys

    from learn2defend.config import read_recipe

    (tmp_path / "r.yaml").write_text("lr: 0.1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(UserError, match="needs PyYAML"):
        read_recipe(tmp_path / "r.yaml")


# ---- autoattack-rand -------------------------------------------------------------------------------


class Noisy(torch.nn.Module):
    """A randomized defense: Gaussian noise on the input at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4))

    def forward(self, x):
        return self.net(x + 0.05 * torch.randn_like(x))


def test_autoattack_warns_about_a_randomized_defense_and_names_autoattack_rand():
    from learn2defend.attacks import make_attack

    x, y = nan_data(n=8, poisoned=0)
    attack = make_attack("autoattack-fast", 0.03)
    attack(Noisy(), x, y)
    assert any("autoattack-rand" in w for w in attack.warnings), attack.warnings
    rand = make_attack("autoattack-rand", 0.03)
    assert rand.name == "autoattack-rand" and rand.attacks == ("apgd-ce", "apgd-dlr")
    adv = rand(Noisy(), x, y)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= 0.03 + 1e-6
    assert not any("randomized defense" in w for w in rand.warnings)
    assert any(line.startswith("apgd-dlr") for line in rand.log)
