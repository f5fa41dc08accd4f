"""Issue #8: runs that survive crashes, checkpoints that cannot run code, inputs that
cannot break a run.

- SIGKILL at seeded random moments (some inside a checkpoint write, made visible by the
  LEARN2DEFEND_TEST_SLOW_WRITE hook of checkpoint.atomic_write_bytes), resume each time:
  the final weights, best checkpoint and metrics equal an uninterrupted run bit for bit;
- SIGTERM: exit 130, checkpoint saved, the resumed run finishes identically;
- non-finite losses: --on-nonfinite stop keeps the last good checkpoint, skip drops the step;
- pickles posing as checkpoints or configs are refused without running their payload;
- hostile image folders and damaged run folders end in one line and exit 2.

Everything runs on one CPU thread: on a busy two-core machine torch's default of two
threads makes these tiny steps tens of times slower, and the in-process reference runs
must use the thread count of the subprocesses to match them bit for bit.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from learn2defend import TrainConfig, load_run, methods, train
from learn2defend.checkpoint import SLOW_WRITE_ENV, is_temp_file, load_state
from learn2defend.cli import main
from learn2defend.errors import UserError
from learn2defend.guards import TrainingDiverged


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weights(run):
    sd = {f"model.{k}": v for k, v in run.model.state_dict().items()}
    if run.attacker is not None:
        sd.update({f"attacker.{k}": v for k, v in run.attacker.state_dict().items()})
    return sd


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k, v in wa.items():
        assert torch.equal(v, wb[k]), k


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def one_line_error(err: str) -> str:
    """The one error line; a run that had started has printed its header line before it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("train ", "speed: "))]  # headers
    assert len(lines) == 1, err
    return lines[0]


# ---- killed and resumed runs -------------------------------------------------------------

# An image folder (no scikit-learn import per launch): 72 training images in 6 batches,
# augmented with random crops and flips; pgd with a random start draws from the global
# generator at every step; Adam, whose learning rate drops after epoch 2; a checkpoint
# after every step.
CHAIN_RUN = dict(val_size=12, batch_size=12, epochs=3, method="pgd", random_start=True, pgd_steps=2,
                 optimizer="adam", lr=0.01, lr_milestones=[2], val_robust_n=12, checkpoint_every=1)
SLOW_WRITE = 0.05  # seconds each write waits between fsync and rename in the subprocesses


def pattern_folder(root: Path, classes: int = 3, per_class: int = 28) -> Path:
    """root/train/<class>/*.png: 8x8 grayscale images, a fixed pattern per class plus noise."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "train" / f"c{c}").mkdir(parents=True)
        pattern = rng.integers(0, 256, (8, 8))
        for i in range(per_class):
            pixels = np.clip(pattern + rng.normal(0, 40, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{c}" / f"{i}.png")
    return root


def cli_args(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, ",".join(map(str, value))]
        else:
            args += [flag, str(value)]
    return args


def reference_run(tmp_path, settings: dict):
    return train(TrainConfig(out=str(tmp_path / "reference"), data_dir=str(tmp_path / "data"),
                             device="cpu", progress=False, **settings))


def launch(out: Path, settings: dict, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env[SLOW_WRITE_ENV] = str(SLOW_WRITE)
    resume = ["--resume"] if (out / "config.json").exists() else []  # --resume needs a run to continue
    cmd = [sys.executable, "-m", "learn2defend", "train", "--out", str(out), *resume,
           "--device", "cpu", "--no-progress", "--data-dir", str(out.parent / "data"), *cli_args(settings)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)


class Watcher:
    """Counts completed writes of last.safetensors and sees writes in progress."""

    def __init__(self, out: Path, proc: subprocess.Popen) -> None:
        self.out, self.proc = out, proc
        self.seen, self.completed = self._stamp(), 0

    def _stamp(self):
        try:
            st = (self.out / "last.safetensors").stat()
            return (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            return None

    def poll(self) -> None:
        stamp = self._stamp()
        if stamp != self.seen:
            self.seen, self.completed = stamp, self.completed + 1

    def writing(self) -> bool:
        suffix = f".tmp-{self.proc.pid}"
        try:
            return any(name.endswith(suffix) for name in os.listdir(self.out))
        except FileNotFoundError:
            return False

    def wait(self, condition, timeout: float = 180) -> bool:
        """Poll until condition() holds (True) or the process ends first (False)."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.005)


