"""A full disk at each write point (issue 29): the one write path, `checkpoint._fill`, raises
OSError(ENOSPC) at its k-th call, for every k a clean run reaches, in train, eval (AutoAttack's
progress files) and export. Each run must exit 0 or 2 with one line; an exit 0 leaves a complete
result, an exit 2 leaves every file either as it was or complete (never a partial or temp file),
and what remains resumes (train) or is untouched (eval's run folder, export's old file).

L2D_FAULT_EPOCHS=N trains N epochs (default 2) to reach more write points."""

import contextlib
import errno
import io
import json
import os
from pathlib import Path

from learn2defend import checkpoint as ckpt
from learn2defend import load_run
from learn2defend.checkpoint import is_temp_file, load_state
from learn2defend.cli import main
from learn2defend.export import load_exported

EPOCHS = int(os.environ.get("L2D_FAULT_EPOCHS", "2"))
TRAIN = ["--dataset", "fake:1x8x8:4", "--val-size", "16", "--train-size", "32", "--batch-size", "16",
         "--epochs", str(EPOCHS), "--val-robust-n", "8", "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]


class Disk:
    """Counts the writes through the one write path; the k-th (1-based) fails with ENOSPC."""

    def __init__(self, monkeypatch, fail_at: int | None) -> None:
        self.calls, self.fail_at, real = 0, fail_at, ckpt._fill

        def fill(tmp, content):
            self.calls += 1
            if self.calls == self.fail_at:
                Path(tmp).write_bytes(b"partial")  # what a full disk leaves half-way
                raise OSError(errno.ENOSPC, "No space left on device")
            real(tmp, content)

        monkeypatch.setattr(ckpt, "_fill", fill)


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def assert_clean_failure(code, err, folder: Path):
    assert code == 2, err
    assert "Traceback" not in err and "No space left" in err, err
    assert [line for line in err.splitlines() if line.startswith("learn2defend: error")], err
    assert not [p for p in folder.rglob("*") if is_temp_file(p.name)], list(folder.rglob("*"))


def count_writes(monkeypatch, argv) -> int:
    disk = Disk(monkeypatch, None)
    code, err = run(argv)
    assert code == 0, err
    monkeypatch.undo()
    return disk.calls


def test_train_with_the_disk_full_at_every_write(tmp_path, monkeypatch, one_thread):
    writes = count_writes(monkeypatch, ["train", "--out", str(tmp_path / "ref"), "--data-dir",
                                        str(tmp_path / "data"), *TRAIN])
    assert writes >= 4 * EPOCHS  # config, best, last, metrics, and the step checkpoints
    print(f"train: {writes} write points, each failed once")
    for k in range(1, writes + 1):
        out = tmp_path / f"r{k}"
        Disk(monkeypatch, k)
        code, err = run(["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *TRAIN])
        monkeypatch.undo()
        assert_clean_failure(code, err, out)
        for name in ("last.safetensors", "best.safetensors"):  # whatever is there is complete
            if (out / name).exists():
                load_state(out / name)
        if "intact" in err:
            assert "no checkpoint was written there yet" not in err
        if (out / "config.json").exists():  # the run continues from what the full disk left
            code, err = run(["train", "--out", str(out), "--resume", "--no-progress"])
            assert code == 0, (k, err)
            assert load_run(out).epoch == EPOCHS


def test_eval_with_the_disk_full_at_every_progress_write(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *TRAIN])[0] == 0
    before = snapshot(out)
    argv = ["eval", "--checkpoint", str(out), "--attacks", "autoattack-fast", "--n", "8", "--device", "cpu",
            "--json"]
    reference = io.StringIO()
    with contextlib.redirect_stdout(reference), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    writes = count_writes(monkeypatch, argv)
    assert writes >= 1
    print(f"eval: {writes} write points, each failed once")
    for k in range(1, writes + 1):
        Disk(monkeypatch, k)
        result = io.StringIO()
        err = io.StringIO()
        with contextlib.redirect_stdout(result), contextlib.redirect_stderr(err):
            code = main(argv)
        monkeypatch.undo()
        assert code == 0, err.getvalue()  # the evaluation goes on without its progress file
        got, want = json.loads(result.getvalue()), json.loads(reference.getvalue())
        assert got["accuracy"] == want["accuracy"]  # the same numbers, with or without the progress file
        assert sum("goes on without saving its progress" in w for w in got["warnings"]) == 1
        assert snapshot(out) == before


def test_export_with_the_disk_full(tmp_path, monkeypatch, one_thread):
    out = tmp_path / "r"
    assert run(["train", "--out", str(out), "--data-dir", str(tmp_path / "data"), *TRAIN])[0] == 0
    target = tmp_path / "m.safetensors"
    for existed in (False, True):
        before = target.read_bytes() if existed else None
        Disk(monkeypatch, 1)
        code, err = run(["export", str(out), "--out", str(target)])
        monkeypatch.undo()
        assert_clean_failure(code, err, tmp_path)
        assert (target.read_bytes() if target.exists() else None) == before
        assert run(["export", str(out), "--out", str(target)])[0] == 0
        load_exported(target)
