"""The frontier's notes come from its runs' config.json, and every figure draws a method in
one colour and marker (learn2defend.methods.method_styles)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from matplotlib.colors import is_color_like, to_rgba
from matplotlib.lines import Line2D

from learn2defend import frontier
from learn2defend.experiments import Reproduction, RunSpec
from learn2defend.figures import run_styles, sweep_figure
from learn2defend.methods import METHOD_RECORDS, STYLE_MARKERS, method_styles

FAKE = "fake:1x8x8:4"


# ---- colours and markers ------------------------------------------------------------------


def test_every_method_has_its_own_colour_and_marker() -> None:
    styles = method_styles()
    assert list(styles) == list(METHOD_RECORDS)
    assert len(set(styles.values())) == len(styles)  # a (colour, marker) pair per method
    assert len({colour for colour, _ in styles.values()}) == len(styles)  # and, today, a colour per method
    assert all(is_color_like(colour) and marker in STYLE_MARKERS for colour, marker in styles.values())
    assert method_styles() == styles  # deterministic


def test_a_new_method_gets_a_style_of_its_own_without_one_given() -> None:
    records = dict(METHOD_RECORDS)
    for name in ("new-a", "new-b", *(f"new-{i}" for i in range(30))):  # more methods than colours or markers
        records[name] = replace(METHOD_RECORDS["fgsm"], name=name, colour="", marker="")
    records["given-colour"] = replace(METHOD_RECORDS["fgsm"], name="given-colour", colour="tab:red", marker="")
    styles = method_styles(records)
    assert len(set(styles.values())) == len(styles)
    assert {k: styles[k] for k in METHOD_RECORDS} == method_styles()  # the existing ones keep theirs
    old_colours = {c for c, _ in method_styles().values()}
    assert styles["new-a"][0] not in old_colours and styles["new-b"][0] not in old_colours
    assert styles["new-a"] != styles["new-b"] and styles["given-colour"][0] == "tab:red"


def _lines(fig) -> dict[str, Line2D]:
    """{legend label: the line (or the errorbar's data line) drawn for it} over every panel."""
    found = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle.lines[0] if hasattr(handle, "lines") else handle)
    return found


def test_one_method_is_drawn_alike_in_every_figure() -> None:
    rows = [("pgd-at", "pgd-at", "PGD-AT"), ("fgsm-sdi", "fgsm-sdi-sdi", "FGSM-SDI"),
            ("fgsm-sdi", "fgsm-sdi-sdi-2step", "FGSM-SDI, 2 steps"), ("trades", "trades", "TRADES")]
    points = [{"label": label, "key": key, "method": m, "seconds": (1.0 + i, 0.1), "autoattack": (20.0 + i, 1.0)}
              for i, (m, key, label) in enumerate(rows)]
    curves = [{"label": label, "key": key, "method": m, "val_pgd10": [(1, 30.0), (2, 31.0 + i)]}
              for i, (m, key, label) in enumerate(rows)]
    sweep_rows = [{"label": label, "method": m, "attack": "pgm", "steps": s, "eps": 0.03, "accuracy": 0.5}
                  for m, _, label in (rows[3], rows[0]) for s in (0, 1, 2)]  # another order, another subset
    figures = [_lines(frontier.frontier_figure(points, "autoattack-fast", "t")),
               _lines(frontier.robust_curves_figure(curves, "t")),
               _lines(sweep_figure(sweep_rows, "pgd-steps", ["pgm"], 0.03, "t"))]
    styles = method_styles()
    for lines in figures:
        for label, method in (("PGD-AT", "pgd-at"), ("TRADES", "trades")):
            colour, marker = styles[method]
            assert to_rgba(lines[label].get_color()) == to_rgba(colour)
            assert lines[label].get_marker() == marker
    assert to_rgba(figures[0]["PGD-AT"].get_color()) != to_rgba(figures[0]["TRADES"].get_color())
    for lines in figures[:2]:  # two rows of one method: its colour and marker, told apart by the fill
        one, two = lines["FGSM-SDI"], lines["FGSM-SDI, 2 steps"]
        assert (to_rgba(one.get_color()), one.get_marker()) == (to_rgba(two.get_color()), two.get_marker())
        assert (one.get_fillstyle(), two.get_fillstyle()) == ("full", "none")


def test_runs_of_one_method_in_a_sweep_are_told_apart() -> None:
    styles = run_styles([("pgd-at", "a"), ("pgd-at", "b"), ("pgd-at", "a"), ("no-such-method", "c")])
    assert styles[0]["color"] == styles[1]["color"] and styles[0] == styles[2]
    assert (styles[0]["linestyle"], styles[1]["linestyle"]) == ("-", "--")
    assert styles[3]["color"] == "black"  # a run without a known method still draws


# ---- the notes come from the runs' config.json --------------------------------------------


def test_the_notes_follow_the_runs_configs(tmp_path: Path) -> None:
    preset = replace(frontier.FRONTIER_PRESETS["tiny"], frontier_methods=("pgd-at", "fgsm-sdi-sdi"))
    report = _frontier(preset, tmp_path)
    notes = _notes(report)
    assert "FGSM-SDI: 1 step of eps, adversarial loss only; sdi attacker (width 0.25) updated every 5 batches" in notes
    assert "PGD-AT: 10 steps of 0.25 eps" in notes
    assert "on the first 16 validation images" in notes and "first all" not in notes
    assert "from its seed's plain net, 1 epoch, batch 16" in notes
    assert "no label smoothing, no weight averaging" in notes
    # Another attacker interval and label smoothing in a run's config.json: the notes say so.
    run = Reproduction(preset, tmp_path).run_dir(FAKE, "frontier", RunSpec("fgsm-sdi", 0, "sdi"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "attacker_every": 7, "label_smoothing": 0.1}))
    again = _frontier(preset, tmp_path)
    assert again["trained"] == [] and again["rows"] == report["rows"]  # the numbers are cached, not retrained
    notes = _notes(again)
    assert "sdi attacker (width 0.25) updated every 7 batches" in notes and "every 5 batches" not in notes
    assert "FGSM-SDI: 1 step of eps, adversarial loss only; sdi attacker" in notes
    assert "label smoothing 0.1" in notes.split("FGSM-SDI:")[1]  # a departure from the other rows, on its row