def test_sigkill_and_sigterm_at_random_moments_then_resume_is_bit_exact(tmp_path):
    """One run, interrupted five times, resumed with --resume after each, equals a run never
    interrupted: final and best weights, the per-epoch metrics, metrics.jsonl.

    Interruptions (seeded): SIGKILL inside the very first write (config.json, before any
    checkpoint); SIGKILL inside the k-th write of a launch or at a random moment after its
    k-th checkpoint; and one SIGTERM, which must save, say so and exit 130.
    """
    settings = dict(CHAIN_RUN, dataset=f"folder:{pattern_folder(tmp_path / 'images')}")
    reference = reference_run(tmp_path, settings)
    out = tmp_path / "chain"
    rng = random.Random(8)
    plan = [("write", 0)] + [(rng.choice(["write", "random"]), rng.randint(1, 2)) for _ in range(3)]
    plan.insert(rng.randint(2, len(plan)), ("term", 1))
    done, launches = [], 0
    while True:
        launches += 1
        assert launches <= 20
        log = tmp_path / f"launch{launches}.log"
        proc = launch(out, settings, log)
        w = Watcher(out, proc)
        if len(done) == len(plan):
            break
        kind, k = plan[len(done)]
        if kind == "write":
            hit = w.wait(lambda: w.completed >= k and w.writing())  # noqa: B023
        else:
            hit = w.wait(lambda: w.completed >= k)  # noqa: B023
            time.sleep(rng.uniform(0, 0.15))
        if not (hit and proc.poll() is None):
            break  # finished before the planned moment: the assertion below reports it
        if kind == "term":
            before = load_state(out / "last.safetensors")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 130, log.read_text()
            err = log.read_text()
            assert "interrupted" in err and "--resume" in err and "Traceback" not in err, err
            after = load_state(out / "last.safetensors")
            assert (after["epoch"], after["batch"]) > (before["epoch"], before["batch"])  # saved on the way out
        else:
            proc.kill()
            proc.wait()
            if (out / "last.safetensors").exists():
                load_state(out / "last.safetensors")  # never half a file
        done.append((kind, k, any(is_temp_file(p.name) for p in out.iterdir())))

    assert proc.wait(timeout=180) == 0, log.read_text()
    assert len(done) == len(plan), (plan, done)
    assert done[0][2]  # the first kill left a half-written temp file behind
    assert "resuming" in log.read_text()
    resumed = load_run(out)
    assert_same_weights(reference, resumed)
    assert_same_weights(load_run(tmp_path / "reference", "best"), load_run(out, "best"))
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert without_seconds(lines) == without_seconds(reference.history)
    assert not [p.name for p in out.iterdir() if is_temp_file(p.name)]  # the resume cleaned up


# ---- continuation state ------------------------------------------------------------------------


def test_checkpoint_holds_the_whole_continuation_state(tmp_path, monkeypatch):
    settings = dict(dataset="fake:1x8x8:4", val_size=1984, batch_size=16, epochs=1, method="pgd",
                    random_start=True, pgd_steps=2, val_robust_n=16, checkpoint_every=1)
    real, calls = methods.STEPS["pgd"], []

    def crash_at_third(ctx, x, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(ctx, x, y)

    monkeypatch.setitem(methods.STEPS, "pgd", crash_at_third)
    with pytest.raises(RuntimeError, match="simulated"):
        reference_run(tmp_path, settings)
    state = load_state(tmp_path / "reference" / "last.safetensors")
    assert {"model", "optimizer", "scheduler", "epoch", "batch", "sums", "rng", "history", "best",
            "data"} <= set(state)
    assert (state["epoch"], state["batch"]) == (0, 2)
    assert state["sums"]["n"] == 32 and state["sums"]["loss"].dtype == torch.float32  # half-done epoch
    assert state["optimizer"]["state"]  # momentum buffers
    assert state["scheduler"]["last_epoch"] == 0
    assert state["rng"]["torch"].dtype == torch.uint8


# ---- non-finite losses --------------------------------------------------------------------------

NAN_RUN = dict(dataset="fake:1x8x8:4", val_size=1984, batch_size=16, epochs=2, method="plain",
               val_robust_n=0)


def poison_step(monkeypatch, at: int, how: str = "input"):
    """Make training step number `at` (1-based, counted over the run) non-finite."""
    real, calls = methods.STEPS["plain"], []

    def step(ctx, x, y):
        calls.append(1)
        if len(calls) != at:
            return real(ctx, x, y)
        if how == "input":  # NaN images: NaN loss, NaN gradients, NaN weights after the step
            return real(ctx, x * float("nan"), y)
        if how == "noop":  # the step that skip should be equivalent to: no update at all
            return {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long)}
        metrics = real(ctx, x, y)  # "weights": a finite loss, but the update broke a weight
        with torch.no_grad():
            next(ctx.model.parameters()).view(-1)[0] = float("inf")
        return metrics

    monkeypatch.setitem(methods.STEPS, "plain", step)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    poison_step(monkeypatch, at=3)
    out = tmp_path / "reference"
    with pytest.raises(TrainingDiverged, match="non-finite loss in epoch 1 by batch 3") as e:
        reference_run(tmp_path, dict(NAN_RUN, checkpoint_every=1))
    assert "still holds epoch 1, batch 2" in str(e.value) and "--on-nonfinite skip" in str(e.value)
    state = load_state(out / "last.safetensors")
    assert (state["epoch"], state["batch"]) == (0, 2)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (out / "metrics.jsonl").exists()


