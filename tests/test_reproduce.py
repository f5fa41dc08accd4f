"""learn2defend reproduce / plot end to end, at the hidden "tiny" preset (1 epoch, 64
digits, 16 evaluation images), sharing one output folder across the module."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from learn2defend import experiments
from learn2defend import reproduce as rp
from learn2defend.cli import main

DATASET = "digits"


class Stop(Exception):
    """Stands for a kill: raised by the patched train after a few runs."""


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repro")


@pytest.fixture(scope="module")
def interrupted(out: Path) -> dict:
    """table2 stopped after 3 runs, then started again; the second report and the mtimes."""
    real_train = experiments.train
    calls = []

    def dying_train(config, **kw):
        if len(calls) == 3:
            raise Stop()
        calls.append(config.out)
        return real_train(config, **kw)

    experiments.train = dying_train
    try:
        with pytest.raises(Stop):
            rp.reproduce("table2", "tiny", out, datasets=[DATASET])
    finally:
        experiments.train = real_train
    mtimes = {c: (Path(c) / "last.safetensors").stat().st_mtime_ns for c in calls}
    report = rp.reproduce("table2", "tiny", out, datasets=[DATASET])
    return {"first": calls, "mtimes": mtimes, "report": report}


def test_resume_skips_finished_runs(interrupted: dict) -> None:
    first, report = interrupted["first"], interrupted["report"]
    assert len(first) == 3
    assert not set(first) & set(report["trained"])  # finished runs were not trained again
    for run, mtime in interrupted["mtimes"].items():
        assert (Path(run) / "last.safetensors").stat().st_mtime_ns == mtime
    assert len(report["trained"]) == 9 - 3  # 9 methods (plain included: the others start from it), 1 seed


def test_rerun_is_cached(out: Path, interrupted: dict) -> None:
    evals = sorted((out / "evals").rglob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in evals}
    for p in evals:  # each measurement records how long it took (docs/performance.md's breakdowns)
        assert json.loads(p.read_text())["seconds"] >= 0
    report = rp.reproduce("table2", "tiny", out, datasets=[DATASET])
    assert report["trained"] == []
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "evals").rglob("*.json"))} == before


def test_table2_outputs(out: Path, interrupted: dict) -> None:
    files = interrupted["report"]["experiments"]["table2"][DATASET]["files"]
    md = Path(files["md"]).read_text()
    assert "preset tiny" in md
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1:-1] == [" method ", " clean ", " FGSM ", " PGM10 ", " CW ", " AutoAttack-fast ",
                                         " worst ", " flagged "]
    assert len(lines) == 2 + 9  # header, rule, 9 methods
    assert "(paper 40.69)" in md  # PGM Net's PGM10 on CIFAR-10 beside ours
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == 9
    assert {"method", "attacker", "seed", "preset", "acc_clean", "acc_fgsm", "acc_pgm10", "acc_cw",
            "acc_autoattack-fast", "acc_worst", "flagged", "paper_pgm10"} <= set(rows[0])
    assert all(r["preset"] == "tiny" for r in rows)
    data = json.loads(Path(files["json"]).read_text())
    assert data["preset"] == "tiny" and len(data["rows"]) == 9


def test_other_experiments(out: Path, interrupted: dict) -> None:
    report = rp.reproduce("all", "tiny", out, datasets=[DATASET])
    exps = report["experiments"]
    assert set(exps) == set(rp.EXPERIMENTS)
    for name in ("table3", "table6", "table7"):
        files = exps[name][DATASET]["files"]
        lines = [line for line in Path(files["md"]).read_text().splitlines() if line.startswith("|")]
        assert len(lines) == 2 + 6 and len(lines[0].split("|")) == 2 + 1 + 6
        assert len(list(csv.DictReader(open(files["csv"])))) == 6 * 3 * 2
    t4 = list(csv.DictReader(open(exps["table4"][DATASET]["files"]["csv"])))
    assert len(t4) == 9 and all(float(r["seconds_mean"]) > 0 for r in t4)
    t5 = exps["table5"][DATASET]["files"]
    assert "adam" in json.loads(Path(t5["json"]).read_text())["rows"][0]["run"]
    for name in ("fig3", "fig4"):
        assert Path(exps[name][DATASET]["files"]["png"]).is_file()
        assert Path(exps[name][DATASET]["files"]["csv"]).is_file()
    assert len(exps["fig5"][DATASET]["files"]) == 3
    assert all(Path(p).is_file() for p in exps["fig5"][DATASET]["files"].values())
    # table2's runs were shared: "all" trained only surrogates and the Adam (table5/table7) runs
    assert all("digits-sgd" not in t or "-s1000" in t for t in report["trained"])


def test_cli_plot_and_reproduce(out: Path, interrupted: dict, capsys: pytest.CaptureFixture[str]) -> None:
    runs = out / "runs" / "digits-sgd"
    png = out / "curves.png"
    assert main(["plot", str(runs / "plain-s0"), str(runs / "grad-l2l-slim-s0"), "--out", str(png)]) == 0
    assert png.is_file()
    capsys.readouterr()
    assert main(["reproduce", "table5", "--preset", "paper", "--dataset", "nosuch", "--out", str(out / "x")]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_cpu_preset_scales_down_for_large_data_sets(tmp_path: Path) -> None:
    cpu = rp.PRESETS["cpu"]
    assert cpu.for_dataset("digits") is cpu
    large = cpu.for_dataset("folder:/data/cifar")
    assert (large.model, large.n, large.large_data) == ("smallcnn-pooled", 200, {})
    assert "smallcnn-pooled" in large.title and "n=200" in large.title
    cfg = rp.Reproduction(large, tmp_path).config("cifar10", "sgd", rp.RunSpec("grad-l2l", 0, "slim"))
    assert (cfg.model, cfg.train_size, cfg.attacker) == ("smallcnn-pooled", 5000, "slim")
    small = rp.Reproduction(cpu, tmp_path).config("digits", "sgd", rp.RunSpec("plain", 0))
    assert (small.model, small.train_size) == ("smallcnn", None)


def test_paper_preset_uses_the_papers_pgm_step_on_its_data_sets(tmp_path: Path) -> None:
    paper = rp.Reproduction(rp.PRESETS["paper"], tmp_path)
    assert paper.pgm_step("svhn") == 0.01 and paper.pgm_step("digits") is None
    assert paper.config("svhn", "adam", rp.RunSpec("pgd", 0)).step_size == 0.01
    assert rp.Reproduction(rp.PRESETS["cpu"], tmp_path).pgm_step("svhn") is None  # the cpu preset: eps/3


def test_paper_preset_keeps_the_papers_sgd_attacker(tmp_path: Path) -> None:
    spec = rp.RunSpec("grad-l2l", 0, "slim")
    paper = rp.Reproduction(rp.PRESETS["paper"], tmp_path).config("cifar10", "sgd", spec).resolve().attacker.optimizer
    assert (paper.name, paper.lr, paper.milestones) == ("sgd", 0.1, (30,))
    cpu = rp.Reproduction(rp.PRESETS["cpu"], tmp_path).config("cifar10", "sgd", spec).resolve().attacker.optimizer
    assert (cpu.name, cpu.lr) == ("adam", 1e-3)  # learn2defend's default
    adam = rp.Reproduction(rp.PRESETS["paper"], tmp_path).config("svhn", "adam", spec).resolve().attacker.optimizer
    assert (adam.name, adam.lr, adam.milestones) == ("adam", 1e-3, ())


def test_a_run_another_process_trains_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    r = rp.Reproduction(rp.PRESETS["tiny"], tmp_path)
    plain = r.run_dir(DATASET, "sgd", rp.RunSpec("plain", 0))
    plain.mkdir(parents=True)
    fd = os.open(plain, os.O_RDONLY)  # "another reproduce" holds the plain run
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other = r.run_dir(DATASET, "sgd", rp.RunSpec("plain", 1))
    waits = []

    def sleep(seconds: float) -> None:  # the other process finishes while we wait
        waits.append((seconds, (other / "last.safetensors").is_file()))
        os.close(fd)

    monkeypatch.setattr(rp.time, "sleep", sleep)
    specs = [rp.RunSpec("plain", 0), rp.RunSpec("plain", 1)]
    assert r.ensure_all(DATASET, "sgd", specs) == [plain, other]
    assert waits == [(rp.BUSY_WAIT_SECONDS, True)]  # the free run was trained before waiting for the busy one
    assert r.trained == [str(other), str(plain)] and (plain / "last.safetensors").is_file()


def test_a_lost_figure_is_redrawn_from_the_cached_numbers(out: Path, interrupted: dict, monkeypatch) -> None:
    png = Path(rp.reproduce("fig3", "tiny", out, datasets=[DATASET])["experiments"]["fig3"][DATASET]["files"]["png"])
    png.unlink()
    import learn2defend.figures as figures

    monkeypatch.setattr(figures, "sweep", lambda config: pytest.fail("the sweep was computed again"))
    rp.reproduce("fig3", "tiny", out, datasets=[DATASET])
    assert png.is_file() and png.stat().st_size > 0


# ---- the frontier (issue 15) ------------------------------------------------------------------


FAKE = "fake:1x8x8:4"  # synthetic images made on the fly, as the issue asks


FRONTIER_ROWS = ["Plain Net (continued)", "FGSM-RS", "N-FGSM", "PGM Net (paper)", "PGD-AT", "TRADES", "MART",
                 "Grad L2L (S)", "2-Step L2L (S)", "FGSM-SDI", "FGSM-SDI, 2 steps",
                 "Learned start, image only, 2 steps", "Learned start + memory, 2 steps", "FGSM-PGI", "LIET"]


def _table(md: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in md.splitlines() if line.startswith("|")]


def test_frontier_end_to_end_at_the_tiny_preset(tmp_path: Path) -> None:
    report = rp.reproduce("frontier", "tiny", tmp_path, datasets=[FAKE])
    assert len(report["trained"]) == 1 + len(FRONTIER_ROWS)  # one plain net, then every method from it
    files = report["experiments"]["frontier"][FAKE]["files"]
    table = _table(Path(files["md"]).read_text())
    assert table[0] == ["method", "clean", "AutoAttack-fast", "worst", "training s", "GMAC / step", "collapsed",
                        "flagged"]
    assert [row[0] for row in table[2:]] == FRONTIER_ROWS
    collapsed = {row[0]: row[6] for row in table[2:]}
    assert collapsed["Plain Net (continued)"] == "not measured"  # plain nets skip validation PGD-10
    assert {v for k, v in collapsed.items() if k != "Plain Net (continued)"} == {"no"}  # one epoch: nothing to drop
    rows = {(r["method"] + r["variant"]): r for r in csv.DictReader(open(files["csv"]))}
    assert len(rows) == len(FRONTIER_ROWS) and Path(files["png"]).stat().st_size > 0
    epochs_png = Path(files["epochs_png"])  # validation PGD-10 per epoch, beside the frontier's PNG
    assert epochs_png.stat().st_size > 0 and epochs_png.parent == Path(files["png"]).parent
    macs = {k: int(r["step_macs"]) for k, r in rows.items()}
    assert macs["plaincontinued"] < macs["fgsmrs"] < macs["grad-l2l"] < macs["pgd-at"] < macs["pgd"]
    assert macs["n-fgsm"] == macs["fgsmrs"] < macs["fgsm-sdi"] < macs["pgd-at"]
    assert rows["fgsm-sdi"]["attacker"] == "sdi" and rows["n-fgsm"]["collapsed"] == "False"
    assert all(float(r["training_seconds"]) > 0 and int(r["n"]) == 16 for r in rows.values())
    assert all(0 <= float(r["acc_worst"]) <= float(r["acc_autoattack-fast"]) <= float(r["acc_clean"]) + 1e-9
               for r in rows.values())
    data = json.loads(Path(files["json"]).read_text())
    assert data["attacker_ratio"] and len(data["points"]) == len(FRONTIER_ROWS)
    assert {c["label"] for c in data["curves"]} == set(FRONTIER_ROWS) - {"Plain Net (continued)"}
    run = rp.Reproduction(rp.FRONTIER_PRESETS["tiny"], tmp_path).run_dir(FAKE, "frontier", rp.RunSpec("n-fgsm", 0))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_pgd10_acc" in record for record in records)
    # A collapse recorded in metrics.jsonl reaches the table (evaluations are cached; the history is not).
    (run / "metrics.jsonl").write_text("".join(json.dumps({**rec, "collapsed": True}) + "\n" for rec in records))
    again = rp.reproduce("frontier", "tiny", tmp_path, datasets=[FAKE])
    assert again["trained"] == []  # finished runs and their evaluations are reused
    table = _table(Path(again["experiments"]["frontier"][FAKE]["files"]["md"]).read_text())
    assert {row[0]: row[6] for row in table[2:]}["N-FGSM"] == "yes"
    rows = {(r["method"] + r["variant"]): r for r in csv.DictReader(open(files["csv"]))}
    assert (rows["n-fgsm"]["collapsed"], rows["n-fgsm"]["collapsed_epoch"]) == ("True", "1")


def test_frontier_at_another_eps_lies_beside_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = replace(rp.FRONTIER_PRESETS["tiny"], frontier_methods=("fgsm-rs", "n-fgsm", "fgsm-sdi-sdi"))
    default = rp.reproduce("frontier", preset, tmp_path, datasets=[FAKE])["experiments"]["frontier"][FAKE]
    report = rp.reproduce("frontier", preset, tmp_path, datasets=[FAKE], eps=16 / 255)
    assert len(report["trained"]) == 3  # the plain net is shared: it does not depend on eps
    large = report["experiments"]["frontier"][FAKE]
    assert large["files"]["md"] != default["files"]["md"] and "eps0.0627451" in large["files"]["md"]
    assert all(Path(f).is_file() for f in (*default["files"].values(), *large["files"].values()))
    assert {round(r["eps"], 6) for r in large["rows"]} == {round(16 / 255, 6)}
    assert {r["eps"] for r in default["rows"]} == {0.03}
    assert len({Path(r["run"]).parent for r in (*default["rows"], *large["rows"])}) == 2
    config = json.loads((Path(large["rows"][0]["run"]) / "config.json").read_text())
    assert config["eps"] == pytest.approx(16 / 255)
    again = rp.reproduce("frontier", preset, tmp_path, datasets=[FAKE], eps=16 / 255)
    assert again["trained"] == []
    capsys.readouterr()
    for bad in ("1.5", "-0.5", "nan"):
        assert main(["reproduce", "frontier", "--preset", "cpu", "--eps", bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "--eps" in err and len(err.strip().splitlines()) == 1
    assert main(["reproduce", "table2", "--eps", "8/255", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_gpu_preset_trains_from_scratch_with_the_speed_switches(tmp_path: Path) -> None:
    gpu = rp.FRONTIER_PRESETS["gpu"].for_dataset("cifar10")
    specs = rp.frontier_specs(gpu)
    assert [s.key for s in specs] == ["fgsm-rs", "n-fgsm", "pgd-at", "fgsm-sdi-sdi", "fgsm-pgi", "liet"]
    r = rp.Reproduction(gpu, tmp_path)
    configs = [r.config("cifar10", "frontier", s) for s in specs]
    for c in configs:
        c.validate()
        assert (c.model, c.amp, c.channels_last, c.epochs, c.init, c.train_size) == (
            "preact-resnet18", "bf16", True, 5, None, None)
        assert (c.batch_size, c.lr, c.lr_milestones, c.weight_decay, c.val_robust_n) == (128, 0.1, [], 5e-4, 500)
        assert c.lr_schedule == "onecycle"  # as the fast-AT benchmark trains every method
    assert (configs[3].attacker, configs[3].attacker_width) == ("sdi", 1.0)
    assert (gpu.seeds, gpu.n, gpu.autoattack, gpu.checks) == (1, 500, "autoattack-fast", False)
    assert "gpu" not in rp.PRESETS  # the frontier only
    assert main(["reproduce", "table2", "--preset", "gpu", "--out", str(tmp_path / "x")]) == 2


def test_the_gpu_preset_fits_its_budget_on_the_mac_model() -> None:
    """The sizing in frontier.py's comment: one epoch of the six methods on 45,000 images at
    25 TMAC/s, times the preset's epochs, leaves the 153 s the AutoAttack evaluations (20.5 s
    each) and start-up need, and 0.7 s of validation per method and epoch, out of 480 s."""
    from learn2defend.bench import step_macs

    gpu = rp.FRONTIER_PRESETS["gpu"]
    meta = {"image_shape": [3, 32, 32], "classes": [str(i) for i in range(10)], "mean": [0.5] * 3, "std": [0.5] * 3}
    r = rp.Reproduction(gpu, "unused")
    per_image = sum(step_macs(r.config("cifar10", "frontier", s).resolve(), meta) / gpu.batch_size
                    for s in rp.frontier_specs(gpu))
    training_seconds = gpu.epochs * 45_000 * per_image / 25e12
    methods = len(rp.frontier_specs(gpu))
    assert 200 < training_seconds <= 480 - 20.5 * methods - 30 - methods * gpu.epochs * 0.7


def test_a_tiny_variant_of_the_gpu_preset_runs_on_the_cpu(tmp_path: Path) -> None:
    tiny = replace(rp.FRONTIER_PRESETS["gpu"], name="tiny-gpu", model="smallcnn", epochs=1, l2l_milestones=(),
                   batch_size=16, n=16, train_size=64, subset_small_data=True, val_robust_n=16,
                   frontier_methods=("fgsm-rs", "fgsm-sdi-sdi"))
    report = rp.reproduce("frontier", tiny, tmp_path, datasets=[FAKE])
    assert len(report["trained"]) == 2  # no plain net: both from scratch
    result = report["experiments"]["frontier"][FAKE]
    assert [r["method"] for r in result["rows"]] == ["fgsm", "fgsm-sdi"]
    for row in result["rows"]:
        config = json.loads((Path(row["run"]) / "config.json").read_text())
        assert (config["init"], config["amp"], config["channels_last"], config["lr_schedule"]) == (
            None, "bf16", True, "onecycle")
        assert row["init_seconds"] == 0.0 and row["step_macs"] > 0
    assert "from scratch" in Path(result["files"]["md"]).read_text()


def test_frontier_recipes(tmp_path: Path) -> None:
    cpu = rp.FRONTIER_PRESETS["cpu"].for_dataset("folder:/data/cifar")
    assert (cpu.model, cpu.train_size, cpu.n, cpu.attacker_width, cpu.autoattack) == (
        "smallcnn-pooled", 4000, 500, 0.07, "autoattack-fast")
    assert rp.FRONTIER_PRESETS["paper"].frontier_attackers == ("slim", "wide")
    r = rp.Reproduction(cpu, tmp_path)
    configs = {s.key: r.config("cifar10", "frontier", s) for s in rp.frontier_specs(cpu) if s.seed == 0}
    # every method from scratch, with one learning rate and the one-cycle schedule (the PGM net too)
    assert {c.init for c in configs.values()} == {None}
    assert {c.epochs for c in configs.values()} == {cpu.epochs}
    assert {(c.lr, c.lr_schedule) for c in configs.values()} == {(cpu.l2l_lr, "onecycle")}
    assert {c.channels_last for c in configs.values()} == {None}  # the device's default
    assert (configs["fgsm-rs"].random_start, configs["fgsm-rs"].clean_weight) == (True, 0.0)
    assert configs["plain-continued"].method == "plain"
    assert (configs["fgsm-sdi-sdi"].attacker, configs["fgsm-sdi-sdi"].attacker_width) == ("sdi", 0.11)
    assert configs["grad-l2l-slim"].attacker_width == 0.07
    assert configs["fgsm-sdi-sdi"].resolve().attacker.optimizer.name == "adam"  # not the paper's SGD attacker
    two = configs["fgsm-sdi-sdi-2step"].resolve()
    assert (two.attack.pgd_steps, two.attack.step_size, two.attacker.every) == (2, two.eps / 2, 5)
    # validation PGD-10 every epoch of the adversarial runs (collapse detection), none for the plain nets
    assert {k for k, c in configs.items() if c.val_robust_n == 200} == set(configs) - {"plain-continued"}
    assert configs["plain-continued"].val_robust_n == 0
    # on top of a plain net (preset paper), the PGM net keeps the paper's fixed fine-tuning rate
    paper = rp.Reproduction(rp.FRONTIER_PRESETS["paper"], tmp_path)
    pgd = paper.config("cifar10", "frontier", rp.RunSpec("pgd", 0))
    assert pgd.init == str(paper.run_dir("cifar10", "frontier", rp.RunSpec("plain", 0)))
    assert pgd.lr == rp.FRONTIER_PRESETS["paper"].baseline_lr
    digits = rp.FRONTIER_PRESETS["cpu"].for_dataset("digits")
    assert (digits.width("slim"), digits.width("sdi"), digits.val_robust_n) == (0.18, 0.25, rp.EVERY_VALIDATION_IMAGE)
    assert rp.FRONTIER_PRESETS["paper"].width("sdi") == 1.0
    assert "frontier" not in rp.EXPERIMENTS  # not part of "all"
    assert main(["reproduce", "frontier", "--preset", "cpu", "--dataset", "nosuch", "--out", str(tmp_path / "x")]) == 2


def test_a_run_another_process_evaluates_is_come_back_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl
    import os

    r = rp.Reproduction(rp.PRESETS["tiny"], tmp_path)
    specs = [rp.RunSpec("plain", 0), rp.RunSpec("plain", 1)]
    first, second = r.ensure_all(DATASET, "sgd", specs)
    fd = os.open(first, os.O_RDONLY)  # "another reproduce" is evaluating the first run
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    measured = []

    def sleep(seconds: float) -> None:
        os.close(fd)  # ... and finishes while we wait

    monkeypatch.setattr(rp.time, "sleep", sleep)
    results = r.ensure_evaluated(DATASET, "sgd", specs, lambda spec, path: measured.append(path) or {"run": path})
    assert measured == [second, first]  # the free run first, the busy one when it was free
    assert results == [{"run": first}, {"run": second}]


def test_seeds_replaces_the_presets_count_and_its_labels(tmp_path: Path, capsys) -> None:
    three = rp.with_seeds(rp.FRONTIER_PRESETS["cpu"], 3)
    assert three.seeds == 3 and "3 seeds" in three.title and "2 seeds" not in three.title
    large = three.for_dataset("folder:/data/cifar")
    assert large.seeds == 3 and "3 seeds" in large.title and "2 seeds" not in large.title
    assert "1 seed," in rp.with_seeds(rp.FRONTIER_PRESETS["cpu"], 1).title
    assert len({s.seed for s in rp.frontier_specs(three)}) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(rp.UserError, match="--seeds must be a positive integer"):
            rp.with_seeds(rp.FRONTIER_PRESETS["cpu"], bad)
    assert main(["reproduce", "frontier", "--seeds", "0", "--out", str(tmp_path / "out")]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
