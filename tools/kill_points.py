"""SIGKILL at many points of a training run (a measurement, not a test): each kill must leave
a run folder that `train --resume` finishes (exit 0) with the weights of an uninterrupted run,
bit for bit, or one that `--resume` refuses in one line (exit 2) with nothing changed.

    OMP_NUM_THREADS=1 PYTHONPATH=src python tools/kill_points.py [--points 20] [--out DIR]

Half of the points kill an in-memory run (fgsm-sdi on fake data), half a streamed one (a
folder of JPEGs, `--loader stream --workers 1`); the kill times are spread evenly over each
uninterrupted run's wall clock (process start included). Prints one JSON object: per point,
when it was killed, what the folder held, the resume's exit code, and whether the final
weights equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from learn2defend.checkpoint import load_state


def _folder(root: Path) -> Path:
    """A 4-class folder (PATH/train/<class>/) of 40 random 20x20 JPEGs per class."""
    rng = np.random.default_rng(0)
    for k in range(4):
        (root / "train" / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(40):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / f"c{k}" / f"{i}.jpg", quality=90)
    return root


def _command(kind: str, out: Path, data: Path, resume: bool = False) -> list[str]:
    common = ["--out", str(out), "--epochs", "3", "--batch-size", "16", "--checkpoint-every", "3",
              "--val-robust-n", "0", "--no-progress", "--model", "smallcnn", "--data-dir", str(data / "cache")]
    if kind == "memory":
        common += ["--dataset", "fake:3x16x16:4", "--train-size", "480", "--method", "fgsm-sdi"]
    else:
        common += ["--dataset", f"folder:{data / 'images'}", "--loader", "stream", "--workers", "1",
                   "--image-size", "16", "--method", "fgsm"]
    return [sys.executable, "-m", "learn2defend", "train", *common, *(["--resume"] if resume else [])]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_state(out / "last.safetensors")["model"]


def _holds(out: Path) -> str:
    if not out.exists():
        return "nothing"
    names = sorted(p.name for p in out.iterdir())
    if "last.safetensors" not in names:
        return "no checkpoint: " + ", ".join(names)
    s = load_state(out / "last.safetensors")
    return f"checkpoint at epoch {s['epoch']}, batch {s['batch']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kill-points-"))
    data = root / "data"
    _folder(data / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    report = {"points": []}
    for kind in ("memory", "stream"):
        reference = root / f"{kind}-reference"
        started = time.monotonic()
        subprocess.run(_command(kind, reference, data), env=env, check=True, capture_output=True)
        duration = time.monotonic() - started
        expected = _weights(reference)
        report[f"{kind}_run_seconds"] = round(duration, 2)
        n = args.points // 2
        for i in range(n):
            at = duration * (i + 0.5) / n
            out = root / f"{kind}-{i}"
            proc = subprocess.Popen(_command(kind, out, data), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(at)
            proc.send_signal(signal.SIGKILL)
            killed_rc = proc.wait()
            held = _holds(out)
            fresh = not (out / "config.json").exists()  # killed before the run folder was claimed
            resumed = subprocess.run(_command(kind, out, data, resume=not fresh), env=env,
                                     capture_output=True, text=True)
            same = None
            if resumed.returncode == 0:
                got = _weights(out)
                same = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
            report["points"].append({
                "loader": kind, "killed_after_s": round(at, 2), "killed_rc": killed_rc, "folder_held": held,
                "restart": "train (no config.json yet)" if fresh else "train --resume",
                "restart_rc": resumed.returncode, "restart_error": resumed.stderr.strip().splitlines()[-1:]
                if resumed.returncode else [], "weights_equal_uninterrupted": same})
    points = report["points"]
    report["summary"] = {
        "points": len(points),
        "restart_exit_codes": sorted({p["restart_rc"] for p in points}),
        "bit_exact": sum(bool(p["weights_equal_uninterrupted"]) for p in points),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