def test_nonfinite_weights_never_overwrite_a_checkpoint(tmp_path, monkeypatch):
    poison_step(monkeypatch, at=6, how="weights")  # epoch 2, batch 2; the loss stays finite
    out = tmp_path / "reference"
    with pytest.raises(TrainingDiverged, match="not finite"):
        reference_run(tmp_path, dict(NAN_RUN, checkpoint_every=2))
    assert (load_state(out / "last.safetensors")["epoch"], load_state(out / "last.safetensors")["batch"]) == (1, 0)


def test_nonfinite_stop_through_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, at=2)
    code = main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
                 "--data-dir", str(tmp_path / "data"), *cli_args(NAN_RUN)])
    assert code == 2
    assert "diverged" in one_line_error(capsys.readouterr().err)


def test_nonfinite_skip_drops_exactly_that_step(tmp_path, monkeypatch):
    poison_step(monkeypatch, at=3)
    skipped = train(TrainConfig(out=str(tmp_path / "skip"), data_dir=str(tmp_path / "data"), device="cpu",
                                progress=False, on_nonfinite="skip", **NAN_RUN))
    assert [r["skipped_steps"] for r in skipped.history] == [1, 0]
    assert all(np.isfinite(r["train_loss"]) for r in skipped.history)
    poison_step(monkeypatch, at=3, how="noop")
    noop = train(TrainConfig(out=str(tmp_path / "noop"), data_dir=str(tmp_path / "data"), device="cpu",
                             progress=False, **NAN_RUN))
    assert_same_weights(skipped, noop)  # weights, BN statistics and momentum all as if never drawn


def test_nonfinite_skip_every_step_stops(tmp_path, monkeypatch):
    real = methods.STEPS["plain"]
    monkeypatch.setitem(methods.STEPS, "plain", lambda ctx, x, y: real(ctx, x * float("nan"), y))
    with pytest.raises(TrainingDiverged, match="every step of epoch 1"):
        train(TrainConfig(out=str(tmp_path / "r"), data_dir=str(tmp_path / "data"), device="cpu",
                          progress=False, on_nonfinite="skip", **NAN_RUN))


# ---- checkpoints and configs that must not run code --------------------------------------------


class Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