def _frontier(preset, out: Path) -> dict:
    from learn2defend.reproduce import reproduce

    report = reproduce("frontier", preset, out, datasets=[FAKE])
    return {**report["experiments"]["frontier"][FAKE], "trained": report["trained"]}


def _notes(result: dict) -> str:
    md = Path(result["files"]["md"]).read_text()
    return "\n".join(line for line in md.splitlines() if line.startswith("- "))


def test_notes_from_configs_without_training() -> None:
    """The cpu preset's recipes as its configs resolve them: what the notes used to hard-code wrongly."""
    p = frontier.FRONTIER_PRESETS["cpu"].for_dataset("cifar10")
    r = Reproduction(p, "unused")
    configs: dict[str, list] = {}
    for spec in frontier.frontier_specs(p):
        configs.setdefault(frontier.FRONTIER_LABELS.get(spec.key, spec.key), []).append(
            r.config("cifar10", "frontier", spec).resolve())
    plain = {str(r.run_dir("cifar10", "frontier", RunSpec("plain", s))) for s in range(p.seeds)}
    notes = "\n".join(frontier.frontier_notes(configs, attack="autoattack-fast", init_seconds=[300.0, 310.0],
                                              ratios=["sdi 0.14x"], plain_nets=plain))
    assert "the 6 adversarial epochs" in notes and "from scratch" in notes
    assert "every 5 batches" in notes and "every 20 batches" not in notes
    assert "on the first 200 validation images" in notes
    assert "every run: smallcnn-pooled, 4,000 training images, from scratch, 6 epochs" in notes
    assert "PGM Net (paper): 10 steps of 0.333 eps, zero start, clean loss weight 0.5" in notes
    assert "SGD lr 0.05" in notes and "one cycle per batch" in notes
    assert "TRADES: 10 steps of 0.226 eps, beta 6" in notes and "MART: 10 steps of 0.226 eps, beta 5" in notes
    gpu = frontier.FRONTIER_PRESETS["gpu"]
    r = Reproduction(gpu, "unused")
    configs = {s.key: [r.config("cifar10", "frontier", s).resolve()] for s in frontier.frontier_specs(gpu)}
    notes = "\n".join(frontier.frontier_notes(configs, attack="autoattack-fast", init_seconds=[0.0], ratios=[]))
    assert "every run: preact-resnet18, every training image, from scratch" in notes and "bf16 autocast" in notes
    assert "SGD lr 0.1 (momentum 0.9, weight decay 0.0005), one cycle per batch" in notes


@pytest.mark.parametrize("n, text", [(16, "the first 16 validation images"),
                                     (frontier.EVERY_VALIDATION_IMAGE, "every validation image")])
def test_validation_images_read_as_words(n: int, text: str) -> None:
    assert frontier._validation_images(n) == text


def test_methods_selects_rows_by_key_or_pattern() -> None:
    from learn2defend.reproduce import select_rows

    cpu = frontier.FRONTIER_PRESETS["cpu"]
    assert select_rows(cpu, "liet, fgsm-pgi") == ("fgsm-pgi", "liet")  # the frontier's order
    assert select_rows(cpu, "fgsm-sdi-sdi*") == ("fgsm-sdi-sdi", "fgsm-sdi-sdi-2step")
    assert "grad-l2l-slim" in frontier.frontier_row_keys(cpu)


@pytest.mark.parametrize("argv, message", [
    (["frontier", "--methods", "pgd-at,nope"], "'nope' matches no frontier row; the rows: plain-continued, fgsm-rs"),
    (["table2", "--methods", "pgd-at"], "--methods applies to the frontier only"),
])
def test_methods_refuses_what_it_cannot_select(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from learn2defend.cli import main

    assert main(["reproduce", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_methods_runs_only_the_rows_asked_for(tmp_path: Path) -> None:
    from learn2defend.reproduce import reproduce

    report = reproduce("frontier", frontier.FRONTIER_PRESETS["tiny"], tmp_path, datasets=[FAKE], methods="liet")
    rows = report["experiments"]["frontier"][FAKE]["rows"]
    assert [r["method"] for r in rows] == ["liet"]
    assert [Path(p).name for p in report["trained"]] == ["plain-s0", "liet-s0"]  # its plain net, then the row
