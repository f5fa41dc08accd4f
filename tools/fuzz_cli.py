"""Fuzzed command lines over every subcommand (a measurement, not a test): each may exit only
0 or 2; a 2 must leave the files as they were, a 0 from `train` a complete run, and no line
may leave a temporary file behind.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/fuzz_cli.py [--lines 1000] [--seed 0]

Each line starts from a small valid command (tiny fake data, one epoch, a few images) and
then 1-4 options of that subcommand get values drawn from a pool of valid, edge and junk
values, or junk tokens are appended. Lines run in this process (`learn2defend.cli.main`), each
under a wall-clock limit (`--limit`, default 20 s; lines past it are counted apart, not
failed: a valid expensive command, e.g. `doctor`). Prints one JSON object: counts per exit
code, the failures (a traceback, another exit code, files changed by a 2, an incomplete run
after a 0, a temporary file left) with their command lines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import signal
import tempfile
import traceback
from pathlib import Path

from learn2defend.cli import build_parser, main

INTS = ["0", "1", "2", "3", "-1", "16", "1000000000", "x", "1.5", ""]
FLOATS = ["0", "0.03", "8/255", "0.5", "1", "-1", "2", "nan", "inf", "1e-9", "x", "", "1/0"]
WORDS = ["digits", "fake:1x8x8:4", "fake:3x8x8:2", "fake:0x8x8:4", "folder:/nonexistent", "imagenet:/nonexistent",
         "timm:nonexistent", "timm:test_resnet", "smallcnn", "pgd10", "fgsm,pgd10", "autoattack-fast", "cw",
         "l2l:/nonexistent",
         "/dev/null", "/proc/forbidden/x", "", "*", "a\nb", "last", "best", "linf", "l2", "sgd", "adam", "onecycle",
         "plain", "fgsm", "fgsm-pgi", "liet", "fgsm-sdi-memory", "cpu", "cuda", "auto", "-", "--", "é", "../x"]
JUNK = ["--nope", "-x", "extra", "--epochs", "=", "--lr=", "--eps=8", "--help-me"]


class LineTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise LineTimeout


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _value(action: argparse.Action, rng: random.Random, out: Path) -> list[str]:
    """The tokens after the option: none for flags, else one value from the pools."""
    if action.nargs == 0:
        return []
    if action.choices and rng.random() < 0.6:
        return [str(rng.choice(list(action.choices)))]
    kind = getattr(action.type, "__name__", "")
    pool = INTS if kind == "int" else FLOATS if kind in ("float", "_number", "_val_size") else WORDS
    value = rng.choice(pool + [str(out / "fresh"), str(out)])
    return [value]


def _base(command: str, work: Path, run: Path, out: Path) -> list[str]:
    data = ["--data-dir", str(work / "data")]
    tiny = ["--dataset", "fake:1x8x8:4", "--model", "smallcnn", *data]
    return {
        "train": ["train", *tiny, "--train-size", "64", "--epochs", "1", "--batch-size", "16", "--val-robust-n", "0",
                  "--no-progress", "--out", str(out)],
        "eval": ["eval", "--checkpoint", str(run), "--n-images", "16", "--attacks", "fgsm"],
        "transfer": ["transfer", "--surrogate", str(run), "--target", str(run), "--n-images", "16",
                     "--attacks", "fgsm"],
        "sweep": ["sweep", "--checkpoint", str(run), "--over", "eps", "0,0.1", "--n-images", "16", "--out", str(out)],
        "show": ["show", "--checkpoint", str(run), "--n-images", "4", "--out", str(out / "show.png")],
        "export": ["export", "--checkpoint", str(run), "--out", str(out / "model.safetensors")],
        "compare": ["compare", *tiny, "--methods", "plain", "--epochs", "1", "--out", str(out)],
        "models": ["models"],
        "plot": ["plot", str(run), "--out", str(out / "curves.png")],
        "bench": ["bench", "--dataset", "fake:1x8x8:4", "--methods", "plain", "--steps", "1"],
        "reproduce": ["reproduce", "table4", "--dataset", "fake:1x8x8:4", "--out", str(out), *data],
        "doctor": ["doctor", "--help"],
        "gpu-report": ["gpu-report", "--help"],
        "demo": ["demo", "--help"],
    }.get(command, [command])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
            and "/data/" not in str(p)}


def main_fuzz() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=20, help="seconds per line")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzz-cli-"))
    run = work / "run"
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert main(_base("train", work, run, run)) == 0, quiet.getvalue()
    commands = _subcommands(build_parser())
    signal.signal(signal.SIGALRM, _on_alarm)
    counts: dict[str, int] = {}
    failures = []
    for i in range(args.lines):
        command = rng.choice(sorted(commands))
        out = work / f"out-{i}"
        argv = _base(command, work, run, out)
        options = [a for a in commands[command]._actions if a.option_strings and a.dest != "help"]
        for _ in range(rng.randint(1, 4)):
            if options and rng.random() < 0.85:
                action = rng.choice(options)
                argv += [rng.choice(action.option_strings), *_value(action, rng, out)]
            else:
                argv.append(rng.choice(JUNK))
        before = _snapshot(work)
        buffer = io.StringIO()
        signal.alarm(args.limit)
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                code = main(argv)
            outcome = str(code)
        except LineTimeout:
            outcome = "timeout"
        except BaseException as e:  # noqa: BLE001 - a traceback is what this looks for
            outcome = "exception"
            failures.append({"argv": argv, "what": f"{type(e).__name__}: {e}",
                             "where": traceback.format_exc().splitlines()[-3:]})
        finally:
            signal.alarm(0)
        counts[outcome] = counts.get(outcome, 0) + 1
        after = _snapshot(work)
        if outcome not in ("0", "2", "timeout", "exception"):
            failures.append({"argv": argv, "what": f"exit {outcome}", "output": buffer.getvalue()[-300:]})
        if outcome == "2":
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            if changed:
                failures.append({"argv": argv, "what": "exit 2 changed files", "files": changed[:5],
                                 "output": buffer.getvalue()[-300:]})
        last_out = max((k for k, token in enumerate(argv) if token == "--out"), default=None)
        trained_into = (Path(argv[last_out + 1]) if command == "train" and last_out is not None
                        and last_out + 1 < len(argv) else None)
        if outcome == "0" and trained_into and "--help" not in argv and not (trained_into / "config.json").exists():
            failures.append({"argv": argv, "what": "exit 0 without a run folder"})
        left = [p for p in after if p.endswith(".tmp") or "/.tmp" in p]
        if left:
            failures.append({"argv": argv, "what": "temporary files left", "files": left[:5]})
    print(json.dumps({"lines": args.lines, "seed": args.seed, "exit_codes": counts, "failures": failures}, indent=1))


if __name__ == "__main__":
    main_fuzz()