SMALL_RUN = ["--dataset", "fake:1x8x8:4", "--val-size", "16", "--train-size", "32", "--batch-size", "16",
             "--epochs", "1", "--val-robust-n", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished runs: smallcnn with SGD, a wide resnet, smallcnn with Adam."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("small", []), ("wide", ["--model", "wrn-16-4"]), ("adam", ["--optimizer", "adam"])):
        argv = ["train", "--out", str(root / name), "--data-dir", str(root / "data"), *SMALL_RUN, *extra]
        assert main(argv) == 0
    torch.set_num_threads(before)
    return root


def copy_run(runs: Path, tmp_path: Path, name: str = "small") -> Path:
    dst = tmp_path / name
    dst.mkdir()
    for p in (runs / name).iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def eval_error(run: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu", "--n", "8", *extra]) == 2
    return one_line_error(capsys.readouterr().err)


def test_the_payload_is_live(tmp_path):
    """The pickle used below really runs code when unpickled the unsafe way."""
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("target", ["last.safetensors", "best.safetensors", "config.json"])
def test_pickle_posing_as_run_file_is_refused_without_running(runs, tmp_path, capsys, target):
    run = copy_run(runs, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, run / target)
    which = "best" if target.startswith("best") else "last"
    with pytest.raises(UserError):
        load_run(run, which)
    line = eval_error(run, capsys, "--which", which)
    assert "corrupt" in line or "cannot read" in line
    capsys.readouterr()
    code = main(["train", "--out", str(run), "--resume", "--data-dir", str(runs / "data"), *SMALL_RUN,
                 "--epochs", "2"])
    if target == "best.safetensors":  # resuming reads last only, and replaces best when it is better
        assert code == 0
    else:
        assert code == 2 and one_line_error(capsys.readouterr().err)
    assert not marker.exists()


def test_truncated_checkpoint_exits_2(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    last = run / "last.safetensors"
    for size in (0, 7, 100, last.stat().st_size // 2, last.stat().st_size - 1):
        last.write_bytes((runs / "small" / "last.safetensors").read_bytes()[:size])
        assert "corrupt" in eval_error(run, capsys)


def test_tampered_metadata_exits_2(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    last = run / "last.safetensors"
    data = last.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for tree in ("not json", json.dumps({"__dict__": [["model", {"__tensor__": "missing"}]]}), "[1, 2]"):
        header["__metadata__"]["tree"] = tree
        raw = json.dumps(header).encode()
        last.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        assert "damaged" in eval_error(run, capsys)


def test_checkpoint_of_another_architecture_exits_2(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    (run / "last.safetensors").write_bytes((runs / "wide" / "last.safetensors").read_bytes())
    assert "does not fit" in eval_error(run, capsys)
    capsys.readouterr()
    code = main(["train", "--out", str(run), "--resume", "--data-dir", str(runs / "data"), *SMALL_RUN, "--epochs", "2"])
    assert code == 2 and "does not fit" in one_line_error(capsys.readouterr().err)


def test_checkpoint_of_another_optimizer_exits_2(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    (run / "last.safetensors").write_bytes((runs / "adam" / "last.safetensors").read_bytes())
    code = main(["train", "--out", str(run), "--resume", "--data-dir", str(runs / "data"), *SMALL_RUN, "--epochs", "2"])
    assert code == 2 and "does not fit" in one_line_error(capsys.readouterr().err)


def test_missing_and_hostile_run_files_exit_2(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    (run / "best.safetensors").unlink()
    assert "does not exist" in eval_error(run, capsys, "--which", "best")
    (run / "last.safetensors").unlink()
    assert "does not exist" in eval_error(run, capsys)
    run = copy_run(runs, tmp_path, "wide")
    config = json.loads((run / "config.json").read_text())
    for bad in ({**config, "eps": "lots"}, {**config, "epochs": True}, [1, 2], {**config, "lr": -1}):
        (run / "config.json").write_text(json.dumps(bad))
        eval_error(run, capsys)
    (run / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "cannot read" in eval_error(run, capsys)


# ---- hostile image folders -----------------------------------------------------------------------


def bomb_png(path: Path, side: int = 10_000) -> None:
    """A valid 1-bit PNG of side x side pixels (over PIL's bomb limit) in ~15 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" * (1 + (side + 7) // 8)
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * side, 9))
                     + chunk(b"IEND", b""))


def hostile_folder(root: Path) -> int:
    """PATH/train/{a,b,empty}; returns how many files in it cannot be decoded."""
    a, b = root / "train" / "a", root / "train" / "b"
    for d in (a, b, root / "train" / "empty"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def img(mode, size):
        shape = (size[1], size[0]) if mode in ("L", "P") else (size[1], size[0], len(mode))
        return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)

    img("RGB", (10, 12)).save(a / "rgb.png")
    img("L", (8, 8)).save(a / "gray.png")
    img("RGBA", (9, 9)).save(a / "alpha.png")
    img("RGB", (16, 16)).convert("P").save(a / "palette.gif")
    img("RGB", (20, 7)).save(a / "wide.jpg")
    for i in range(4):
        img("RGB", (8 + i, 8)).save(b / f"{i}.png")
    bad = 0
    (a / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes()); bad += 1  # noqa: E702
    (a / "empty.png").write_bytes(b""); bad += 1  # noqa: E702
    (a / "text.jpg").write_text("not an image"); bad += 1  # noqa: E702
    (a / "notes.txt").write_text("no image extension: not even looked at")
    trunc = (b / "0.png").read_bytes()
    (b / "truncated.png").write_bytes(trunc[: len(trunc) // 2]); bad += 1  # noqa: E702
    bomb_png(b / "bomb.png"); bad += 1  # noqa: E702
    os.symlink(b / "loop2.png", b / "loop1.png")
    os.symlink(b / "loop1.png", b / "loop2.png")
    bad += 2
    if os.geteuid() != 0:  # root reads a chmod 000 file anyway
        (b / "locked.png").write_bytes((b / "1.png").read_bytes())
        (b / "locked.png").chmod(0)
        bad += 1
    return bad


def test_hostile_image_folder_skip_trains_and_fail_exits_2(tmp_path, capsys):
    root = tmp_path / "hostile"
    bad = hostile_folder(root)
    common = ["--dataset", f"folder:{root}", "--val-size", "1", "--batch-size", "4", "--epochs", "1",
              "--val-robust-n", "0", "--device", "cpu", "--no-progress", "--data-dir", str(tmp_path / "data")]

    assert main(["train", "--out", str(tmp_path / "mixed"), *common]) == 2  # sizes differ
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert "--image-size" in one_line_error("\n".join(line for line in err.splitlines() if line not in warnings))
    assert not (tmp_path / "mixed").exists()

    assert main(["train", "--out", str(tmp_path / "skip"), "--image-size", "8", "--on-bad-image", "skip", *common]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"skipped {bad} unreadable image file(s)" in err and "left out class folder" in err
    run = load_run(tmp_path / "skip")
    assert run.meta["classes"] == ["a", "b"] and run.meta["image_shape"] == [3, 8, 8]

    fail = ["train", "--out", str(tmp_path / "fail"), "--image-size", "8", "--on-bad-image", "fail", *common]
    assert main(fail) == 2
    assert "has no image files" in one_line_error(capsys.readouterr().err)
    (root / "train" / "empty").rmdir()
    assert main(fail) == 2
    assert "cannot read image" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "fail").exists()


def test_nonfinite_skip_undoes_the_methods_own_state_and_memory_rows():
    """A skipped step of FGSM-PGI / LIET leaves neither its per-image memory writes nor its
    class-wise starts behind: the guard puts back what the step found."""
    from learn2defend import distributed
    from learn2defend.guards import SkipGuard
    from learn2defend.memory import PerturbationMemory

    model = torch.nn.Linear(4, 2)
    guard = SkipGuard([model], [torch.optim.SGD(model.parameters(), lr=0.1)], distributed.Ranks.current())
    memory = PerturbationMemory(6, (1, 2, 2), "cpu", momentum=True)
    memory.reset(torch.full((6, 1, 2, 2), 0.5))
    ctx = methods.StepContext(model=model, attacker=None, optimizer=None, attacker_optimizer=None, config=None)
    ctx.state = {"liet_class_starts": torch.ones(2, 1, 2, 2)}
    guard.ctx, guard.memory = ctx, memory
    before = {k: v.clone() for k, v in memory.buffers.items()}

    def step(loss: float):
        def run():
            memory.write(torch.tensor([1, 4]), torch.full((2, 1, 2, 2), 0.25), torch.full((2, 1, 2, 2), 9.0))
            memory.write(torch.tensor([4]), torch.full((1, 1, 2, 2), 0.125), torch.zeros(1, 1, 2, 2))
            ctx.state["liet_class_starts"] = torch.zeros(2, 1, 2, 2)
            return {"loss": torch.tensor(loss)}
        return run

    assert guard.run(step(float("nan"))) is None
    assert all(torch.equal(memory.buffers[k], before[k]) for k in before)
    assert torch.equal(ctx.state["liet_class_starts"], torch.ones(2, 1, 2, 2))
    assert guard.run(step(1.0)) is not None  # a finite step keeps its writes
    assert memory.delta[4].eq(0.125).all() and memory.delta[1].eq(0.25).all() and memory.delta[0].eq(0.5).all()
    assert ctx.state["liet_class_starts"].eq(0).all()
