"""Issue #8: every `learn2defend train` option is validated before anything is written.

Hypothesis draws random combinations of valid and invalid option values; whatever it
draws, the command ends with exit 0 (a finished run) or exit 2 with exactly one line on
stderr (warnings aside), never a traceback, and an exit 2 leaves no run folder behind
(the one exception: a run that diverged, whose folder keeps its last good checkpoint).

Valid values are kept cheap (8x8 fake images, 148 training images, one epoch), and the
examples are derandomized and capped so the test runs in well under a minute. Set
L2D_FUZZ_EXAMPLES=500 to explore further.
"""

import contextlib
import io
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learn2defend.cli import main

# flag: (valid values, invalid values); "" means the flag takes no value
OPTIONS = {
    "--dataset": (["fake:1x8x8:4", "fake:3x6x6:2", "fake:1x7x7:3"],
                  ["nosuch", "fake:0x8x8:4", "fake:1x8x8", "fake:1x1x1:4", "digits:x", "folder:/nonexistent",
                   "folder:", "FAKE:1x8x8:4:5", "cifar10"]),
    "--val-size": (["1900", "0.95", "2000"], ["0", "-1", "2048", "5000", "1.5", "nan", "inf", "1e400", "x"]),
    "--train-size": (["2", "40"], ["0", "-1", "1", "x"]),
    "--epochs": (["1"], ["0", "-1", "1.5", "many", "1e3"]),
    "--batch-size": (["16", "64", "100000"], ["0", "-3", "1", "x", "2.5"]),
    "--method": (["plain", "fgsm", "pgd", "pgd-at", "trades", "mart", "naive-l2l", "grad-l2l", "2step-l2l"],
                 ["nope", "", "PGD"]),
    "--model": (["smallcnn"], ["nosuch", "", "wrn-0-0"]),
    "--eps": (["0", "0.03", "8/255", "1"], ["-0.1", "1.5", "nan", "inf", "abc", "1/0", "", "1e400"]),
    "--lr": (["0.01", "0.1"], ["0", "-1", "nan", "inf", "1e30", "x"]),
    "--optimizer": (["sgd", "adam"], ["rmsprop", ""]),
    "--momentum": (["0", "0.9"], ["1", "-0.1", "nan"]),
    "--weight-decay": (["0", "5e-4"], ["-1", "inf", "1e300"]),
    "--betas": (["0.9,0.999", "0,0"], ["1,0.5", "0.9", "0.9,0.99,0.9", "nan,0.5", "x,y", ""]),
    "--lr-milestones": (["", "1", "1,2"], ["0", "2,1", "a", "-1", "1,,x"]),
    "--lr-gamma": (["0.1", "1"], ["0", "2", "nan", "-1"]),
    "--pgd-steps": (["1", "3"], ["0", "-2", "x"]),
    "--step-size": (["0.01", "2/255"], ["0", "-0.1", "nan", "2"]),
    "--random-start": ([""], []),
    "--beta": (["0", "6"], ["-1", "nan", "inf", "x"]),
    "--clean-weight": (["0", "0.5", "1"], ["-0.5", "1.5", "nan"]),
    "--attacker": (["slim", "wide"], ["huge", ""]),
    "--attacker-width": (["0.125", "0.0625"], ["0", "-1", "nan", "inf", "100"]),
    "--attacker-optimizer": (["sgd", "adam"], ["lbfgs"]),
    "--attacker-lr": (["0.01"], ["0", "nan", "-1"]),
    "--attacker-steps": (["1", "2"], ["0", "-1"]),
    "--attacker-lr-milestones": (["1"], ["0", "3,2"]),
    "--grad-norm": (["sample", "batch", "sign", "none"], ["l2"]),
    "--l2l-update": (["joint", "alternating"], ["both"]),
    "--seed": (["0", "7"], ["-1", str(2**64), "x"]),
    "--split-seed": (["3"], ["-5", str(2**70)]),
    "--image-size": (["8"], ["0", "-1", "99999", "x"]),
    "--val-robust-n": (["0", "8"], ["-1", "x"]),
    "--checkpoint-every": (["0", "1"], ["-1", "x"]),
    "--on-nonfinite": (["stop", "skip"], ["sometimes"]),
    "--on-bad-image": (["skip", "fail"], ["ignore"]),
    "--device": (["cpu"], ["meta", "cuda:7", "xyz", "mps", ""]),
    "--amp": (["off", "bf16"], ["fp8", "", "BF16"]),  # fp16 is valid too, but emulated and slow on CPUs
    "--channels-last": ([""], []),
    "--init": ([], ["/nonexistent/run"]),
    "--out": ([], ["@file/run", "@file"]),  # @file: a plain file in the temp folder
}
BASE = {"--dataset": "fake:1x8x8:4", "--val-size": "1900", "--epochs": "1", "--batch-size": "64",
        "--val-robust-n": "8", "--device": "cpu", "--attacker-width": "0.0625"}


def option(flag):
    valid, invalid = OPTIONS[flag]
    choices = []
    if valid:
        choices.append(st.sampled_from(valid))
    if invalid:  # drawn about a quarter of the time, so many examples really train
        choices.append(st.sampled_from(invalid))
    if len(choices) == 2:
        return st.integers(0, 3).flatmap(lambda i: choices[1] if i == 0 else choices[0])
    return choices[0]


options = st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: option(flag) for flag in chosen}))

EXAMPLES = int(os.environ.get("L2D_FUZZ_EXAMPLES", "60"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 60, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(options)
def test_train_options_exit_0_or_one_line_2(chosen):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "file").write_text("a plain file")
        values = {**BASE, **chosen}
        out = values.pop("--out", str(tmp / "run")).replace("@file", str(tmp / "file"))
        argv = ["train", "--out", out, "--data-dir", str(tmp / "data"), "--no-progress"]
        for flag, value in values.items():
            argv += [flag] if OPTIONS.get(flag, ([], []))[0] == [""] else [flag, value]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        finally:
            torch.set_num_threads(threads)
        stderr = err.getvalue()
        assert "Traceback" not in stderr, (argv, stderr)
        assert code in (0, 2), (argv, code, stderr)
        if code == 0:
            assert (Path(out) / "last.safetensors").is_file(), argv
            return
        errors = [line for line in stderr.splitlines() if not line.startswith("warning: ")]
        assert len(errors) == 1 and errors[0].startswith("learn2defend"), (argv, stderr)
        if "diverged" not in errors[0]:
            assert not (tmp / "run").exists(), (argv, stderr)  # nothing written
