"""`learn2defend gpu-report --out DIR`: every GPU figure of docs/performance.md in one command.

It runs, in this order, printing progress on stderr:
1. `doctor` (`learn2defend.doctor`): the device's matmul roofline in float32 and bf16, every
   method with each speed switch, the combinations bf16 + channels_last and bf16 +
   channels_last + compile at batch 128 and 512 (compile time apart from the steps), and
   the training checks; bounded by `doctor_seconds` -> DIR/doctor.json, DIR/doctor.txt;
2. `reproduce frontier --preset gpu` (`learn2defend.frontier`): PreAct-ResNet-18 from
   scratch on CIFAR-10 -> DIR/frontier/ (its tables and run folders), DIR/frontier.json;
3. DIR/gpu_report.json: what ran, with its seconds and the environment.

Sized to about 12 minutes on one H100/H200-class GPU: doctor's 4 minutes and the gpu
preset's predicted 7 (frontier.py's notes on the preset; unmeasured). `tiny` runs the
same three steps in seconds on the CPU (smallcnn, batch 8, one method, the frontier's test
preset on fake data): what the tests run.

CIFAR-10 must be in `data_dir` (or `download` with internet); the wheels a bare machine
lacks: docs/performance.md, "Every GPU figure in one command".
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import DATA_DIR_HELP, DEVICE_HELP, option
from .errors import UserError

DOCTOR_SECONDS = 240.0
TINY_DATASET = "fake:1x8x8:4"


@dataclass
class GpuReportConfig:
    """What gpu-report runs. Each field is also an option of `learn2defend gpu-report`."""

    out: str = option(help="folder the JSON reports (and the frontier's runs) are written to")
    device: str = option("auto", help=DEVICE_HELP)
    data_dir: str = option("data", help=DATA_DIR_HELP + " (CIFAR-10 for the frontier)")
    download: bool = option(False, switch=True, help="download CIFAR-10 if it is missing (needs internet)")
    doctor_seconds: float = option(DOCTOR_SECONDS, help="bound on doctor's benchmarks (its --max-seconds)")
    frontier: bool = option(True, help="also run reproduce frontier --preset gpu (--no-frontier: doctor only)")
    tiny: bool = option(False, switch=True, help="seconds on the CPU: smallcnn, one method, the frontier's "
                        "test preset on fake data (to check the command, not to measure)")

    def validate(self) -> None:
        if not self.out:
            raise UserError("--out is required: the folder the reports are written to")
        if not (self.doctor_seconds >= 0):
            raise UserError(f"--doctor-seconds must be >= 0, got {self.doctor_seconds}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder")


def _log(message: str) -> None:
    print(f"gpu-report: {message}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def gpu_report(config: GpuReportConfig) -> dict[str, Any]:
    """Run doctor and the gpu frontier; write their JSON under `config.out`; return the summary."""
    from .doctor import DoctorConfig, doctor, format_report
    from .reproduce import FRONTIER_PRESETS, reproduce, summary
    from .runs import resolve_device

    config.validate()
    device = resolve_device(config.device)
    if device.type != "cuda" and not config.tiny:
        _log(f"no GPU here ({device}): the figures are of this device, not of a GPU")
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e}") from None
    started = time.monotonic()
    result: dict[str, Any] = {"out": str(out), "tiny": config.tiny, "steps": {}}

    _log(f"1/2 doctor (at most {config.doctor_seconds:g} s of benchmarks)")
    doctor_config = DoctorConfig(device=str(device), max_seconds=config.doctor_seconds, data_dir=config.data_dir)
    if config.tiny:
        doctor_config = replace(doctor_config, model="smallcnn", batch_size=8, steps=1, warmup=0, methods=["plain"],
                                variants=["float32", "channels_last", "bf16+channels_last"],
                                combination_batch_sizes=[8, 16], roofline_seconds=0.05, checks=False)
    t = time.monotonic()
    report = doctor(doctor_config)
    _write_json(out / "doctor.json", report)
    (out / "doctor.txt").write_text(format_report(report) + "\n")
    result["environment"] = report["environment"]
    result["steps"]["doctor"] = {"seconds": round(time.monotonic() - t, 1), "json": str(out / "doctor.json")}

    if config.frontier:
        preset = FRONTIER_PRESETS["tiny"] if config.tiny else FRONTIER_PRESETS["gpu"]
        if config.tiny:
            preset = replace(preset, frontier_methods=("fgsm-rs",))
        _log(f"2/2 reproduce frontier --preset {preset.name} -> {out / 'frontier'}")
        t = time.monotonic()
        frontier = reproduce("frontier", preset, out / "frontier", datasets=[TINY_DATASET] if config.tiny else None,
                             device=str(device), data_dir=config.data_dir, download=config.download,
                             log=lambda s: _log(f"frontier: {s}"))
        _write_json(out / "frontier.json", frontier)
        (out / "frontier.txt").write_text(summary(frontier) + "\n")
        result["steps"]["frontier"] = {"seconds": round(time.monotonic() - t, 1), "json": str(out / "frontier.json"),
                                       "preset": preset.name}
    result["seconds"] = round(time.monotonic() - started, 1)
    _write_json(out / "gpu_report.json", result)
    _log(f"done in {result['seconds']:g} s; JSON in {out}")
    return result
